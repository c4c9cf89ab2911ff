"""KTO: unpaired rows (or pairs split in two), a policy copy of the frozen SFT delta, the reference point from rows
of a different prompt; hand-checked first step, only the policy trains, the graph and the bad-input cases."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.data.rows import DataError
from deltalign.data.unpaired import unpaired_examples
from deltalign.stages import kto

FAST = dict(batch_size=4, max_steps=2, log_every=1, checkpoint_every=0, eval_checker=False, lr=5e-3)


@pytest.fixture
def sft_dir(tmp_path):
    bb = Backbone.load(ModelConfig(path="tiny"))
    torch.manual_seed(3)
    bb.add_adapter("sft", AdapterConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for p in bb.adapter_parameters("sft").values():
            p.add_(torch.randn_like(p) * 0.05)
    bb.save_adapter("sft", tmp_path / "sft")
    return tmp_path / "sft"


def _rows(out, kind="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_unpaired_rows_labels_and_split_pairs():
    rows = [{"prompt": "Q1", "completion": "A1", "label": True},
            {"prompt": [{"role": "user", "content": "Q2"}], "completion": "A2", "label": False},
            {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}], "label": True},
            {"prompt": "Q4", "chosen": "good", "rejected": "bad"}]
    ex = unpaired_examples(rows, "f.jsonl")
    assert [(e.completion, e.desirable, e.row) for e in ex] == [
        ("A1", True, 0), ("A2", False, 1), ("A3", True, 2), ("good", True, 3), ("bad", False, 3)]
    assert ex[1].conversational and not ex[0].conversational and ex[3].prompt == ex[4].prompt == "Q4"


@pytest.mark.parametrize("row, what", [
    ({"prompt": "Q", "completion": "A"}, "f.jsonl: row 1: field 'label': missing"),
    ({"prompt": "Q", "completion": "A", "label": "yes"}, "f.jsonl: row 1: field 'label': expected true or false"),
    ({"prompt": "Q", "label": True}, "f.jsonl: row 1: field 'completion'"),
])
def test_bad_unpaired_rows_name_file_row_and_field(row, what):
    good = {"prompt": "Q", "completion": "A", "label": True}
    with pytest.raises(DataError, match=what):
        unpaired_examples([good, row], "f.jsonl")
    assert len(unpaired_examples([good, row], "f.jsonl", bad_rows="skip", log=lambda line: None)) == 1


def test_mismatched_completions_come_from_another_prompt():
    items = [{"prompt_ids": p} for p in ([1], [1], [2], [2], [3])]
    pairs, weight = kto.mismatched(items, [0, 1, 2, 3, 4])
    assert weight == 1.0 and all(items[i]["prompt_ids"] != items[j]["prompt_ids"]
                                 for i, j in zip([0, 1, 2, 3, 4], pairs))
    assert kto.mismatched(items, [0, 1]) == ([0, 1], 0.0)  # one prompt: its forwards run, its pairs do not count


def test_batch_of_one_is_refused():
    with pytest.raises(ValueError, match="kto.batch_size must be >= 2"):
        kto.Config(batch_size=1)


def test_first_step_is_one_half_per_row_and_only_the_policy_trains(tmp_path, sft_dir):
    """At step 0 the policy is the SFT delta: every implied reward and z0 are 0, so the loss is
    (w_D n_D / 2 + w_U n_U / 2) / n. Then only the kto delta moves; the SFT delta on disk stays bit-identical."""
    before = load_file(sft_dir / "adapter_model.safetensors")
    cfg = kto.Config(**FAST, desirable_weight=1.0, undesirable_weight=3.0)
    out = tmp_path / "kto"
    kto.run(cfg, ModelConfig(path="tiny"), out, {"sft": sft_dir})
    first, second = _rows(out)
    (setup,) = _rows(out, "setup")
    assert first["kl"] == 0 and first["reward_desirable"] == 0 and first["reward_undesirable"] == 0
    # embedded pairs split in two: batches of 4 rows; the loss is a mean over the step's rows
    assert 0.5 <= first["loss"] <= 1.5  # between all desirable (w_D / 2) and all undesirable (w_U / 2)
    assert setup["train_rows"] == 2 * setup["desirable"]
    assert second["kl"] >= 0
    policy = load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(policy[k], before[k]) for k in before)
    assert all(torch.equal(load_file(sft_dir / "adapter_model.safetensors")[k], before[k]) for k in before)


def test_first_step_loss_by_hand_from_the_step_rows(tmp_path, sft_dir, monkeypatch):
    """The step's loss is the weighted mean of 1/2 over its rows: recover the rows' labels from the batches."""
    seen = []
    real = kto.kto_loss
    monkeypatch.setattr(kto, "kto_loss", lambda *a, **k: seen.append(a[2].clone()) or real(*a, **k))
    out = tmp_path / "kto"
    kto.run(kto.Config(**dict(FAST, max_steps=1), desirable_weight=1.0, undesirable_weight=3.0),
            ModelConfig(path="tiny"), out, {"sft": sft_dir})
    good = torch.cat(seen)
    want = (0.5 * int(good.sum()) + 1.5 * int((~good).sum())) / len(good)
    assert _rows(out)[0]["loss"] == pytest.approx(want, abs=1e-7)


def test_kto_in_the_graph_and_export():
    from deltalign.pipeline import graph
    from deltalign.stages import export

    assert graph.STAGES["kto"].needs(kto.Config()) == ["sft"]
    assert graph.STAGES["kto"].needs(kto.Config(reference="base", init="fresh")) == []
    assert "kto" in export.ALIGNED and "kto" in graph.STAGES["export"].uses
    assert math.isfinite(kto.Config().beta)
