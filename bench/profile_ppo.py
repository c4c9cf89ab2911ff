"""PPO profile: time, model-FLOP share of the matmul peak and peak memory of each phase of our PPO stage.

    python bench/profile_ppo.py [--steps 3] [--out bench/results]

Our ``ppo`` stage runs at the benchmark's PPO settings (``bench/common.py``; the same config and untrained
``sft`` + ``rm`` folders as ``bench/ours.py``), one fresh process per variant:

* ``default``: as ``make bench`` runs it;
* ``return-freed``: with glibc's mmap threshold fixed at 256 KiB (``MALLOC_MMAP_THRESHOLD_=262144``), so every
  buffer above that size is its own mapping, returned to the system when freed: the peak then follows the live
  tensors. Set next to ``default`` it shows how much of the peak is heap fragmentation (freed memory glibc keeps),
  and what returning memory at once costs in time (every new buffer page-faults);
* ``no-checkpointing``: the training forwards keep their activations (``model.gradient_checkpointing=false``):
  what recomputing them costs the optimise phase in time, and what keeping them costs in memory;
* ``selective``: ``model.gradient_checkpointing=selective`` (:mod:`deltalign.model.recompute`): the replay takes the
  frozen base's matmul outputs from the forward and recomputes only the rest -- the middle ground.

Light wrappers time every call of one phase and record the process's resident high-water mark within it (reset
before each call: :func:`deltalign.core.memory.reset_peak`):

* generate: the rollout (``deltalign.sampling.generation.generate``);
* score: the reward model, and every forward without gradients (reference log-probs, old values, old log-probs of
  rows outside the first minibatch);
* optimise: the training forwards (policy, critic), their backward passes and the optimizer updates.

The first step is warm-up, not counted. FLOP/s share per phase: the model FLOPs the phase really ran, by
``bench/common.py``'s per-token convention (generation ``T * F(T)``; score: reference ``T * F(T)`` + reward model
``T * F_body(T)`` + the separate old-log-prob and old-value forwards for the rows outside the first minibatch,
and the old values of every row unless full checkpointing takes the first minibatch's from the critic's training
forward; optimise: each epoch's policy and critic training) over the phase's time and the measured matmul peak
(``make bench`` instead charges every side the same full count). Writes ``ppo-profile-<date>-<time>.md`` and
``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Settings, emit, model_dims, parse_result, seq_flops, set_threads, tree_flops  # noqa: E402

PHASES = ("generate", "score", "optimise")
# name: (environment, bench settings changed)
VARIANTS = {"default": ({}, {}), "return-freed": ({"MALLOC_MMAP_THRESHOLD_": "262144"}, {}),
            "no-checkpointing": ({}, {"ppo_gradient_checkpointing": False}),
            "selective": ({}, {"ppo_gradient_checkpointing": "selective"}),
            # experiments (--variants): blocks above a fixed size returned when freed; one heap arena for all threads
            **{f"mmap-{k}": ({"MALLOC_MMAP_THRESHOLD_": str(v)}, {}) for k, v in
               (("512k", 512 << 10), ("1m", 1 << 20), ("2m", 2 << 20), ("3m", 3 << 20), ("4m", 4 << 20))},
            "one-arena": ({"MALLOC_ARENA_MAX": "1"}, {})}


def child(s: Settings, steps: int) -> dict:
    """Run the ppo stage with the phase wrappers; return per-phase seconds, peak RSS and FLOPs (timed steps)."""
    import tempfile

    import torch

    import deltalign.training.engine as engine_mod
    import deltalign.rewards.composite as composite
    import deltalign.stages.ppo as ppo
    from deltalign.core import memory
    from deltalign.data.sharing import prefix_tree
    from ours import build_configs, prepare_ppo

    up = Path(s.extra["ppo_upstream"])
    prepare_ppo(up, s)
    s.ppo_steps = steps
    cfgs, _ = build_configs("ppo", s)
    cfg = cfgs["ppo"]
    dims = model_dims(s.model)
    step_no = [0]
    acc = {p: {"seconds": 0.0, "peak_rss_mb": 0.0, "flops": 0.0} for p in PHASES}

    def timed(phase_of):
        def wrap(fn):
            def inner(*a, **k):
                phase = phase_of()
                memory.reset_peak()
                t = time.perf_counter()
                out = fn(*a, **k)
                if step_no[0] >= 1:  # after the warm-up step
                    acc[phase]["seconds"] += time.perf_counter() - t
                    acc[phase]["peak_rss_mb"] = max(acc[phase]["peak_rss_mb"], memory.peak()["host_gib"] * 1024)
                return out
            return inner
        return wrap

    grad_phase = lambda: "optimise" if torch.is_grad_enabled() else "score"  # noqa: E731
    ppo.generate = timed(lambda: "generate")(ppo.generate)
    ppo.policy_logprobs = timed(grad_phase)(ppo.policy_logprobs)
    ppo.critic_values = timed(grad_phase)(ppo.critic_values)
    composite.CompositeReward.__call__ = timed(lambda: "score")(composite.CompositeReward.__call__)
    engine_mod.Engine.backward = timed(lambda: "optimise")(engine_mod.Engine.backward)
    engine_mod.Engine.update = timed(lambda: "optimise")(engine_mod.Engine.update)
    original_step, original_batch = engine_mod.Engine.step, ppo.rollout_batch

    def step(self, *a, **k):
        out = original_step(self, *a, **k)
        step_no[0] += 1
        return out

    def rollout_batch(prompts, responses, pad_id):  # the work of this step, by the FLOP convention
        batch = original_batch(prompts, responses, pad_id)
        if step_no[0] >= 1:
            T = [len(p) + len(r) for p, r in zip(prompts, responses)]
            n_mini = -(-len(T) // cfg.mini_batch_size)
            separate = (n_mini - 1) / n_mini if cfg.disable_dropout else 1.0  # rows outside the first minibatch
            # the old values: every row's from a no-grad critic forward unless full checkpointing keeps its graph
            separate_v = separate if cfgs["model"].gradient_checkpointing is True else 1.0
            # the scoring and training forwards as run: with share_prefixes, each shared token once (the rollout's
            # packing; with one minibatch per rollout, as here, every forward packs these same rows)
            sh = prefix_tree(batch["input_ids"], batch["attention_mask"]) if cfg.share_prefixes else None
            run = ((lambda kind: tree_flops(dims, sh["position_ids"][sh["real"]].tolist(), kind)) if sh
                   else (lambda kind: seq_flops(dims, T, kind)))
            acc["generate"]["flops"] += seq_flops(dims, T, "fwd")
            acc["score"]["flops"] += (1 + separate) * run("fwd") + (1 + separate_v) * run("fwd_body")
            acc["optimise"]["flops"] += cfg.passes * (run("train") + run("train_body"))
        return batch

    engine_mod.Engine.step, ppo.rollout_batch = step, rollout_batch
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ppo-profile-") as tmp:
        ppo.run(cfg, cfgs["model"], Path(tmp) / "ppo", {"sft": up / "sft", "rm": up / "rm"})
    return {"phases": acc, "timed_steps": step_no[0] - 1, "wall_s": time.perf_counter() - t0}


def table(results: dict, peak: float) -> str:
    rows = ["| variant | phase | s/step | share of step | FLOP/s share of peak | peak RSS in phase |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        ph, n = r["phases"], max(r["timed_steps"], 1)
        total = sum(p["seconds"] for p in ph.values())
        for phase in PHASES:
            p = ph[phase]
            share = p["flops"] / p["seconds"] / peak if p["seconds"] else 0
            rows.append(f"| {name} | {phase} | {p['seconds'] / n:.2f} | {p['seconds'] / total:.0%} | {share:.1%} | "
                        f"{p['peak_rss_mb'] / 1024:.2f} GB |")
        flops = sum(p["flops"] for p in ph.values())
        rows.append(f"| {name} | **step** | {total / n:.2f} | 100% | {flops / total / peak:.1%} | "
                    f"{max(p['peak_rss_mb'] for p in ph.values()) / 1024:.2f} GB |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="PPO steps per process, the first untimed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="default,return-freed,no-checkpointing,selective",
                    help=f"from {', '.join(VARIANTS)}")
    args = ap.parse_args()
    if args.child:
        s = Settings.from_json(args.child)
        set_threads(s.threads)
        os.chdir(ROOT)
        emit(child(s, args.steps))
        return 0

    from run import ppo_upstream  # the folders make bench uses

    s = Settings()
    s.extra["ppo_upstream"] = ppo_upstream(s)
    py = sys.executable
    peak = parse_result(subprocess.run([py, str(ROOT / "bench" / "matmul_peak.py"), "--threads", str(s.threads),
                                        "--seconds", "3"], capture_output=True, text=True, cwd=ROOT).stdout)
    results = {}
    for name in args.variants.split(","):
        env, changed = VARIANTS[name]
        p = subprocess.run([py, __file__, "--child", replace(s, **changed).to_json(), "--steps", str(args.steps)],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1", **env))
        res = parse_result(p.stdout)
        if res is None:
            print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
            return 1
        results[name] = res
        print(f"[profile] {name}: {res['wall_s']:.0f} s, peak {res['peak_rss_mb']:.0f} MB", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    stamp = dt.datetime.now(dt.timezone.utc)
    md = "\n".join([
        f"# PPO profile — {stamp:%Y-%m-%d %H:%M} UTC, commit {commit}", "",
        f"Our ppo stage at the bench's PPO settings (batch {s.batch_size} prompts, minibatch {s.ppo_mini_batch_size}, "
        f"{s.ppo_epochs} epochs, {s.max_new_tokens} new tokens, full checkpointing except in `no-checkpointing` and "
        "`selective`, "
        f"{s.threads} threads), "
        f"{args.steps} steps per process, the first untimed; fp32 matmul peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s. "
        "Peak RSS in phase = the process's resident high-water mark within that phase's calls. "
        "`return-freed`: MALLOC_MMAP_THRESHOLD_=262144; `no-checkpointing`: the training forwards keep their "
        "activations instead of recomputing them; `selective`: the replay keeps the frozen base's matmul outputs "
        "and recomputes the rest (bench/profile_ppo.py).", "",
        table(results, peak["peak_flops"]), ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"ppo-profile-{stamp:%Y-%m-%d-%H%M}"
    (out / f"{name}.md").write_text(md)
    from run import machine

    m = machine(trl=False)
    (out / f"{name}.json").write_text(json.dumps({"commit": commit, "machine": f"{m['cpu']}, {m['usable_cpus']} CPUs,"
                                                  f" {m['ram_gb']} GB;", "settings": json.loads(s.to_json()),
                                                  "matmul_peak_flops": peak["peak_flops"], "variants": results,
                                                  "table_markdown": md}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
