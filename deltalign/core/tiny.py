"""A tiny random Llama and a tiny byte-level tokenizer, built on the fly with no downloads.

`configs/tiny.yaml` points `model.path` at ``tiny``: the backbone loader then calls :func:`ensure` to build (once)
a deterministic ~0.1M-parameter Llama and a byte-level tokenizer with a ChatML chat template into a local
directory, and loads that directory exactly like a real checkpoint. Tests and CI run every stage on it in seconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TINY_NAME = "tiny"
TINY_DIR = Path("models/tiny-llama")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The same ChatML shape SmolLM2-Instruct uses, minus its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The model's vocabulary is the tokenizer's padded to a multiple of 8 (259 -> 264), as real checkpoints pad theirs
# (ids past the tokenizer's decode to nothing); the table then splits at a row boundary across 2 ZeRO-3 ranks, so
# the ZeRO-3 tests run the vocabulary-parallel lookup and log-probs (deltalign.zero.vocab).
VOCAB_MULTIPLE = 8
MARK = "tiny: vocab padded to a multiple of 8\n"  # a checkpoint built before this line changed is rebuilt

MODEL_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
)


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ChatML specials. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",  # pad == eos on purpose: the same trap SmolLM2 has
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int = 0):
    """A randomly initialised Llama with fixed seed; weights depend only on the seed and MODEL_CONFIG."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **MODEL_CONFIG,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def ensure(out_dir: Path | str = TINY_DIR) -> Path:
    """Build the tiny checkpoint into ``out_dir`` once (atomically: temp dir, then rename). Returns the path."""
    out = Path(out_dir)
    if (out / ".complete").exists() and (out / ".complete").read_text() == MARK:
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_tokenizer()
    model = build_model(-(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(MARK)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out
