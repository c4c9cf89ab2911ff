"""An epoch whose micro-batch count is not a multiple of processes x grad_accum, with 2 CPU processes (gloo), under
plain data parallelism (configs/accelerate/ddp.yaml) and under ZeRO-2: every process still gets grad_accum
micro-batches (the engine's wrap-pad rule, see ``Engine.steps``), SFT and PPO finish and log the losses one process
logs over the same global batches. The ZeRO-2 SFT is first killed at step 3 and resumed from its step-2
checkpoint, which holds only safetensors and JSON (nothing is unpickled on resume).

Launched as in tests/test_zero.py (its probe and helpers), 3 steps of each stage on the tiny model.

SFT: 10 rows, batch 2 -> 5 micro-batches per epoch; 2 processes x 1 (or 1 process x grad_accum 2) -> steps
{0, 1}, {2, 3}, {4, 0}: the third step is padded with the epoch's first micro-batch.
PPO: 6 prompts, batch 4 -> one rollout batch per epoch (the short one is dropped): 2 processes -> both roll out
that batch (rank 1's is the padding). Rollouts are seeded per prompt, so both ranks hold the same rollouts and the
global batch is the batch twice: the same token means as one process with the batch once; advantages are not
whitened (the unbiased variance of a duplicated batch differs from the single batch's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_zero import _check, launch, ppo_prompts, train_rows

COMPARED = {"sft": ["loss", "grad_norm"], "ppo": ["policy_loss", "value_loss", "grad_norm", "score", "kl"]}
STAGES = ["sft", "ppo"]
WALL: dict[str, float] = {}


def _settings(root: Path) -> list[str]:
    from deltalign.data.formats import load_rows

    sft = root / "sft-rows.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in load_rows("embedded:sft_train")[:10]))
    return ["--set", f"sft.data={sft}", "--set", "sft.batch_size=2", "--set", "sft.eval_data=",
            "--set", "sft.eval_checker=false",
            "--set", f"ppo.data={ppo_prompts(root / 'ppo-prompts.jsonl', 6)}", "--set", "ppo.batch_size=4",
            "--set", "ppo.mini_batch_size=4", "--set", "ppo.whiten_advantages=false", "--set", "ppo.rm_weight=0",
            "--set", "ppo.critic_init=fresh", "--set", "ppo.rules.checker=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """sft -> ppo in one process (sft with grad_accum 2), under 2-process DDP, and under 2-process ZeRO-2 whose sft
    is first killed at step 3 (after the step-2 checkpoint) and then resumed."""
    root = tmp_path_factory.mktemp("uneven")
    common = _settings(root)
    out = {}
    p = launch("configs/accelerate/zero2.yaml", root / "killed-probe", root / "zero2", common, stages=["sft"],
               env={"DELTALIGN_TEST_KILL_AT_STEP": "3"}, timeout=300)
    WALL["zero2_killed_sft"] = p.wall
    ckpt = root / "zero2" / "sft" / "checkpoints" / "step-000002"
    out["killed"] = (p, sorted(f.relative_to(ckpt).as_posix() for f in ckpt.rglob("*")) if ckpt.is_dir() else None)
    for name, config, extra in [("single", None, ["--set", "sft.grad_accum=2"]),
                                ("ddp", "configs/accelerate/ddp.yaml", []),
                                ("zero2", "configs/accelerate/zero2.yaml", [])]:
        p = _check(launch(config, root / f"{name}-probe", root / name, [*common, *extra], stages=STAGES,
                          timeout=300))
        WALL[name] = p.wall
        out[name] = (root / name, p)
    return out


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_uneven_last_step_matches_one_process(runs, backend):
    single, _ = runs["single"]
    run, _ = runs[backend]
    for stage in STAGES:
        a, b = train_rows(single, stage), train_rows(run, stage)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3], stage
        for ra, rb in zip(a, b):
            for key in COMPARED[stage]:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=2e-6), (backend, stage, key, ra, rb)
            assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-6)
        for adapter in ("adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/head.safetensors"):
            if (single / stage / adapter).exists():
                x, y = load_file(str(single / stage / adapter)), load_file(str(run / stage / adapter))
                assert x.keys() == y.keys() and x
                for k in x:
                    torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=1e-4)


def test_zero2_resumes_from_a_pickle_free_checkpoint(runs):
    """Killed at step 3: the step-2 checkpoint holds only safetensors and JSON; the resumed run logs steps 1-3 once
    and its adapter is the one a single uninterrupted process ends with."""
    p, files = runs["killed"]
    assert p.returncode != 0
    assert files, "no step-2 checkpoint"
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    single, _ = runs["single"]
    run, p = runs["zero2"]
    assert "resuming" in p.stdout + p.stderr
    assert [r["step"] for r in train_rows(run, "sft")] == [1, 2, 3]
    a = load_file(str(single / "sft" / "adapter_model.safetensors"))
    b = load_file(str(run / "sft" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    print("wall times (s):", {k: round(v, 1) for k, v in WALL.items()})
