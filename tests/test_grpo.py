"""GRPO: policy, frozen SFT reference and frozen reward model on one backbone, no critic; group advantages,
zero-variance groups counted and resampled, only the policy delta trains, and a killed run resumes to the same
adapter."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tensor_storages
from deltalign.sampling import rollout
from deltalign.model.backbone import Backbone, ModelConfig
from deltalign.data.sharing import prefix_tree
from deltalign.sampling.generation import GenerationConfig
from deltalign.stages import grpo

TINY = ModelConfig(path="tiny")
FAST = dict(batch_size=2, num_generations=4, max_steps=2, log_every=1, checkpoint_every=0, lr=1e-2,
            rules={"checker": 1.0}, eval_checker=False, rollout=GenerationConfig(max_new_tokens=6, temperature=1.0),
            generation=GenerationConfig(max_new_tokens=6))


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """User reward functions: one that never varies, one that varies only on some prompts, one that varies."""
    (tmp_path / "grpo_rewards.py").write_text(
        "def flat(prompts, responses):\n    return [0.0] * len(responses)\n"
        "def some(prompts, responses):\n"
        "    return [float(sum(map(ord, r)) % 2) if len(str(p)) % 2 else 0.0 for p, r in zip(prompts, responses)]\n"
        "def vary(prompts, responses):\n    return [float(sum(map(ord, r)) % 5) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_sample_seeds_and_replacements_depend_on_step_prompt_and_sample_only():
    seeds = {grpo.sample_seed(0, s, p, j) for s in range(3) for p in range(5) for j in range(8)}
    assert len(seeds) == 3 * 5 * 8  # every response of a run has its own stream
    assert grpo.sample_seed(1, 2, 3, 4) == grpo.sample_seed(1, 2, 3, 4) != grpo.sample_seed(2, 2, 3, 4)
    pool = list(range(100, 200))
    picks = [grpo.replacement_prompt(0, 5, p, 1, pool) for p in range(20)]
    assert picks == [grpo.replacement_prompt(0, 5, p, 1, pool) for p in range(20)] and set(picks) <= set(pool)
    assert picks != [grpo.replacement_prompt(0, 5, p, 2, pool) for p in range(20)]  # each round draws afresh


def test_config_rules():
    with pytest.raises(ValueError, match="grad_accum"):
        grpo.Config(grad_accum=2)
    with pytest.raises(ValueError, match="mini_batch_size"):
        grpo.Config(batch_size=2, num_generations=4, mini_batch_size=9)
    with pytest.raises(ValueError, match="no reward"):
        grpo.Config(rm_weight=0.0, rules={})
    with pytest.raises(ValueError, match="temperature"):
        grpo.Config(rollout=GenerationConfig(temperature=0.0))


def test_one_backbone_holds_every_role_and_only_what_is_needed(upstream):
    # tensors alive before do not count: under pytest, a traceback kept from an import inside the fixture's
    # first add_adapter can hold the fixture's backbone (test_ppo's version fails when run on its own)
    before = tensor_storages()
    bb, rm = grpo.load_roles(grpo.Config(**FAST, rm_weight=1.0, kl_coef=0.1), TINY, upstream)
    assert sorted(bb.adapters) == ["grpo", "rm", "sft"] and bb.active == "grpo"
    assert sorted(bb.heads) == ["rm"] and rm.backbone is bb  # no critic
    embed = bb.causal_lm.get_input_embeddings().weight
    assert tensor_storages(embed.shape) - before == {embed.untyped_storage().data_ptr()}  # one copy of the base weights
    for name, trainable in [("sft", False), ("rm", False), ("grpo", True)]:
        assert all(p.requires_grad == trainable for p in bb.adapter_parameters(name).values()), name
    assert not any(p.requires_grad for p in bb.heads["rm"].parameters())
    # beta 0, no reward model and no report: neither the reference nor the reward model is loaded
    bb, rm = grpo.load_roles(grpo.Config(**FAST), TINY, upstream)
    assert bb.adapters == ["grpo"] and rm is None and not bb.heads


def test_training_changes_only_the_policy(upstream, tmp_path, monkeypatch):
    loaded = []
    load = Backbone.load.__func__

    def spy(cls, cfg):
        bb = load(cls, cfg)
        loaded.append((bb, {n: p.detach().clone() for n, p in bb.causal_lm.named_parameters()}))
        return bb

    monkeypatch.setattr(Backbone, "load", classmethod(spy))
    before = {k: _digest(v) for k, v in upstream.items()}
    out = tmp_path / "grpo"
    cfg = grpo.Config(**dict(FAST, eval_checker=True, eval_limit=3), rm_weight=1.0, kl_coef=0.05, passes=2,
                      mini_batch_size=4)
    report = grpo.run(cfg, TINY, out, dict(upstream))

    assert len(loaded) == 1  # one backbone for policy, reference, reward model and the report
    bb, base = loaded[0]
    current = {n.replace(".base_layer", ""): p for n, p in bb.causal_lm.named_parameters() if "lora_" not in n}
    assert set(base) <= set(current) and len(base) > 10
    for n, p in base.items():  # the frozen base: bit-identical after training
        assert torch.equal(current[n], p), n
    from peft.utils import get_peft_model_state_dict

    for role in ("sft", "rm"):  # the frozen reference and reward adapters: bit-identical to their files
        on_disk = load_file(upstream[role] / "adapter_model.safetensors")
        in_memory = get_peft_model_state_dict(bb.model, adapter_name=role)
        assert in_memory.keys() == on_disk.keys() and on_disk
        assert all(torch.equal(in_memory[k], v) for k, v in on_disk.items()), role
    rm_head = load_file(upstream["rm"] / "head.safetensors")
    assert all(torch.equal(bb.heads["rm"].state_dict()[k], v) for k, v in rm_head.items())
    assert {k: _digest(v) for k, v in upstream.items()} == before  # upstream folders only read
    policy, sft = load_file(out / "adapter_model.safetensors"), load_file(upstream["sft"] / "adapter_model.safetensors")
    assert policy.keys() == sft.keys() and any(not torch.equal(policy[k], sft[k]) for k in policy)
    assert not (out / "critic").exists()
    train = _train_rows(out)
    assert len(train) == 2
    for key in ["score", "reward_rm", "reward_checker", "zero_std", "zero_std_rm", "zero_std_checker", "kl",
                "clip_low", "clip_high", "approx_kl", "entropy", "policy_loss", "response_length", "ended",
                "time_generate", "time_score", "time_optimise"]:
        assert all(key in r for r in train), key
    assert all(0 <= r["zero_std"] <= 1 and r["kl"] >= 0 for r in train)
    assert set(report) == {"reference", "grpo", "data"} and "rm_score" in report["grpo"]
    assert report["data"]["train"]["rows"] == 600 and report["data"]["train"]["skipped"] == 0


def test_first_update_has_ratio_one_with_adapter_dropout_configured(upstream, tmp_path, monkeypatch, user_rewards):
    """The SFT adapter carries dropout 0.05. With two minibatches per pass the old log-probs take a forward of
    their own; with disable_dropout (default) it and the first update's forward are one function: approx_kl and
    both clip fractions are exactly 0. With dropout left on they are not (the test can fail). With one minibatch
    there is no old-log-prob forward at all: the first pass's detached log-probs are the old ones, reused by
    the second pass (whose ratio has moved)."""
    calls, grad_free = [], []
    loss, logprobs = grpo.clipped_policy_loss, grpo.policy_logprobs
    monkeypatch.setattr(grpo, "clipped_policy_loss", lambda *a, **k: calls.append(loss(*a, **k)[1]) or loss(*a, **k))

    def counting(*a, **k):
        grad_free.append(not torch.is_grad_enabled())
        return logprobs(*a, **k)

    monkeypatch.setattr(grpo, "policy_logprobs", counting)
    one_step = dict(FAST, max_steps=1, passes=2, rules={"grpo_rewards:vary": 1.0})
    for disable, expect_zero in ((True, True), (False, False)):
        calls.clear(), grad_free.clear()
        grpo.run(grpo.Config(**one_step, mini_batch_size=4, disable_dropout=disable), TINY,
                 tmp_path / f"d{disable}", dict(upstream))
        assert len(calls) == 4 and grad_free == [True] + [False] * 4  # 2 passes x 2 minibatches, one old forward
        first = calls[0]
        if expect_zero:
            assert first["approx_kl"] == 0 and first["clip_low"] == 0 and first["clip_high"] == 0, first
        else:
            assert first["approx_kl"] != 0, first
    calls.clear(), grad_free.clear()
    grpo.run(grpo.Config(**one_step), TINY, tmp_path / "one", dict(upstream))
    assert grad_free == [False, False] and len(calls) == 2  # the two training forwards, nothing else
    assert calls[0]["approx_kl"] == 0 and calls[0]["clip_low"] == 0 and calls[0]["clip_high"] == 0
    assert calls[1]["approx_kl"] > 0  # the second pass compares with the first pass's log-probs: the update moved it


def test_zero_variance_groups_are_counted_resampled_and_move_nothing(upstream, tmp_path, user_rewards):
    out = tmp_path / "flat"
    cfg = grpo.Config(**dict(FAST, rules={"grpo_rewards:flat": 1.0}, resample_rounds=2))
    grpo.run(cfg, TINY, out, dict(upstream))
    for r in _train_rows(out):  # every group, every round: no signal, up to the cap of 2 rounds
        assert r["zero_std"] == 1 and r["zero_std_after_resample"] == 1 and r["resampled_groups"] == 2 * 2, r
        assert r["policy_loss"] == 0 and r["grad_norm"] == 0
    policy, sft = load_file(out / "adapter_model.safetensors"), load_file(upstream["sft"] / "adapter_model.safetensors")
    assert all(torch.equal(policy[k], sft[k]) for k in sft)  # groups without signal do not move the policy

    out = tmp_path / "some"
    grpo.run(grpo.Config(**dict(FAST, rules={"grpo_rewards:some": 1.0}, resample_rounds=3, max_steps=3)), TINY,
             out, dict(upstream))
    rows = _train_rows(out)
    assert all(r["zero_std_after_resample"] <= r["zero_std"] for r in rows)
    assert sum(r["zero_std_after_resample"] for r in rows) < sum(r["zero_std"] for r in rows)  # resampling helped


@pytest.mark.parametrize("advantage,aggregation", [("rloo", "sequence"), ("dr_grpo", "constant")])
def test_other_estimators_and_aggregations_train(upstream, tmp_path, user_rewards, advantage, aggregation):
    out = tmp_path / advantage
    grpo.run(grpo.Config(**dict(FAST, max_steps=1, passes=1, rules={"grpo_rewards:vary": 1.0}),
                         advantage=advantage, loss_aggregation=aggregation), TINY, out, dict(upstream))
    (row,) = _train_rows(out)
    if aggregation == "sequence":  # ratio 1 and advantages summing to 0 per group: the mean of -A is 0
        assert row["policy_loss"] == pytest.approx(0.0, abs=1e-6)
    assert row["grad_norm"] > 0 and row["zero_std"] < 1
    policy, sft = load_file(out / "adapter_model.safetensors"), load_file(upstream["sft"] / "adapter_model.safetensors")
    assert any(not torch.equal(policy[k], sft[k]) for k in sft)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_length_sorted_forwards_give_the_update_of_one_forward(upstream, tmp_path, user_rewards, aggregation,
                                                               monkeypatch):
    """A minibatch of 8 responses in forwards of 3 (sorted by length, each cut to its own longest row) gives the
    loss, statistics and trained adapter of one padded forward of all 8, over two passes (the first filling the
    old log-probs) and with a KL term (reference log-probs cut the same way); so do forwards of 3 packed with
    shared prefixes (share_prefixes: rows sorted by their tokens, each group's prompt computed once)."""
    cfg = dict(FAST, max_steps=1, passes=2, kl_coef=0.1, loss_aggregation=aggregation,
               rules={"grpo_rewards:vary": 1.0})
    outs = {}
    packs = []
    monkeypatch.setattr(rollout, "prefix_tree", lambda *a, **k: packs.append(1) or prefix_tree(*a, **k))
    for fbs, share in ((0, False), (3, False), (3, True)):  # share: each forward packed with the group's prompt once
        outs[fbs, share] = tmp_path / f"fbs{fbs}-{share}"
        grpo.run(grpo.Config(**cfg, forward_batch_size=fbs, share_prefixes=share), TINY, outs[fbs, share],
                 dict(upstream))
        assert bool(packs) == share
    (one,) = _train_rows(outs[0, False])
    sft = load_file(upstream["sft"] / "adapter_model.safetensors")
    a = load_file(outs[0, False] / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], sft[k]) for k in sft)
    for variant in ((3, False), (3, True)):
        (split,) = _train_rows(outs[variant])
        for k in ("policy_loss", "grad_norm", "clipfrac", "entropy", "kl"):
            if k in one:
                assert split[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), (variant, k)
        b = load_file(outs[variant] / "adapter_model.safetensors")
        for k in a:  # Adam divides by sqrt(v): an element with a ~0 gradient moves by a noisy share of lr (1e-2)
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)


KILL_SCRIPT = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from deltalign.model.backbone import ModelConfig
from deltalign.sampling.generation import GenerationConfig
from deltalign.stages import grpo
grpo.run(grpo.Config(**{cfg}), ModelConfig(path="tiny"), Path(sys.argv[1]), {{"sft": Path(sys.argv[2])}})
"""


def test_killed_grpo_resumes_to_the_same_adapter(upstream, tmp_path, user_rewards):
    kw = dict(FAST, max_steps=4, checkpoint_every=1, kl_coef=0.05, passes=2, mini_batch_size=4,
              resample_rounds=1, rules={"grpo_rewards:some": 1.0})
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = dict(os.environ, DELTALIGN_TEST_KILL_AT_STEP="2", PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(cfg=repr(kw)), str(killed), str(upstream["sft"])],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 137, p.stderr[-3000:]
    assert (killed / "checkpoints").exists() and not (killed / "adapter_model.safetensors").exists()
    grpo.run(grpo.Config(**kw), TINY, killed, {"sft": upstream["sft"]})  # resumes from the step-2 checkpoint
    grpo.run(grpo.Config(**kw), TINY, straight, {"sft": upstream["sft"]})
    a = load_file(killed / "adapter_model.safetensors")
    b = load_file(straight / "adapter_model.safetensors")
    sft = load_file(upstream["sft"] / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(b[k], sft[k]) for k in b)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    rows = {d.name: _train_rows(d) for d in (killed, straight)}
    assert [r["step"] for r in rows["killed"]] == [1, 2, 3, 4]
    assert any(r["resampled_groups"] for r in rows["straight"][2:])  # resampling ran after the resume point
    for key in ("score", "zero_std", "zero_std_after_resample", "policy_loss", "kl"):
        assert [r[key] for r in rows["killed"]] == pytest.approx([r[key] for r in rows["straight"]], abs=1e-5), key


def test_clip_defaults_follow_the_importance_sampling_level():
    assert (grpo.Config().clip_low, grpo.Config().clip_high) == (0.2, 0.28)  # token level: DAPO's
    seq = grpo.Config(importance_sampling="sequence")
    assert (seq.clip_low, seq.clip_high) == (3e-4, 4e-4)  # GSPO's paper
    assert grpo.Config(importance_sampling="sequence", clip_high=1e-3).clip_high == 1e-3  # explicit wins
    with pytest.raises(ValueError, match="cispo"):
        grpo.Config(loss="cispo", importance_sampling="sequence")
    with pytest.raises(ValueError, match="overlong_cache"):
        grpo.Config(overlong_cache=49)  # the rollout's budget is 48 tokens


@pytest.mark.parametrize("variant", ["gspo", "cispo"])
def test_gspo_and_cispo_run_their_own_objective_over_two_passes(upstream, tmp_path, monkeypatch, user_rewards,
                                                                variant):
    """GSPO: one ratio per sequence, exactly 1 on the first pass (its log-probs are the old ones) and moved on
    the second; CISPO: the capped weight, and the token-level clipped loss is never called."""
    fn = {"gspo": "sequence_clipped_policy_loss", "cispo": "cispo_policy_loss"}[variant]
    calls, token_calls = [], []
    real, token = getattr(grpo, fn), grpo.clipped_policy_loss
    monkeypatch.setattr(grpo, fn, lambda *a, **k: calls.append(real(*a, **k)[1]) or real(*a, **k))
    monkeypatch.setattr(grpo, "clipped_policy_loss", lambda *a, **k: token_calls.append(1) or token(*a, **k))
    extra = {"gspo": dict(importance_sampling="sequence"), "cispo": dict(loss="cispo")}[variant]
    out = tmp_path / variant
    grpo.run(grpo.Config(**dict(FAST, max_steps=1, passes=2, rules={"grpo_rewards:vary": 1.0}), **extra),
             TINY, out, dict(upstream))
    assert len(calls) == 2 and not token_calls
    if variant == "gspo":
        assert calls[0]["ratio"] == 1 and calls[1]["ratio"] != 1
    else:
        assert calls[0]["clip_high"] == 0 and calls[0]["approx_kl"] == 0 and calls[1]["approx_kl"] > 0
    sft = load_file(upstream["sft"] / "adapter_model.safetensors")
    policy = load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(policy[k], sft[k]) for k in sft)


def test_soft_overlong_penalty_and_masked_truncations(upstream, tmp_path, user_rewards):
    """With a flat reward of 0 the score is the overlong penalty alone: -1 for every response cut at the budget
    (the random tiny model rarely stops); masking the truncated responses leaves nothing to learn from them."""
    base = dict(FAST, max_steps=1, passes=1, rules={"grpo_rewards:flat": 1.0})
    out = tmp_path / "overlong"
    grpo.run(grpo.Config(**base, overlong_cache=3), TINY, out, dict(upstream))
    (row,) = _train_rows(out)
    assert row["ended"] < 1
    assert row["score"] == pytest.approx(row["reward_overlong"]) and row["reward_overlong"] <= -(1 - row["ended"])
    out = tmp_path / "masked"
    grpo.run(grpo.Config(**dict(base, rules={"grpo_rewards:vary": 1.0}), mask_truncated=True), TINY, out,
             dict(upstream))
    (row,) = _train_rows(out)
    assert row["ended"] < 1 and row["masked_truncated"] == pytest.approx(1 - row["ended"])
    if row["ended"] == 0:  # every response truncated: no token trains
        assert row["grad_norm"] == 0
