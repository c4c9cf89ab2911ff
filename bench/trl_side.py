"""TRL's side: the same stage with TRL's trainer, same model, data and settings, in this (fresh) process.

    .bench-venv/bin/python bench/trl_side.py --stage {sft,rm,dpo,ppo,grpo} --settings JSON

Runs in ``.bench-venv`` (bench/requirements.txt: trl pinned next to the same torch / transformers / peft /
accelerate versions as deltalign's ``.venv``). TRL is never imported by deltalign itself.

What is matched to our side (``bench/common.py`` Settings): the checkpoint (fp32), LoRA rank / alpha / dropout /
targets (``all-linear``), rows or pairs per optimizer step, max sequence length, optimizer steps, learning rate,
AdamW (``adamw_torch``), grad-norm clipping 1.0, CPU threads. TRL defaults that differ from ours and would change
the work done are turned back: ``gradient_checkpointing=False`` unless the workload sets it (TRL's SFT/DPO/Reward
configs default to True),
``bf16=False`` on cpu (TRL defaults to True; on ``--device cuda`` runs the base is loaded in bf16 and
``bf16=True``, as ours runs a bf16 base there), no packing, no padding-free. Dropout: TRL's reward and DPO trainers
switch it off by default (``disable_dropout=True``), as ours do (``rm/dpo.disable_dropout``); SFT keeps it on both
sides. SFT data are our ``messages`` rows as conversational prompt/completion, so TRL trains on the
completion only, as ours does. The DPO reference is the base with the adapter disabled (peft model, no
``ref_model``), computed every step (``precompute_ref_log_probs=False``), as ours does on first use of a pair.
GRPO: ``GRPOTrainer`` with a fresh LoRA, no vLLM, beta 0, the embedded checker as reward function, group size,
prompts per step, response length, passes per rollout (``num_iterations``), DAPO loss and clip range, dropout off
and activation checkpointing as ours (see :func:`run_grpo` and bench/README.md's GRPO table).

Timing: a ``TrainerCallback.on_step_end`` timestamps every optimizer step; ``training_step`` is wrapped to count the
real tokens of each batch (from ``attention_mask``). Same window and FLOP convention as ours (common.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, Settings, StepTimer, data_for, emit, model_dims, pref_rows_for_trl, seq_flops,  # noqa: E402
                    set_threads, sft_rows_for_trl, torch_dtype)


def tokenizer(s: Settings, padding_side: str = "right"):
    """The checkpoint's tokenizer with a pad token distinct from EOS (the same fix our side applies)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / s.model)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        spare = [t for t in (tok.unk_token, "<|endoftext|>", "<pad>") if t in vocab and vocab[t] != tok.eos_token_id]
        tok.pad_token = spare[0]
    tok.padding_side = padding_side
    return tok


def lora(s: Settings, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=s.target_modules, bias="none", task_type=task_type)


def common_args(s: Settings, out: str) -> dict:
    return dict(output_dir=out, max_steps=s.steps, per_device_train_batch_size=s.batch_size,
                gradient_accumulation_steps=1, learning_rate=s.lr, lr_scheduler_type="cosine", warmup_steps=0.05,
                optim="adamw_torch", max_grad_norm=1.0, weight_decay=0.0,
                gradient_checkpointing=s.train_gradient_checkpointing,
                bf16=s.dtype == "bfloat16", fp16=False, use_cpu=s.device == "cpu", logging_steps=1000, save_strategy="no", eval_strategy="no",
                report_to="none", seed=s.seed, dataloader_num_workers=0, disable_tqdm=False)


def timing_callback(timer: StepTimer):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.step_end()

    return Timing()


def counting(trainer_cls, timer: StepTimer, dims: dict, kind: str, planned: bool = False):
    """``trainer_cls`` with ``training_step`` counting the real tokens (and model FLOPs) of every batch."""

    class Counting(trainer_cls):
        def _get_train_sampler(self, *a, **k):  # a plan (bench/plan.py): its rows in file order, B a step
            if planned:
                from torch.utils.data import SequentialSampler

                return SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*a, **k)

        def training_step(self, model, inputs, *a, **k):
            L = [int(x) for x in inputs["attention_mask"].sum(1).tolist()]
            if kind == "sft":
                timer.add(rows=len(L), tokens=sum(L), flops=seq_flops(dims, L, "train"))
            elif kind == "rm":
                timer.add(pairs=len(L) // 2, tokens=sum(L), flops=seq_flops(dims, L, "train_body"))
            else:  # dpo: policy trains, reference forward
                timer.add(pairs=len(L) // 2, tokens=sum(L),
                          flops=seq_flops(dims, L, "train") + seq_flops(dims, L, "fwd"))
            return super().training_step(model, inputs, *a, **k)

    return Counting


def load_lm(s: Settings):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ROOT / s.model, dtype=torch_dtype(s.dtype))


def load_seq_cls(s: Settings, tok):
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(ROOT / s.model, num_labels=1, dtype=torch_dtype(s.dtype))
    m.config.pad_token_id = tok.pad_token_id
    return m


def run_sft(s: Settings, timer: StepTimer, dims: dict, out: str) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer(s)
    args = SFTConfig(**common_args(s, out), max_length=s.max_length, packing=False, padding_free=False,
                     completion_only_loss=True)
    trainer = counting(SFTTrainer, timer, dims, "sft", planned=bool(s.extra.get("plans", {}).get("sft")))(
        model=load_lm(s), args=args, train_dataset=Dataset.from_list(sft_rows_for_trl(data_for('sft', s))),
        processing_class=tok, peft_config=lora(s), callbacks=[timing_callback(timer)])
    trainer.train()


def run_rm(s: Settings, timer: StepTimer, dims: dict, out: str) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tok = tokenizer(s)
    args = RewardConfig(**common_args(s, out), max_length=s.max_length, disable_dropout=True)
    trainer = counting(RewardTrainer, timer, dims, "rm", planned=bool(s.extra.get("plans", {}).get("rm")))(
        model=load_seq_cls(s, tok), args=args, train_dataset=Dataset.from_list(pref_rows_for_trl(data_for('rm', s))),
        processing_class=tok, peft_config=lora(s, "SEQ_CLS"), callbacks=[timing_callback(timer)])
    trainer.train()


def run_dpo(s: Settings, timer: StepTimer, dims: dict, out: str) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = tokenizer(s)
    args = DPOConfig(**common_args(s, out), max_length=s.max_length, beta=s.dpo_beta, loss_type=["sigmoid"],
                     precompute_ref_log_probs=False, disable_dropout=True, padding_free=False)
    trainer = counting(DPOTrainer, timer, dims, "dpo", planned=bool(s.extra.get("plans", {}).get("dpo")))(
        model=load_lm(s), ref_model=None, args=args,
        train_dataset=Dataset.from_list(pref_rows_for_trl(data_for('dpo', s))), processing_class=tok,
        peft_config=lora(s), callbacks=[timing_callback(timer)])
    trainer.train()


def run_ppo(s: Settings, timer: StepTimer, dims: dict, out: str) -> None:
    """TRL's PPO (trl.experimental.ppo): policy = base + LoRA (reference = adapter disabled), a separate reward
    model, and a separate value model given the same LoRA (injected in place; base frozen, score head trained),
    since ours trains a LoRA critic too. Rollout batch, minibatch, PPO epochs, response length, temperature,
    KL coefficient and missing-EOS penalty match ours."""
    from datasets import Dataset
    from peft import inject_adapter_in_model

    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from ours import ppo_work

    tok = tokenizer(s, padding_side="left")
    rows = pref_rows_for_trl(data_for('ppo', s))
    ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True) for r in rows]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    ids = [x for x in ids if len(x) <= s.max_prompt_length]
    train = Dataset.from_dict({"input_ids": ids})
    reward = load_seq_cls(s, tok).eval().requires_grad_(False)
    value = load_seq_cls(s, tok)
    value.requires_grad_(False)
    inject_adapter_in_model(lora(s, "SEQ_CLS"), value.model)
    value.score.requires_grad_(True)
    for n, p in value.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    n_mini = max(1, s.batch_size // s.ppo_mini_batch_size)
    a = common_args(s, out)
    a.update(per_device_train_batch_size=s.ppo_mini_batch_size, gradient_accumulation_steps=n_mini, max_steps=-1)
    a.pop("warmup_steps")
    a["gradient_checkpointing"] = s.ppo_gradient_checkpointing  # TRL checkpoints the policy (not the value model)
    args = PPOConfig(**a, num_mini_batches=n_mini, num_ppo_epochs=s.ppo_epochs,
                     total_episodes=s.ppo_steps * s.batch_size, local_rollout_forward_batch_size=s.batch_size,
                     response_length=s.max_new_tokens, temperature=s.temperature, stop_token="eos",
                     missing_eos_penalty=1.0, kl_coef=s.kl_coef, num_sample_generations=0)

    orig = ppo_mod.batch_generation

    def batch_generation(model, queries, *a, **k):
        qr, logits = orig(model, queries, *a, **k)
        P = (queries != tok.pad_token_id).sum(1).tolist()
        resp = qr[:, queries.shape[1]:]
        R = []
        for row in resp.tolist():
            R.append(row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row))
        timer.add(samples=len(P), **ppo_work(dims, P, R, s.ppo_epochs))
        return qr, logits

    ppo_mod.batch_generation = batch_generation
    trainer = PPOTrainer(args=args, processing_class=tok, model=load_lm(s), ref_model=None, reward_model=reward,
                         train_dataset=train, value_model=value, eval_dataset=train.select(range(s.batch_size)),
                         peft_config=lora(s), callbacks=[timing_callback(timer)])
    trainer.train()


def checker_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL reward function: deltalign's embedded checker (``deltalign.rewards.checker``, stdlib only; the repo
    root is on sys.path) on the completions' text, the same reward our side's ``grpo.rules={checker: 1}`` gives.
    Prompts and completions arrive conversational (message lists); the checker reads the last user message."""
    from deltalign.rewards import checker

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return checker.score_batch(prompts, texts)


def run_grpo(s: Settings, timer: StepTimer, dims: dict, out: str) -> dict:
    """TRL's GRPOTrainer: policy = base + a fresh LoRA (B = 0, the compute of our untrained sft copy), no
    reference (beta 0), the embedded checker as the only reward. Per rollout step: ``grpo_batch_size`` prompts x
    ``grpo_num_generations`` completions (``per_device_train_batch_size`` counts completions), one generation per
    ``num_iterations`` = ``grpo_epochs`` optimizer steps, each over the whole rollout (as ours: one minibatch per
    pass). A TRL optimizer step is one of our updates, so the timer marks a step after every ``num_iterations``
    of them, the end of a rollout's last update, as ours does. Returns which optional forwards TRL ran."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ours import grpo_work

    G, E = s.grpo_num_generations, s.grpo_epochs
    tok = tokenizer(s, padding_side="left")
    rows = pref_rows_for_trl(data_for('grpo', s))

    def n_tokens(prompt) -> int:
        x = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return len(x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x)

    train = Dataset.from_list([{"prompt": r["prompt"]} for r in rows if n_tokens(r["prompt"]) <= s.max_prompt_length])
    a = common_args(s, out)
    a.update(per_device_train_batch_size=s.grpo_batch_size * G, gradient_accumulation_steps=1,
             max_steps=s.grpo_steps * E, warmup_steps=0, gradient_checkpointing=s.grpo_gradient_checkpointing)
    args = GRPOConfig(**a, num_generations=G, max_completion_length=s.max_new_tokens, temperature=s.temperature,
                      top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, beta=s.grpo_beta, num_iterations=E,
                      epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
                      mask_truncated_completions=False, disable_dropout=True, use_vllm=False,
                      log_completions=False)
    ran: dict = {"old_logprobs": False, "reference": False}

    class Counting(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            o = super()._generate_and_score_completions(inputs)
            if self.model.training:
                flags = {"old_logprobs": "old_per_token_logps" in o, "reference": "ref_per_token_logps" in o}
                ran.update({k: ran[k] or v for k, v in flags.items()})
                P = [int(x) for x in o["prompt_mask"].sum(1).tolist()]
                R = [int(x) for x in o["completion_mask"].sum(1).tolist()]
                timer.add(samples=len(P), **grpo_work(dims, P, R, E, **flags))
            return o

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % E == 0:  # the last update on this rollout
                timer.step_end()

    trainer = Counting(model=load_lm(s), reward_funcs=[checker_reward], args=args, train_dataset=train,
                       processing_class=tok, peft_config=lora(s), callbacks=[Timing()])
    trainer.train()
    return ran


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True, choices=["sft", "rm", "dpo", "ppo", "grpo"])
    ap.add_argument("--settings", required=True)
    args = ap.parse_args()
    s = Settings.from_json(args.settings)
    os.chdir(ROOT)
    set_threads(s.threads)
    warnings.filterwarnings("ignore")
    import trl

    timer = StepTimer()
    dims = model_dims(s.model)
    if args.stage == "ppo":
        try:
            import trl.experimental.ppo  # noqa: F401
        except ImportError as e:
            emit({"side": "trl", "stage": "ppo", "error": f"not available in trl {trl.__version__}: {e}"})
            return 0
    with tempfile.TemporaryDirectory(prefix=f"bench-trl-{args.stage}-") as out:
        extra = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo, "ppo": run_ppo,
                 "grpo": run_grpo}[args.stage](s, timer, dims, out) or {}
    s_steps = {"ppo": s.ppo_steps, "grpo": s.grpo_steps}.get(args.stage, s.steps)
    res = {"side": "trl", "stage": args.stage, **timer.summary(), "trl": trl.__version__, "threads": s.threads,
           "configured_steps": s_steps, **extra}
    emit(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
