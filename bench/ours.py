"""Our side: run one deltalign stage for a fixed number of optimizer steps in this (fresh) process and report.

    python bench/ours.py --stage {sft,rm,dpo,ppo,grpo} --settings JSON --out DIR
    python bench/ours.py --prepare-ppo DIR --settings JSON     # untrained sft + rm folders that ppo / grpo read

The stage runs exactly as ``python -m deltalign run STAGE`` would (``deltalign.stages.<stage>.run``) with the config
built from ``configs/default.yaml`` plus the benchmark's overrides (the shared settings of ``bench/common.py``;
held-out evaluation, checkpoints and generation reports switched off). Two light hooks, no change to the stage:
``Engine.step`` is wrapped to timestamp the end of every optimizer step, and the stage's own forward function is
wrapped to count the real tokens of each trained batch (only calls made with gradients on, i.e. the training
forward, not reference or evaluation passes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, Settings, StepTimer, data_for, emit, model_dims, seq_flops, set_threads,  # noqa: E402
                    tree_flops)


def overrides(stage: str, s: Settings) -> list[str]:
    """``--set`` style overrides: the shared settings mapped onto our config keys."""
    o = [f"model.path={s.model}", f"model.dtype={s.dtype}", "model.quantization=none",
         f"{stage}.lr={s.lr}", f"{stage}.seed={s.seed}", f"{stage}.threads={s.threads}", f"{stage}.grad_accum=1",
         f"{stage}.checkpoint_every=0", f"{stage}.log_every=1000", f"{stage}.eval_data="]
    lora = [f"{stage}.adapter.method=lora", f"{stage}.adapter.r={s.lora_r}", f"{stage}.adapter.alpha={s.lora_alpha}",
            f"{stage}.adapter.dropout={s.lora_dropout}", f"{stage}.adapter.target_modules={s.target_modules}"]
    if stage in ("sft", "rm", "dpo"):
        o.append(f"model.gradient_checkpointing={str(s.train_gradient_checkpointing).lower()}")
    if stage == "sft":
        o += lora + [f"sft.data={data_for('sft', s)}", f"sft.max_steps={s.steps}", f"sft.batch_size={s.batch_size}",
                     f"sft.max_length={s.max_length}", "sft.eval_checker=false"]
    elif stage == "rm":
        o += lora + [f"rm.data={data_for('rm', s)}", f"rm.max_steps={s.steps}", f"rm.batch_size={s.batch_size}",
                     f"rm.max_length={s.max_length}", "rm.init=fresh", f"rm.stats_pairs={s.batch_size}",
                     f"rm.eval_batch_size={s.batch_size}"]
    elif stage == "dpo":
        # reference = the base with adapters off and a fresh policy adapter: what TRL does with a peft model and
        # no ref_model, so both sides run the same reference forward every step
        o += lora + [f"dpo.data={data_for('dpo', s)}", f"dpo.max_steps={s.steps}", f"dpo.batch_size={s.batch_size}",
                     f"dpo.max_length={s.max_length}", "dpo.reference=base", "dpo.init=fresh", "dpo.loss=sigmoid",
                     f"dpo.beta={s.dpo_beta}", "dpo.nll_weight=0", "dpo.eval_checker=false"]
    elif stage == "ppo":
        o += [f"ppo.data={data_for('ppo', s)}", f"ppo.max_steps={s.ppo_steps}", f"ppo.batch_size={s.batch_size}",
                     f"ppo.mini_batch_size={s.ppo_mini_batch_size}", f"ppo.passes={s.ppo_epochs}",
                     f"ppo.max_prompt_length={s.max_prompt_length}", f"ppo.rollout.max_new_tokens={s.max_new_tokens}",
                     f"ppo.rollout.temperature={s.temperature}", "ppo.rollout.top_p=1.0",
                     f"ppo.kl_coef={s.kl_coef}", "ppo.kl_target=0", "ppo.warmup_ratio=0", "ppo.critic_init=rm",
                     "ppo.rm_weight=1.0", "ppo.rules.checker=0", "ppo.eval_checker=false",
                     f"model.gradient_checkpointing={str(s.ppo_gradient_checkpointing).lower()}"]
    elif stage == "grpo":
        # the policy is a trainable copy of the (untrained) sft adapter; beta 0 (no reference forward), the
        # embedded checker as the only reward (no reward model loaded), one minibatch per pass, DAPO token loss
        o += [f"grpo.data={data_for('grpo', s)}", f"grpo.max_steps={s.grpo_steps}",
              f"grpo.batch_size={s.grpo_batch_size}",
              f"grpo.num_generations={s.grpo_num_generations}", f"grpo.passes={s.grpo_epochs}",
              "grpo.mini_batch_size=0", f"grpo.max_prompt_length={s.max_prompt_length}",
              f"grpo.rollout.max_new_tokens={s.max_new_tokens}", f"grpo.rollout.temperature={s.temperature}",
              "grpo.rollout.top_p=1.0", f"grpo.kl_coef={s.grpo_beta}", "grpo.rm_weight=0", "grpo.rules.checker=1.0",
              "grpo.advantage=grpo", "grpo.loss_aggregation=token", "grpo.clip_low=0.2", "grpo.clip_high=0.28",
              "grpo.missing_eos_penalty=0", "grpo.resample_rounds=0", "grpo.warmup_ratio=0",
              "grpo.disable_dropout=true", "grpo.eval_checker=false",
              f"model.gradient_checkpointing={str(s.grpo_gradient_checkpointing).lower()}"]
    return o


def build_configs(stage: str, s: Settings) -> tuple[dict, list[str]]:
    """Configs from configs/default.yaml + overrides; overrides for keys this version lacks are dropped (reported)."""
    from deltalign.core import settings as configs
    from deltalign.pipeline.graph import sections

    secs = sections()
    if stage not in secs:
        raise SystemExit(f"stage {stage!r} is not in deltalign's stage graph")
    known = {f"{name}.{k}" for name, cls in secs.items() for k in configs.field_names(cls)}
    wanted = overrides(stage, s)
    def exists(key: str) -> bool:  # the key, or a mapping field it indexes into (ppo.rules.checker)
        parts = key.split(".")
        return any(".".join(parts[:i]) in known for i in range(2, len(parts) + 1))

    kept = [o for o in wanted if exists(o.split("=", 1)[0])]
    dropped = [o for o in wanted if o not in kept]
    return configs.load(secs, str(ROOT / "configs/default.yaml"), kept), dropped


def prepare_ppo(out: Path, s: Settings) -> None:
    """Untrained ``sft`` (policy/reference) and ``rm`` (adapter + head + stats) folders for the PPO stage.

    LoRA's B matrices start at zero, so these compute exactly what trained ones would; PPO's cost does not depend
    on what the adapters learned.
    """
    import torch

    from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
    from deltalign.rewards.model import HEAD_FILE, STATS_FILE

    if (out / "rm" / STATS_FILE).exists() and (out / "sft" / "adapter_model.safetensors").exists():
        return
    torch.manual_seed(s.seed)
    bb = Backbone.load(ModelConfig(path=s.model, dtype=s.dtype))
    a = AdapterConfig(r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout, target_modules=s.target_modules)
    bb.add_adapter("sft", a, trainable=False)
    bb.save_adapter("sft", out / "sft")
    bb.add_adapter("rm", a, trainable=False)
    bb.add_head("rm", trainable=False)
    bb.save_adapter("rm", out / "rm")
    bb.save_head("rm", out / "rm" / HEAD_FILE)
    (out / "rm" / STATS_FILE).write_text(json.dumps({"mean": 0.0, "std": 1.0, "n": 0}))


def install_hooks(stage: str, timer: StepTimer, dims: dict, s: Settings, cfg=None) -> None:
    import torch

    import deltalign.training.engine as engine_mod

    original_step = engine_mod.Engine.step

    def step(self, *a, **k):
        out = original_step(self, *a, **k)
        timer.step_end()
        return out

    engine_mod.Engine.step = step

    def lengths_of(batch) -> list[int]:
        return [int(x) for x in batch["attention_mask"].sum(1).tolist()]

    def flops_of(batch, kind: str) -> float:
        """The batch's model FLOPs as run: packed with shared prefixes (each shared token once) or padded."""
        if "shared" in batch:
            sh = batch["shared"]
            return tree_flops(dims, sh["position_ids"][sh["real"]].tolist(), kind)
        return seq_flops(dims, lengths_of(batch), kind)

    def computed(batch) -> int:
        return batch["shared"]["n_tokens"] if "shared" in batch else sum(lengths_of(batch))

    if stage == "sft":
        import deltalign.stages.sft as mod
        orig = mod.token_loss

        def token_loss(backbone, model, batch):
            if torch.is_grad_enabled():
                L = lengths_of(batch)
                timer.add(rows=len(L), tokens=sum(L), computed_tokens=computed(batch), flops=flops_of(batch, "train"))
            return orig(backbone, model, batch)

        mod.token_loss = token_loss
    elif stage == "rm":
        import deltalign.stages.rm as mod
        orig = mod.pair_scores

        def pair_scores(model, batch):
            if torch.is_grad_enabled():
                L = lengths_of(batch)
                timer.add(pairs=len(L) // 2, tokens=sum(L), computed_tokens=computed(batch),
                          flops=flops_of(batch, "train_body"))
            return orig(model, batch)

        mod.pair_scores = pair_scores
    elif stage == "dpo":
        import deltalign.stages.dpo as mod
        orig = mod.response_logprobs

        def response_logprobs(backbone, model, batch):
            if torch.is_grad_enabled():  # the policy's training forward (the reference runs under no_grad)
                L = lengths_of(batch)
                timer.add(pairs=len(L) // 2, tokens=sum(L), computed_tokens=computed(batch),
                          flops=flops_of(batch, "train") + flops_of(batch, "fwd"))
            return orig(backbone, model, batch)

        mod.response_logprobs = response_logprobs
    elif stage == "ppo":
        import deltalign.stages.ppo as mod
        orig = mod.rollout_batch

        def rollout_batch(prompts, responses, pad_id):
            timer.add(samples=len(prompts), **ppo_work(dims, [len(p) for p in prompts],
                                                       [len(r) for r in responses], s.ppo_epochs))
            return orig(prompts, responses, pad_id)

        mod.rollout_batch = rollout_batch
    elif stage == "grpo":
        import deltalign.stages.grpo as mod
        orig = mod.rollout_batch
        flags = grpo_flags(cfg)

        def rollout_batch(prompts, responses, pad_id):  # once per step, the rollout that trains
            timer.add(samples=len(prompts), **grpo_work(dims, [len(p) for p in prompts],
                                                        [len(r) for r in responses], cfg.passes, **flags))
            return orig(prompts, responses, pad_id)

        mod.rollout_batch = rollout_batch


def grpo_flags(cfg) -> dict:
    """Which optional forwards our grpo stage runs with this config (see deltalign/stages/grpo.py, step 3.3): old
    log-probs only when a pass has several minibatches, the reference only when beta > 0."""
    n_rows = cfg.batch_size * cfg.num_generations
    return {"old_logprobs": (cfg.mini_batch_size or n_rows) < n_rows, "reference": cfg.beta > 0}


def grpo_work(dims: dict, P: list[int], R: list[int], epochs: int, old_logprobs: bool, reference: bool) -> dict:
    """Model FLOPs of one GRPO step by the convention in common.py: generation, the optional forwards this side
    runs, ``epochs`` training passes (the checker reward costs no model FLOPs)."""
    T = [p + r for p, r in zip(P, R)]
    fwd = seq_flops(dims, T, "fwd")
    flops = (1 + int(old_logprobs) + int(reference)) * fwd + epochs * seq_flops(dims, T, "train")
    return {"flops": flops, "tokens": sum(T), "response_tokens": sum(R)}


def ppo_work(dims: dict, P: list[int], R: list[int], epochs: int) -> dict:
    """Model FLOPs of one PPO step by the convention in common.py (real prompt and response lengths)."""
    T = [p + r for p, r in zip(P, R)]
    flops = (3 * seq_flops(dims, T, "fwd") + 2 * seq_flops(dims, T, "fwd_body")
             + epochs * (seq_flops(dims, T, "train") + seq_flops(dims, T, "train_body")))
    return {"flops": flops, "tokens": sum(T), "response_tokens": sum(R)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["sft", "rm", "dpo", "ppo", "grpo"])
    ap.add_argument("--settings", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--prepare-ppo", default=None, metavar="DIR")
    args = ap.parse_args()
    s = Settings.from_json(args.settings)
    os.chdir(ROOT)
    set_threads(s.threads)
    if args.prepare_ppo:
        prepare_ppo(Path(args.prepare_ppo), s)
        emit({"side": "ours", "stage": "ppo_prepare", "dir": args.prepare_ppo})
        return 0
    if args.stage in ("ppo", "grpo"):
        try:
            __import__(f"deltalign.stages.{args.stage}")
        except ImportError as e:
            emit({"side": "ours", "stage": args.stage, "error": f"not available: {e}"})
            return 0

    cfgs, dropped = build_configs(args.stage, s)
    timer = StepTimer()
    dims = model_dims(s.model)
    install_hooks(args.stage, timer, dims, s, cfgs[args.stage])
    if s.extra.get("plans", {}).get(args.stage):  # the plan's batches, in its order (bench/plan.py)
        import plan

        plan.follow(args.stage)
    from deltalign.pipeline.graph import stage_module

    upstream = {}
    if args.stage in ("ppo", "grpo"):  # grpo reads only the sft folder (no reward model, no reference)
        up = Path(s.extra.get("ppo_upstream") or ROOT / "bench" / ".cache" / "ppo-upstream")
        upstream = {"sft": up / "sft", "rm": up / "rm"} if args.stage == "ppo" else {"sft": up / "sft"}
    with tempfile.TemporaryDirectory(prefix=f"bench-ours-{args.stage}-") as tmp:
        out = Path(args.out or tmp)
        stage_module(args.stage).run(cfgs[args.stage], cfgs["model"], out / args.stage, upstream)
    res = {"side": "ours", "stage": args.stage, **timer.summary(), "dropped_overrides": dropped,
           "threads": s.threads}
    if args.stage == "grpo":
        res.update(grpo_flags(cfgs["grpo"]), rollout_batch_size=cfgs["grpo"].rollout.batch_size)
    emit(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
