"""The reward-model stage: only the rm delta trains, the head is saved and reloads to the same scores, scores sit at
the last non-pad token, training separates pairs, and bad rows fail naming file and row."""

import hashlib
import json

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.data.batching import pad_batch, pair_batch
from deltalign.data.formats import DataError
from deltalign.rewards.model import RewardModel, last_token_values, load_reward_model
from deltalign.stages import rm

TINY = ModelConfig(path="tiny")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run far faster on one thread; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def captured(monkeypatch):
    """Record every Backbone the stage loads, with a copy of its base weights and of each head as first built."""
    seen = {"backbones": [], "heads": {}}
    load, add_head = Backbone.load.__func__, Backbone.add_head

    def spy_load(cls, cfg):
        bb = load(cls, cfg)
        seen["backbones"].append((bb, {n: (p, p.detach().clone()) for n, p in bb.causal_lm.named_parameters()}))
        return bb

    def spy_add_head(self, name, trainable=True):
        head = add_head(self, name, trainable)
        seen["heads"][name] = {n: p.detach().clone() for n, p in head.named_parameters()}
        return head

    monkeypatch.setattr(Backbone, "load", classmethod(spy_load))
    monkeypatch.setattr(Backbone, "add_head", spy_add_head)
    return seen


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def separable(n=16):
    """Pairs a reward model separates at once: 'yes' answers are chosen, 'no' answers rejected."""
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": "yes " * (1 + i % 3),
             "rejected": "no " * (1 + (i * 7) % 3)} for i in range(n)]


def config(tmp_path, rows=None, **kw):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows or separable())
    base = dict(data=data, eval_data=data, init="fresh", lr=1e-2, batch_size=8, max_steps=3, checkpoint_every=0,
                log_every=1, eval_batch_size=8, delta=AdapterConfig(r=4, alpha=8, dropout=0.0))
    return rm.Config(**(base | kw))


def make_sft_dir(path, r=4):
    """A saved, non-trivial SFT adapter (random B, so it differs from the base)."""
    bb = Backbone.load(TINY)
    torch.manual_seed(3)
    bb.add_adapter("sft", AdapterConfig(r=r, alpha=2 * r, dropout=0.0))
    with torch.no_grad():
        for p in bb.adapter_parameters("sft").values():
            p.add_(torch.randn_like(p) * 0.1)
    bb.save_adapter("sft", path)
    return path


def file_digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_only_rm_adapter_and_head_train_and_sft_folder_is_untouched(tmp_path, captured):
    sft_dir = make_sft_dir(tmp_path / "sft")
    digests = file_digests(sft_dir)
    sft_tensors = load_file(str(sft_dir / "adapter_model.safetensors"))
    captured["backbones"].clear()
    rm.run(config(tmp_path, init="sft"), TINY, tmp_path / "rm", {"sft": sft_dir})

    assert file_digests(sft_dir) == digests  # same files, same bytes
    (bb, base), = captured["backbones"]
    for n, (p, value) in base.items():
        assert torch.equal(p, value), f"base parameter {n} changed"
    assert bb.adapters == ["rm"]
    assert {n for n, p in bb.named_parameters() if p.requires_grad} == \
        {f"model.{n}" for n in bb.adapter_parameters("rm")} | {"heads.rm.proj.weight", "heads.rm.proj.bias"}
    trained = get_peft_model_state_dict(bb.model, adapter_name="rm")
    assert trained.keys() == sft_tensors.keys()
    unchanged = [k for k in trained if torch.equal(trained[k], sft_tensors[k])]
    assert not unchanged, f"rm adapter tensors that did not train: {unchanged}"
    # the head's weight trains; its bias cannot: a Bradley-Terry loss sees only r_c - r_r, so the bias's gradient
    # is zero up to rounding (which Adam would blow up to a step of lr: whether it moves is float noise)
    assert not torch.equal(bb.heads["rm"].proj.weight, captured["heads"]["rm"]["proj.weight"]), "head did not train"
    saved = load_file(str(tmp_path / "rm" / "adapter_model.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_sft_init_starts_from_a_copy_of_the_sft_adapter(tmp_path):
    sft_dir = make_sft_dir(tmp_path / "sft", r=2)
    rm.run(config(tmp_path, init="sft", lr=0.0, max_steps=1), TINY, tmp_path / "rm", {"sft": sft_dir})
    a = load_file(str(sft_dir / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "rm" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "rm" / "adapter_config.json").read_text())["r"] == 2  # SFT's config, not rm's
    with pytest.raises(FileNotFoundError, match="sft"):
        rm.run(config(tmp_path, init="sft"), TINY, tmp_path / "rm2", {})


def test_training_separates_pairs_and_writes_eval_and_stats(tmp_path):
    out = tmp_path / "rm"
    metrics = rm.run(config(tmp_path, max_steps=6), TINY, out)
    before, after = metrics["before"], metrics["after"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] == 1.0 and after["margin"] > before["margin"]
    assert after["chosen_reward"] > after["rejected_reward"]
    train = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"loss", "accuracy", "chosen_reward", "rejected_reward", "margin"} <= train[0].keys()
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["accuracy"] >= train[0]["accuracy"]
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(metrics))
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats.keys() == {"mean", "std", "n"} and stats["n"] == 32 and stats["std"] > 0
    assert (out / "head.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_reloaded_reward_model_scores_like_the_trained_one(tmp_path, captured):
    rows = separable()
    out = tmp_path / "rm"
    rm.run(config(tmp_path, rows), TINY, out)
    (trained, _), = captured["backbones"]
    prompts = [r["prompt"] for r in rows] + ["Plain prompt:"]
    responses = [r["chosen"] for r in rows] + [" a plain answer"]
    expected = RewardModel(trained, "rm").score(prompts, responses)

    loaded = load_reward_model(TINY, out)
    torch.testing.assert_close(loaded.score(prompts, responses), expected, atol=1e-5, rtol=0)
    # onto a backbone PPO already holds: frozen, and the caller's active adapter stays active and trainable
    bb = Backbone.load(TINY)
    bb.add_adapter("policy", AdapterConfig(r=4), trainable=True)
    shared = RewardModel.load(bb, out)
    assert bb.active == "policy"
    assert {n for n, p in bb.named_parameters() if p.requires_grad} == \
        {f"model.{n}" for n in bb.adapter_parameters("policy")}
    torch.testing.assert_close(shared.score(prompts, responses), expected, atol=1e-5, rtol=0)
    # the saved statistics are those of the same scores over the training responses
    scores = shared.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    stats = json.loads((out / "reward_stats.json").read_text())
    assert scores.mean().item() == pytest.approx(stats["mean"], abs=1e-5)
    assert scores.std(correction=0).item() == pytest.approx(stats["std"], abs=1e-5)
    torch.testing.assert_close(shared.normalised(scores), (scores - stats["mean"]) / stats["std"])


def test_score_is_the_head_value_at_the_last_non_pad_token(tiny_backbone):
    bb = tiny_backbone
    bb.add_adapter("rm", AdapterConfig(r=4, dropout=0.0))
    bb.add_head("rm")
    with torch.no_grad():
        for p in bb.adapter_parameters("rm").values():
            p.add_(torch.randn_like(p) * 0.1)
    model = RewardModel(bb, "rm")
    short, long = model.tokenize("Say hi:", " hi"), model.tokenize("Say hi:", " hello there, friend")
    alone = model.score_ids(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
    right = pad_batch([short, long], bb.tokenizer.pad_token_id)
    left = pad_batch([short, long], bb.tokenizer.pad_token_id, pad_side="left")
    for b in (right, left):
        torch.testing.assert_close(model.score_ids(b["input_ids"], b["attention_mask"])[0], alone[0], atol=1e-5,
                                   rtol=0)
    with torch.no_grad():
        values = bb(right["input_ids"], right["attention_mask"], head="rm")
    assert not torch.allclose(values[0, -1], alone[0], atol=1e-4)  # the pad position would give another score
    # the stage's pair forward: chosen (short) and rejected (long) in one right-padded batch of 2 rows
    assert long[:len(short) - 3] == short[:-3]  # same prompt (and first response byte)
    item = {"prompt_ids": short[:-3], "chosen_ids": short[-3:], "rejected_ids": long[len(short) - 3:]}
    batch = pair_batch([item], bb.tokenizer.pad_token_id)
    with torch.no_grad(), bb.using("rm"):
        r_c, _ = rm.pair_scores(bb.eval(), batch)
    torch.testing.assert_close(r_c[0], alone[0], atol=1e-5, rtol=0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_values(torch.arange(10.0).view(2, 5), mask).tolist() == [2.0, 9.0]


@pytest.mark.parametrize("bad, field", [({"rejected": "yes "}, "chosen"), ({"rejected": "  "}, "rejected")])
def test_bad_pair_fails_naming_file_and_row(tmp_path, bad, field):
    rows = separable(4)
    rows[1] = rows[1] | {"chosen": "yes "} | bad
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"bad\.jsonl: row 1: field '{field}'"):
        rm.run(config(tmp_path, data=data), TINY, tmp_path / "rm")
    assert not (tmp_path / "rm" / "adapter_model.safetensors").exists()


def test_hh_rows_with_margins_train(tmp_path):
    rows = [{"chosen": f"\n\nHuman: Say {w}.\n\nAssistant: {w}!", "rejected": f"\n\nHuman: Say {w}.\n\nAssistant: No.",
             "margin": float(i % 3)} for i, w in enumerate(["hi", "yes", "ok", "bye", "go", "up", "red", "sun"])]
    losses = []
    for use_margin in (True, False):
        out = tmp_path / f"rm-{use_margin}"
        metrics = rm.run(config(tmp_path, rows, margin=use_margin, max_steps=1), TINY, out)
        assert metrics["after"]["accuracy"] is not None and (out / "head.safetensors").is_file()
        train = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert next(r for r in train if r["kind"] == "setup")["train_pairs"] == len(rows)
        losses.append(next(r for r in train if r["kind"] == "train")["loss"])
    assert losses[0] > losses[1]  # same forward; the margins (>= 0) raise the loss
