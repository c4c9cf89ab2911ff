"""DPO stage: reference = the frozen SFT adapter, policy = a separate trainable copy, one backbone."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltalign.backbone import AdapterConfig, Backbone, ModelConfig, response_logprobs
from deltalign.data.batching import pair_batch
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
    cfg = dpo.Config(**{**FAST, "adapter": AdapterConfig(r=4), **overrides})
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
    assert len(train) == 3 and {"loss", "reward_chosen", "reward_rejected", "accuracy", "margin"} <= train[0].keys()
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


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_other_losses_run(tmp_path, sft_dir, loss):
    out, _ = _run(tmp_path, sft_dir, loss=loss, beta=2.0 if loss == "simpo" else 0.1)
    assert (out / "adapter_model.safetensors").exists()


def test_base_reference_when_no_sft(tmp_path):
    cfg = dpo.Config(**FAST, reference="base", init="fresh", adapter=AdapterConfig(r=4))
    dpo.run(cfg, ModelConfig(path="tiny"), tmp_path / "dpo", {})
    assert (tmp_path / "dpo" / "adapter_model.safetensors").exists()


def test_bad_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="dpo.loss"):
        dpo.Config(loss="hinge-ish")
