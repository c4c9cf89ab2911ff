"""PPO: four roles on one backbone, rollout tensors, composite rewards, training touches only policy and critic,
and a killed run resumes to the same result."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tensor_storages
from deltalign.model.backbone import Backbone, ModelConfig
from deltalign.model.labelled import response_logprobs
from deltalign.data.batching import pad_batch
from deltalign.data.formats import DataError, prompt_examples
from deltalign.sampling.generation import GenerationConfig
from deltalign.rewards.composite import CompositeReward
from deltalign.stages import ppo

TINY = ModelConfig(path="tiny")
FAST = dict(batch_size=4, mini_batch_size=2, passes=2, max_steps=2, log_every=1, checkpoint_every=0,
            eval_limit=4, rules={"checker": 1.0}, lr=1e-2, rollout=GenerationConfig(max_new_tokens=6, temperature=1.0),
            generation=GenerationConfig(max_new_tokens=6))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rollout_batch_positions_predict_each_response_token():
    b = ppo.rollout_batch([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 9, 10]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # position t's hidden state predicts token t+1: response token k of row b is predicted at len(prompt)-1+k
    assert b["positions"].tolist() == [[2, 3, 4], [1, 2, 3]]
    assert b["response_ids"].tolist() == [[6, 7, 0], [8, 9, 10]]
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_policy_logprobs_agree_with_labelled_response_logprobs(tiny_backbone):
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15, 16]]
    b = ppo.rollout_batch(prompts, responses, tiny_backbone.tokenizer.pad_token_id)
    lp = ppo.policy_logprobs(tiny_backbone, tiny_backbone, b, temperature=1.0)
    lp_sum = (lp * b["response_mask"]).sum(1)
    ref = response_logprobs(tiny_backbone, tiny_backbone, pad_batch(
        [p + r for p, r in zip(prompts, responses)], tiny_backbone.tokenizer.pad_token_id,
        labels=[[-100] * len(p) + r for p, r in zip(prompts, responses)]))
    torch.testing.assert_close(lp_sum, ref, atol=1e-5, rtol=0)
    hot = ppo.policy_logprobs(tiny_backbone, tiny_backbone, b, temperature=2.0)
    assert not torch.allclose(hot, lp)  # log-probs follow the sampling temperature


def test_explained_variance_hand_values():
    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert ppo.explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    # residual [0, 0, 1] has variance 2/9 against var(returns) = 2/3 -> 1 - 1/3
    assert ppo.explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), returns, mask) == pytest.approx(2 / 3)


def test_one_backbone_holds_all_four_roles(upstream):
    # tensors alive before do not count: a traceback kept by pytest from an import inside the fixture can hold the
    # fixture's own backbone, depending on which tests ran first
    before = tensor_storages()
    bb, rm = ppo.load_roles(ppo.Config(**FAST), TINY, upstream)
    assert sorted(bb.adapters) == ["critic", "ppo", "rm", "sft"] and bb.active == "ppo"
    assert sorted(bb.heads) == ["critic", "rm"] and rm.backbone is bb
    embed = bb.causal_lm.get_input_embeddings().weight
    assert tensor_storages(embed.shape) - before == {embed.untyped_storage().data_ptr()}  # one copy of the base weights
    for name, trainable in [("sft", False), ("rm", False), ("ppo", True), ("critic", True)]:
        assert all(p.requires_grad == trainable for p in bb.adapter_parameters(name).values()), name
    # the critic starts as the normalised reward: (w.h + b - mean) / std, with mean 0.5 and std 2
    rm_head, critic_head = bb.heads["rm"].proj, bb.heads["critic"].proj
    torch.testing.assert_close(critic_head.weight, rm_head.weight / 2.0)
    torch.testing.assert_close(critic_head.bias, (rm_head.bias - 0.5) / 2.0)
    assert not any(p.requires_grad for p in bb.heads["rm"].parameters())


def test_training_changes_only_policy_and_critic(upstream, tmp_path, monkeypatch):
    loaded = []
    load = Backbone.load.__func__

    def spy(cls, cfg):
        bb = load(cls, cfg)
        loaded.append((bb, {n: p.detach().clone() for n, p in bb.causal_lm.named_parameters()}))
        return bb

    monkeypatch.setattr(Backbone, "load", classmethod(spy))
    before = {k: _digest(v) for k, v in upstream.items()}
    out = tmp_path / "ppo"
    report = ppo.run(ppo.Config(**FAST), TINY, out, dict(upstream))

    bb, base = loaded[0]  # base: every weight as loaded, before any adapter was attached
    current = {n.replace(".base_layer", ""): p for n, p in bb.causal_lm.named_parameters() if "lora_" not in n}
    assert set(base) <= set(current) and len(base) > 10
    for n, p in base.items():  # the frozen base: bit-identical after training
        assert torch.equal(current[n], p), n
    from peft.utils import get_peft_model_state_dict

    for role in ("sft", "rm"):  # the frozen reference and reward adapters: bit-identical to their files
        on_disk = load_file(upstream[role] / "adapter_model.safetensors")
        in_memory = get_peft_model_state_dict(bb.model, adapter_name=role)
        assert in_memory.keys() == on_disk.keys() and on_disk
        for k, v in on_disk.items():
            assert torch.equal(in_memory[k], v), (role, k)
    rm_head = load_file(upstream["rm"] / "head.safetensors")
    assert all(torch.equal(bb.heads["rm"].state_dict()[k], v) for k, v in rm_head.items())
    assert {k: _digest(v) for k, v in upstream.items()} == before  # upstream folders only read
    policy, sft = load_file(out / "adapter_model.safetensors"), load_file(upstream["sft"] / "adapter_model.safetensors")
    assert policy.keys() == sft.keys() and any(not torch.equal(policy[k], sft[k]) for k in policy)
    critic, rmw = load_file(out / "critic" / "adapter_model.safetensors"), load_file(upstream["rm"] / "adapter_model.safetensors")
    assert any(not torch.equal(critic[k], rmw[k]) for k in critic)
    assert (out / "critic" / "head.safetensors").exists()
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2
    for key in ["score", "reward_rm", "reward_checker", "kl", "entropy", "clipfrac", "approx_kl", "value_loss",
                "explained_variance", "response_length", "time_generate", "time_score", "time_optimise"]:
        assert all(key in r for r in train), key
    assert set(report) == {"reference", "ppo", "data"} and "rm_score" in report["ppo"]


def test_shared_prefixes_train_like_padded_batches(upstream, tmp_path, monkeypatch):
    """share_prefixes packs every PPO forward (reference, old log-probs and values, the updates' policy and critic
    forwards, reward-model scores); the run trains as the padded one does."""
    from deltalign.sampling import rollout
    from deltalign.data.sharing import prefix_tree

    packs = []
    monkeypatch.setattr(rollout, "prefix_tree", lambda *a, **k: packs.append(1) or prefix_tree(*a, **k))
    cfg = dict(FAST, max_steps=1, eval_limit=0, eval_checker=False)
    outs = {share: tmp_path / f"ppo-{share}" for share in (False, True)}
    for share, out in outs.items():
        ppo.run(ppo.Config(**cfg, share_prefixes=share), TINY, out, dict(upstream))
        assert bool(packs) == share
    rows = [next(r for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
            for o in outs.values()]
    for k in ("score", "kl", "policy_loss", "value_loss", "entropy", "explained_variance"):
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-4, abs=1e-6), k
    for f in ("adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/head.safetensors"):
        a, b = (load_file(o / f) for o in outs.values())
        for k in a:  # Adam: an element with a ~0 gradient moves by a noisy share of lr (1e-2)
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)


def test_first_update_has_ratio_one_with_adapter_dropout_configured(upstream, tmp_path):
    """The SFT adapter carries dropout 0.05. With disable_dropout (default) the old log-probs (taken after the
    reward model scored, which switches modes) and the first update's log-probs are one function: approx_kl and
    clipfrac are 0. With dropout left on they are not (the test can fail)."""
    one_update = dict(FAST, passes=1, mini_batch_size=4, max_steps=1, eval_limit=0, eval_checker=False)
    for disable, expect_zero in ((True, True), (False, False)):
        out = tmp_path / f"ppo-{disable}"
        ppo.run(ppo.Config(**one_update, disable_dropout=disable), TINY, out, dict(upstream))
        row = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train")
        if expect_zero:
            assert row["approx_kl"] == 0 and row["clipfrac"] == 0, row
        else:
            assert row["approx_kl"] != 0, row
    # two minibatches at a learning rate too small to move a weight: the second minibatch's old log-probs come
    # from the separate no-grad forward (the first's from the update's own forward); the ratio is still 1
    out = tmp_path / "ppo-two-minibatches"
    ppo.run(ppo.Config(**(one_update | dict(mini_batch_size=2, lr=1e-30))), TINY, out, dict(upstream))
    row = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
    assert row["approx_kl"] == 0 and row["clipfrac"] == 0, row


def test_first_minibatch_keeps_the_critic_graph_only_where_checkpointing_makes_it_small(upstream, tmp_path,
                                                                                         monkeypatch):
    """The first minibatch's old values: from the critic's training forward with full checkpointing (its graph is
    then each layer's input), from a no-grad forward over every row otherwise (a second whole graph would double
    the training memory). Either way they are the training forward's values: the first update clips none."""
    calls = []
    critic_values = ppo.critic_values

    def recording(model, batch, share_prefixes=False):
        calls.append((torch.is_grad_enabled(), batch["input_ids"].shape[0]))
        return critic_values(model, batch, share_prefixes)

    monkeypatch.setattr(ppo, "critic_values", recording)
    one_update = dict(FAST, passes=1, mini_batch_size=4, max_steps=1, eval_limit=0, eval_checker=False)
    for checkpointing, expected in ((False, [(False, 4), (True, 4)]), (True, [(True, 4)])):
        calls.clear()
        out = tmp_path / f"ppo-{checkpointing}"
        ppo.run(ppo.Config(**one_update), ModelConfig(path="tiny", gradient_checkpointing=checkpointing), out,
                dict(upstream))
        assert calls == expected, checkpointing
        row = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train")
        assert row["value_clipfrac"] == 0 and row["approx_kl"] == 0, row


def test_killed_ppo_resumes_with_adapters_and_kl_controller(tmp_path):
    sets = ["--set", "ppo.max_steps=4", "--set", "ppo.checkpoint_every=1", "--set", "ppo.kl_target=0.01", "--set", "ppo.kl_horizon=20",
            "--set", "ppo.eval_checker=false", "--set", "ppo.lr=1e-2"]
    base = tmp_path / "base"  # real sft and rm stage folders (with manifests), shared by both runs
    run_cli(["run", "sft", "rm", "--config", "configs/tiny.yaml", "--run-dir", str(base)])
    dirs = {label: tmp_path / label for label in ("killed", "straight")}
    for run_dir in dirs.values():
        for stage in ("sft", "rm"):
            shutil.copytree(base / stage, run_dir / stage)
    args = ["run", "ppo", "--config", "configs/tiny.yaml", *sets]
    p = run_cli([*args, "--run-dir", str(dirs["killed"])], env={"DELTALIGN_TEST_KILL_AT_STEP": "2"}, check=False)
    assert p.returncode == 137
    assert (dirs["killed"] / "ppo" / "checkpoints").exists()
    resumed = run_cli([*args, "--run-dir", str(dirs["killed"])])
    assert "resuming" in resumed.stdout + resumed.stderr
    run_cli([*args, "--run-dir", str(dirs["straight"])])
    a = load_file(dirs["killed"] / "ppo" / "adapter_model.safetensors")
    b = load_file(dirs["straight"] / "ppo" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    rows = {label: [json.loads(r) for r in (d / "ppo" / "metrics.jsonl").read_text().splitlines()]
            for label, d in dirs.items()}
    coef = {label: [r["kl_coef"] for r in rs if r["kind"] == "train"] for label, rs in rows.items()}
    assert len(coef["killed"]) == 4 and coef["killed"] == pytest.approx(coef["straight"], rel=1e-6)
    assert coef["straight"][0] != coef["straight"][-1]  # the adaptive controller moved (its state was restored)


def test_composite_reward_weights_rules_and_user_functions(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompts, responses):\n    return [-len(r.split()) for r in responses]\n"
        "def broken(prompts, responses):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = CompositeReward(rules={"checker": 2.0, "myrewards:brevity": 0.5})
    prompts = ["Answer in all lowercase letters. What is rain?", "Answer in all lowercase letters. Why?"]
    total, parts = reward(prompts, ["water from clouds", "Because"])
    assert parts["checker"].tolist() == [1.0, 0.0]
    assert parts["myrewards:brevity"].tolist() == [-3.0, -1.0]
    assert total.tolist() == [2.0 - 1.5, 0.0 - 0.5]
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        CompositeReward(rules={"myrewards:broken": 1.0})(prompts, ["a", "b"])
    with pytest.raises(ValueError, match="cannot be imported"):
        CompositeReward(rules={"nosuchmodule:f": 1.0})
    with pytest.raises(ValueError, match="no reward source"):
        CompositeReward()


def test_prompt_examples_accept_every_shape_and_name_bad_rows():
    rows = [{"prompt": "plain"}, {"prompt": [{"role": "user", "content": "chat"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "p", "chosen": "c", "rejected": "r"}]
    exs = prompt_examples(rows, "prompts.jsonl")
    assert [e.prompt for e in exs] == ["plain", [{"role": "user", "content": "chat"}],
                                       [{"role": "user", "content": "q"}], "p"]
    assert [e.conversational for e in exs] == [False, True, True, False]
    with pytest.raises(DataError, match=r"prompts.jsonl: row 1: no prompt"):
        prompt_examples([{"prompt": "ok"}, {"question": "?"}], "prompts.jsonl")
    with pytest.raises(DataError, match=r"row 0: field 'prompt'"):
        prompt_examples([{"prompt": 3}], "prompts.jsonl")
