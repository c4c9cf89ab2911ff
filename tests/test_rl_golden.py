"""The online RL stages' numbers, pinned: a fixed-seed tiny run of ppo and grpo, in variants that exercise each
speed trick (the first minibatch's training forwards reused as old log-probs / old values, a separate no-grad
forward with several minibatches or dropout, length-sorted chunked forwards, prefix sharing, the reference
forward only with beta > 0, sequence importance sampling, cispo, dynamic resampling), logs the same losses and
metrics per step, to 1e-6, as the values recorded in tests/golden/rl_metrics.json.

The fixture was recorded from the loops before they were restructured (issue 35 goal 3); a change that alters a
number here changes a result. To re-record (only when a result is meant to change):
``DELTALIGN_RECORD_GOLDEN=1 python -m pytest tests/test_rl_golden.py``."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltalign.model.backbone import ModelConfig
from deltalign.sampling.generation import GenerationConfig
from deltalign.stages import grpo, ppo

FIXTURE = Path(__file__).parent / "golden" / "rl_metrics.json"
RECORD = os.environ.get("DELTALIGN_RECORD_GOLDEN") == "1"
ROLLOUT = dict(rollout=GenerationConfig(max_new_tokens=6, temperature=1.0), generation=GenerationConfig(max_new_tokens=6))
PPO = dict(batch_size=4, mini_batch_size=2, passes=2, max_steps=2, log_every=1, checkpoint_every=0,
           eval_checker=False, lr=1e-2, **ROLLOUT)
# the reward model's scores vary within a group, so every variant trains (the checker alone gives all-equal groups)
GRPO = dict(batch_size=2, num_generations=4, max_steps=2, log_every=1, checkpoint_every=0, lr=1e-2, rm_weight=1.0,
            rules={"checker": 1.0}, eval_checker=False, **ROLLOUT)
# a rule that varies on some prompts only: all-equal groups for the dynamic resampling to replace
SOME = "def some(prompts, responses):\n    return [float(sum(map(ord, r)) % 2) if len(str(p)) % 2 else 0.0 for p, r in zip(prompts, responses)]\n"

# name -> (stage, its settings, model settings)
VARIANTS = {
    # several minibatches, two epochs: the first minibatch's forwards reused, the rest from a no-grad forward
    "ppo_minibatches": (ppo, dict(PPO), {}),
    # full checkpointing: the critic's first training forward gives the first minibatch's old values too
    "ppo_checkpointed": (ppo, dict(PPO, ent_coef=0.01, kl_target=6.0), {"gradient_checkpointing": True}),
    # dropout on: every row's old log-probs from separate forwards
    "ppo_dropout": (ppo, dict(PPO, disable_dropout=False, share_prefixes=False), {}),
    # one minibatch, one epoch, a fresh critic, rules only
    "ppo_one_minibatch": (ppo, dict(PPO, mini_batch_size=4, passes=1, rm_weight=0.0, critic_init="fresh",
                                     rules={"checker": 1.0}), {}),
    # one minibatch, two passes: the first pass fills the old log-probs; beta 0: no reference forward
    "grpo_first_pass": (grpo, dict(GRPO), {}),
    # several minibatches: a separate no-grad forward; beta > 0: the reference forward; chunked forwards
    "grpo_minibatches_beta": (grpo, dict(GRPO, mini_batch_size=4, kl_coef=0.1, forward_batch_size=3), {}),
    # chunked, unshared forwards, sequence importance sampling (GSPO), per-sequence aggregation
    "grpo_sequence": (grpo, dict(GRPO, importance_sampling="sequence", loss_aggregation="sequence",
                                 forward_batch_size=2, share_prefixes=False, passes=3), {}),
    # cispo with the KL term, constant aggregation, rloo, overlong shaping, two minibatches of chunked forwards
    "grpo_cispo": (grpo, dict(GRPO, loss="cispo", kl_coef=0.05, loss_aggregation="constant", advantage="rloo",
                              overlong_cache=2, missing_eos_penalty=0.5, mini_batch_size=4, forward_batch_size=3),
                   {}),
    # dynamic resampling of all-equal groups, truncated responses masked (all of them, at 6 new tokens)
    "grpo_resample": (grpo, dict(GRPO, rm_weight=0.0, rules={"golden_rewards:some": 1.0}, resample_rounds=2,
                                 mask_truncated=True), {}),
    "grpo_resample_trains": (grpo, dict(GRPO, rm_weight=0.0, rules={"golden_rewards:some": 1.0},
                                        resample_rounds=2, max_steps=3), {}),
}


def _run(name, upstream, out):
    stage, settings, model = VARIANTS[name]
    torch.manual_seed(0)
    stage.run(stage.Config(**settings), ModelConfig(path="tiny", **model), out, dict(upstream))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: v for k, v in r.items() if not k.startswith("time") and isinstance(v, (int, float))}
             for r in rows if r["kind"] == "train"]
    weights = load_file(out / "adapter_model.safetensors")
    return {"steps": steps, "policy_abs_sum": sum(float(w.double().abs().sum()) for w in weights.values())}


@pytest.fixture(scope="module")
def golden():
    recorded = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    yield recorded
    if RECORD:
        FIXTURE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rl_losses_match_the_recorded_run(name, golden, upstream, tmp_path, monkeypatch):
    (tmp_path / "golden_rewards.py").write_text(SOME)
    monkeypatch.syspath_prepend(str(tmp_path))
    got = _run(name, upstream, tmp_path / name)
    if RECORD:
        golden[name] = got
        return
    want = golden[name]
    assert len(got["steps"]) == len(want["steps"]) == VARIANTS[name][1]["max_steps"]
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"]), start=1):
        assert g.keys() == w.keys(), (step, sorted(g.keys() ^ w.keys()))
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-6, nan_ok=True), (name, step, k)
    assert got["policy_abs_sum"] == pytest.approx(want["policy_abs_sum"], rel=1e-6, abs=1e-6)
