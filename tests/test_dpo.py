"""DPO stage: reference = the frozen SFT adapter, policy = a separate trainable copy, one backbone."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.model.labelled import response_logprobs
from deltalign.data.batching import length_grouped_batches, pair_batch
from deltalign.data.formats import load_rows, preference_examples
from deltalign.data.tokenize import tokenize_all, tokenize_pair
from deltalign.losses import dpo_sigmoid_loss
from deltalign.stages import dpo

FAST = dict(batch_size=4, max_steps=3, log_every=1, checkpoint_every=0, eval_checker=False, lr=5e-3)


@pytest.fixture
def sft_dir(tmp_path):
    """A trained-looking SFT adapter (random non-zero deltas) saved in PEFT format."""
    bb = Backbone.load(ModelConfig(path="tiny"))
    torch.manual_seed(3)
    bb.add_adapter("sft", AdapterConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for p in bb.adapter_parameters("sft").values():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "sft"
    bb.save_adapter("sft", out)
    return out


def test_policy_and_reference_are_separate_copies_and_step0_loss_is_ln2(sft_dir):
    bb = Backbone.load(ModelConfig(path="tiny"))
    bb.load_adapter("ref", sft_dir, trainable=False)
    bb.load_adapter("dpo", sft_dir, trainable=True)
    ref_p, pol_p = bb.adapter_parameters("ref"), bb.adapter_parameters("dpo")
    assert {id(p) for p in ref_p.values()}.isdisjoint({id(p) for p in pol_p.values()})
    ex = preference_examples(load_rows("embedded:pref_train")[:4], "embedded:pref_train")
    items, _ = tokenize_all(ex, tokenize_pair, bb.tokenizer, 256, "embedded:pref_train")
    batch = pair_batch(items, bb.tokenizer.pad_token_id)
    bb.eval()
    bb.activate("dpo")
    pol = response_logprobs(bb, bb, batch)
    with bb.using("ref"):
        ref = response_logprobs(bb, bb, batch)
    with bb.using(None):
        base = response_logprobs(bb, bb, batch)
    assert not torch.allclose(ref, base)  # the SFT reference differs from "adapters off"
    loss, _, _ = dpo_sigmoid_loss(pol[:4], pol[4:], ref[:4], ref[4:], beta=0.1)
    torch.testing.assert_close(loss, torch.full((4,), torch.log(torch.tensor(2.0)).item()), atol=1e-6, rtol=0)


def _run(tmp_path, sft_dir, **overrides):
    cfg = dpo.Config(**{**FAST, "delta": AdapterConfig(r=4), **overrides})
    out = tmp_path / "dpo"
    metrics = dpo.run(cfg, ModelConfig(path="tiny"), out, {"sft": sft_dir})
    return out, metrics


def test_dpo_trains_only_the_policy_and_caches_reference(tmp_path, sft_dir):
    before = {f.name: f.read_bytes() for f in sft_dir.iterdir()}
    out, _ = _run(tmp_path, sft_dir)
    after = {f.name: f.read_bytes() for f in sft_dir.iterdir()}
    assert before == after  # the SFT run folder is never modified
    sft_w, dpo_w = load_file(str(sft_dir / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert sft_w.keys() == dpo_w.keys()
    assert any(not torch.equal(sft_w[k], dpo_w[k]) for k in sft_w)
    held = json.loads((out / "eval.json").read_text())["heldout_pairs"]
    assert held["n"] == 100 and 0.0 <= held["reward_accuracy"] <= 1.0
    caches = list(out.glob("ref_logprobs-*.safetensors"))
    assert len(caches) == 1
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and {"loss", "chosen_reward", "rejected_reward", "accuracy", "margin"} <= train[0].keys()
    # a second run with the same reference and data reuses the cache (same key)
    cached = load_file(str(caches[0]))["logprobs"]
    bb = Backbone.load(ModelConfig(path="tiny"))
    bb.load_adapter(dpo.REFERENCE, sft_dir)
    ex = preference_examples(load_rows("embedded:pref_train"), "embedded:pref_train")
    items, _ = tokenize_all(ex, tokenize_pair, bb.tokenizer, 256, "embedded:pref_train")
    assert caches[0].name == f"ref_logprobs-{dpo.cache_key(bb, items)}.safetensors"
    used = [i for i in range(len(items)) if not torch.isnan(cached[i, 0])]
    assert len(used) == 3 * 4  # computed once for each pair the 3 steps of 4 pairs touched, nothing else
    fresh = dpo.pair_logprobs(bb, bb, [items[i] for i in used], 4, "cpu", dpo.REFERENCE)
    torch.testing.assert_close(cached[used], fresh, atol=1e-5, rtol=1e-5)


def test_cached_and_recomputed_reference_give_the_same_training(tmp_path, sft_dir):
    a, _ = _run(tmp_path / "a", sft_dir)
    b, _ = _run(tmp_path / "b", sft_dir, cache_reference=False)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def _train_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture
def sft_dir_dropout(tmp_path):
    """Like ``sft_dir`` but with the default adapter dropout (0.05) in its saved config."""
    bb = Backbone.load(ModelConfig(path="tiny"))
    torch.manual_seed(3)
    bb.add_adapter("sft", AdapterConfig(r=4))
    assert AdapterConfig().dropout == 0.05
    with torch.no_grad():
        for p in bb.adapter_parameters("sft").values():
            p.add_(torch.randn_like(p) * 0.05)
    bb.save_adapter("sft", tmp_path / "sft-dropout")
    return tmp_path / "sft-dropout"


def test_first_loss_is_ln2_with_adapter_dropout_configured(tmp_path, sft_dir_dropout):
    """disable_dropout (default on): the policy's training forward is the reference's function, so the first
    sigmoid loss is ln 2 even though the adapters carry dropout 0.05; with dropout left on it is not."""
    ln2 = float(torch.log(torch.tensor(2.0)))
    out, _ = _run(tmp_path / "off", sft_dir_dropout, nll_weight=0.0, max_steps=1)
    assert abs(_train_rows(out)[0]["loss"] - ln2) < 1e-6
    out, _ = _run(tmp_path / "on", sft_dir_dropout, nll_weight=0.0, max_steps=1, disable_dropout=False)
    assert abs(_train_rows(out)[0]["loss"] - ln2) > 1e-4


def test_pair_loss_hand_values():
    """IPO per-token (default) vs summed log-ratios; SimPO with its own beta (dpo.beta plays no part)."""
    pol, ref, lengths = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0]), torch.tensor([2.0, 4.0])
    ipo = dpo.Config(loss="ipo", beta=0.1)
    # per token: h = (-10+12)/2 - (-20+18)/4 = 1.5; loss = (1.5 - 1/(2*0.1))^2 = 12.25
    assert dpo.pair_loss(ipo, pol, ref, lengths)[0].item() == pytest.approx(12.25)
    # summed: h = 2 - (-2) = 4; loss = (4 - 5)^2 = 1
    ipo.ipo_normalize = False
    assert dpo.pair_loss(ipo, pol, ref, lengths)[0].item() == pytest.approx(1.0)
    lengths = torch.tensor([2.0, 5.0])
    for beta in (0.1, 7.0):  # rc = 2 * -10/2 = -10, rr = 2 * -20/5 = -8: loss = softplus(-(-10 + 8 - 0.5))
        simpo = dpo.Config(loss="simpo", beta=beta, simpo_beta=2.0, simpo_gamma=0.5)
        loss, rc, rr = dpo.pair_loss(simpo, pol, ref, lengths)
        assert loss.item() == pytest.approx(math.log1p(math.exp(2.5)))
        assert (rc.item(), rr.item()) == pytest.approx((-10.0, -8.0))


def test_rpo_nll_is_a_mean_over_the_steps_chosen_tokens(tmp_path, sft_dir):
    """Step 1 (policy == SFT): nll_chosen = -(sum of chosen-token log-probs) / (number of chosen tokens) over
    the step's pairs, and loss = ln 2 + nll_weight * nll_chosen."""
    out, _ = _run(tmp_path, sft_dir, nll_weight=2.0, max_steps=1, grad_accum=2, batch_size=2)
    row = _train_rows(out)[0]
    bb = Backbone.load(ModelConfig(path="tiny"))
    bb.load_adapter("sft", sft_dir)
    ex = preference_examples(load_rows("embedded:pref_train"), "embedded:pref_train")
    items, _ = tokenize_all(ex, tokenize_pair, bb.tokenizer, 256, "embedded:pref_train")
    lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in items]
    step = [i for b in length_grouped_batches(lengths, 2, 0, 0)[:2] for i in b]  # the first step's 2 x 2 pairs
    lp = dpo.pair_logprobs(bb, bb, [items[i] for i in step], 4, "cpu", "sft")[:, 0]
    nll = float(-lp.sum() / sum(len(items[i]["chosen_ids"]) for i in step))
    assert row["nll_chosen"] == pytest.approx(nll, abs=2e-6)
    assert row["loss"] == pytest.approx(math.log(2) + 2.0 * nll, abs=5e-6)


@pytest.mark.parametrize("loss,first_loss", [("ipo", (1 / (2 * 0.1)) ** 2), ("simpo", None)])
def test_other_losses_first_step(tmp_path, sft_dir, loss, first_loss):
    """IPO's first loss is (1/(2 beta))^2 (policy == reference); SimPO's follows from its logged rewards."""
    out, _ = _run(tmp_path, sft_dir, loss=loss, batch_size=1)
    row = _train_rows(out)[0]
    if first_loss is None:  # one pair per step: loss = -logsigmoid(r_c - r_r - gamma)
        first_loss = math.log1p(math.exp(-(row["chosen_reward"] - row["rejected_reward"] - 0.5)))
    assert row["loss"] == pytest.approx(first_loss, abs=1e-5)
    assert (out / "adapter_model.safetensors").exists()


def test_base_reference_when_no_sft(tmp_path):
    """No SFT at all: the reference is the base with adapters off and a fresh policy starts equal to it (LoRA B
    starts at 0), so the first loss is ln 2."""
    cfg = dpo.Config(**FAST, reference="base", init="fresh", delta=AdapterConfig(r=4))
    dpo.run(cfg, ModelConfig(path="tiny"), tmp_path / "dpo", {})
    assert _train_rows(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_orpo_config_needs_no_reference_and_refuses_one():
    orpo = dpo.Config(loss="orpo")
    assert orpo.reference == "none" and orpo.nll_weight == 1.0  # ORPO = the chosen NLL + lambda x odds ratio
    assert dpo.Config().reference == "sft" and dpo.Config().nll_weight == 0.0  # the others: unchanged defaults
    assert dpo.Config(loss="orpo", nll_weight=0.5).nll_weight == 0.5
    for ref in ("sft", "base"):
        with pytest.raises(ValueError, match="dpo.loss=orpo uses no reference"):
            dpo.Config(loss="orpo", reference=ref)
    with pytest.raises(ValueError, match="dpo.reference=none"):
        dpo.Config(loss="sigmoid", reference="none")


def test_orpo_pair_loss_hand_value():
    # summed log-probs and lengths: chosen -2 over 4 tokens (mean -0.5), rejected -3 over 3 (mean -1)
    pol, lengths = torch.tensor([-2.0, -3.0], dtype=torch.float64), torch.tensor([4.0, 3.0], dtype=torch.float64)
    loss, rc, rr = dpo.pair_loss(dpo.Config(loss="orpo", orpo_lambda=0.2), pol, torch.zeros(2), lengths)
    log_odds = 0.5 - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-1.0)))
    assert loss.item() == pytest.approx(-0.2 * math.log(1 / (1 + math.exp(-log_odds))), abs=1e-12)
    assert (rc.item(), rr.item()) == pytest.approx((0.2 * -0.5, 0.2 * -1.0))


def test_orpo_from_the_base_loads_no_reference_and_caches_nothing(tmp_path, monkeypatch):
    """ORPO straight from the base: no SFT folder, no reference delta, no reference log-probs; step 1's loss is
    the chosen NLL plus lambda x the odds-ratio term, both read back from its own logged parts."""
    calls = []
    real = dpo.pair_logprobs
    monkeypatch.setattr(dpo, "pair_logprobs", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    cfg = dpo.Config(**FAST, loss="orpo", init="fresh", delta=AdapterConfig(r=4))
    dpo.run(cfg, ModelConfig(path="tiny"), tmp_path / "dpo", {})
    assert calls and set(calls) == {"dpo"}  # held-out pairs score the policy alone: no reference forward at all
    assert not list((tmp_path / "dpo").glob("ref_logprobs-*"))
    row = _train_rows(tmp_path / "dpo")[0]
    assert row["loss"] == pytest.approx(row["nll_chosen"] + row["odds_ratio_loss"], abs=1e-6)
    assert row["odds_ratio_loss"] > 0
    sft_free = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert sft_free  # the fresh delta trained and was saved


def test_orpo_needs_no_sft_stage_in_the_graph():
    from deltalign.pipeline import graph

    assert graph.STAGES["dpo"].needs(dpo.Config(loss="orpo", init="fresh")) == []
    assert graph.STAGES["dpo"].needs(dpo.Config(loss="orpo")) == ["sft"]  # init: sft still reads it
    assert graph.STAGES["dpo"].needs(dpo.Config()) == ["sft"]
