"""What ``doctor`` estimates for a stage before it runs: model FLOPs per step, peak memory by part, and -- where
the peak would exceed the memory available -- which settings lower it and by how much. Estimates from the config
and the model's shapes only (no weights loaded): memory to ~1.5x, time to ~2x."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from safetensors import safe_open

# shares of the measured matmul peak reached here (make bench, bench/profile_ppo.py in bench/results): training and
# scoring forwards ~55-65%; decoding (one token per forward, memory-bound) ~20%
FLOP_SHARE = 0.55
DECODE_SHARE = 0.2


def model_facts(path: Path) -> dict:
    """Parameter count (from the safetensors headers), hidden size, layers, vocab: no weights loaded."""
    cfg = json.loads((path / "config.json").read_text())
    numel = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                numel += math.prod(st.get_slice(k).get_shape())
    hidden, heads = cfg.get("hidden_size", 0), cfg.get("num_attention_heads", 1)
    kv = cfg.get("num_key_value_heads", heads) * cfg.get("head_dim", hidden // max(heads, 1))
    return {"params": numel, "hidden": hidden, "layers": cfg.get("num_hidden_layers", 0),
            "vocab": cfg.get("vocab_size", 0), "intermediate": cfg.get("intermediate_size", 4 * hidden), "kv": kv}


def activation_widths(facts: dict, checkpointing: bool | str) -> float:
    """Values a training forward keeps per token for the backward, in units of the hidden size. Per layer without
    checkpointing ~20 (measured: a SmolLM2 layer with LoRA on every linear layer in fp32 keeps 19-21 -- PPO's
    graphs in bench/profile_ppo.py and a saved-tensor count); with it each layer keeps its input (1), and one
    layer's activations exist again in its replay; selective also keeps the base's matmul outputs (q, k, v, o,
    gate, up, down: measured 9-10 for SmolLM2)."""
    if checkpointing not in (False, True, "selective"):  # auto: deltalign.pipeline.autofit resolves it first
        raise ValueError(f"model.gradient_checkpointing={checkpointing!r}: the estimate needs false, selective or true")
    h, layers, per_layer = facts["hidden"], facts["layers"], 20
    if checkpointing is False:
        return layers * per_layer
    kept = 1.0
    if checkpointing == "selective":
        kept += (2 * h + 2 * facts.get("kv", h) + 3 * facts.get("intermediate", 4 * h)) / h
    return layers * kept + per_layer


def step_flops(name: str, cfg, facts: dict, length: float, checkpointing: bool | str, prompt_share: float = 0.0,
               common: int = 0) -> tuple[float, float]:
    """Model FLOPs of one step: ``(compute-bound, decoding)``. A frozen base with small deltas: forward 2N per
    token, training 4N (no weight gradients; 6N with full activation checkpointing, whose replay runs the base's
    matmuls again; selective checkpointing keeps them), N_body = N without the LM head for the scalar-head models.
    Packed with shared prefixes, a pair runs its prompt (``prompt_share`` of the length) once, and a forward the
    prefix all its rows start with (``common`` tokens) once. PPO and GRPO: one rollout step -- generation (prompt
    prefill, then responses at half ``max_new_tokens`` on average), the scoring forwards and every pass over the
    rollout."""
    n = facts["params"]
    body = max(n - facts["vocab"] * facts["hidden"], 0)
    train, shared = 6 if checkpointing is True else 4, getattr(cfg, "share_prefixes", False)
    common = common if shared else 0
    if name not in ("ppo", "grpo"):
        pair = 2 - prompt_share if shared else 2  # sequences' work per pair
        per_forward = cfg.batch_size * length * (pair if name in ("rm", "dpo") else 1)
        per_forward -= (cfg.batch_size - 1) * common  # (a pair's prompt is already counted once)
        tokens = getattr(cfg, "grad_accum", 1) * per_forward
        return train * (body if name == "rm" else n) * tokens, 0.0
    group = getattr(cfg, "num_generations", 1)
    rows, new = cfg.batch_size * group, cfg.rollout.max_new_tokens / 2
    # packed with shared prefixes, a GRPO group's prompt runs once, and the prefix all prompts share once
    tokens = (cfg.batch_size * (length + group * new) - (cfg.batch_size - 1) * common if shared
              else rows * (length + new))
    if name == "ppo":  # reference + reward model; each epoch: policy and critic
        score = 2 * n + (2 * body if cfg.rm_weight > 0 else 0)
        passes = cfg.passes * train * (n + body)
    else:  # reference only with a KL term, reward model only when weighted
        score = (2 * n if cfg.kl_coef > 0 else 0) + (2 * body if cfg.rm_weight > 0 else 0)
        passes = cfg.passes * train * n
    return 2 * n * rows * length + (score + passes) * tokens, 2 * n * rows * new


def peak_memory(name: str, cfg, facts: dict, model_cfg, longest: int | None, runtime: float,
                prompt_share: float = 0.0) -> dict[str, float]:
    """A stage's peak memory by part, GiB: ``runtime`` (a process with torch and transformers loaded, measured by
    the caller), ``weights``, ``activations`` (the training graphs alive at once, at the longest row, in
    :func:`activation_widths` per token) and ``logits`` (the LM head's chunked float32 buffers, three chunks of
    :data:`deltalign.losses.vocab.CHUNK_TOKENS`; none for a scalar head), and their ``total``. The graphs: one
    batch (SFT; a batch of pairs: RM, DPO), PPO's minibatch (with full checkpointing twice: the first
    minibatch's policy and critic graphs are both kept until the advantages exist), GRPO one forward of
    ``forward_batch_size`` rows.
    With shared prefixes a pair runs its prompt (``prompt_share`` of its length) once; other shared prefixes are
    not subtracted: an estimate at the longest rows, not under them."""
    from deltalign.losses.vocab import CHUNK_TOKENS

    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}[model_cfg.dtype]
    weights = facts["params"] * (0.56 if model_cfg.quantization == "nf4" else bytes_per)
    rows, graphs = cfg.batch_size, 1
    if name in ("rm", "dpo"):
        rows = (2 - (prompt_share if cfg.share_prefixes else 0)) * cfg.batch_size
    elif name == "ppo":
        both = cfg.disable_dropout and model_cfg.gradient_checkpointing is True  # policy and critic graphs kept
        rows, graphs = cfg.mini_batch_size, 2 if both else 1
    elif name == "grpo":
        minibatch = cfg.mini_batch_size or cfg.batch_size * cfg.num_generations
        rows = min(cfg.forward_batch_size or minibatch, minibatch)
    max_length = getattr(cfg, "max_length", 1 << 30)
    tokens = rows * min(max_length, longest or getattr(cfg, "max_length", 256))
    act = graphs * tokens * facts["hidden"] * activation_widths(facts, model_cfg.gradient_checkpointing) * bytes_per
    logits = 0 if name == "rm" else 3 * min(CHUNK_TOKENS, tokens) * facts["vocab"] * 4
    parts = {"runtime": runtime, "weights": weights / 2**30, "activations": act / 2**30, "logits": logits / 2**30}
    return parts | {"total": sum(parts.values())}


def estimate(name: str, cfg, facts: dict, rows: int, length: float, gflops: float, model_cfg, world: int,
             prompt_share: float = 0.0, common: int = 0, longest: int | None = None, runtime: float = 0.0) -> str:
    """Steps, memory and time per step (memory to ~1.5x, time to ~2x): memory at the longest row (``longest``; else
    ``max_length``: :func:`peak_memory`), time at the data's mean length (``length``; :func:`step_flops`)."""
    batch = getattr(cfg, "batch_size", 1) * getattr(cfg, "grad_accum", 1) * world
    per_epoch = math.ceil(rows / batch) if rows else 0
    steps = cfg.max_steps if getattr(cfg, "max_steps", 0) else math.ceil(per_epoch * getattr(cfg, "epochs", 1.0))
    memory = peak_memory(name, cfg, facts, model_cfg, longest, runtime, prompt_share)
    compute, decode = step_flops(name, cfg, facts, length, model_cfg.gradient_checkpointing, prompt_share, common)
    seconds = (compute / FLOP_SHARE + decode / DECODE_SHARE) / (gflops * 1e9)
    return (f"{name}: ~{steps} steps of {batch} rows; peak memory ~{memory['total']:.1f} GiB (weights "
            f"{memory['weights']:.2f}, activations {memory['activations']:.2f}); ~{seconds:.1f} s/step at the "
            f"data's mean length {length:.0f} on this machine")


LOWER_BATCH = {"ppo": "mini_batch_size", "grpo": "forward_batch_size"}  # the rest: batch_size (with grad_accum)


def memory_advice(name: str, cfg, facts: dict, model_cfg, longest: int | None, runtime: float,
                  prompt_share: float, available: float | None) -> str | None:
    """None when the stage's estimated peak fits in ``available`` GiB (or that is unknown); else a line saying so,
    with the checkpointing settings that need less (and their estimates) and the batch setting to lower."""
    need = peak_memory(name, cfg, facts, model_cfg, longest, runtime, prompt_share)["total"]
    if available is None or need <= available:
        return None
    current = model_cfg.gradient_checkpointing
    options = []
    for mode in ("selective", True):
        if mode != current and current is not True:
            lower = peak_memory(name, cfg, facts, dataclasses.replace(model_cfg, gradient_checkpointing=mode),
                                longest, runtime, prompt_share)["total"]
            options.append(f"model.gradient_checkpointing={str(mode).lower()} (~{lower:.1f} GiB)")
    batch = LOWER_BATCH.get(name, "batch_size")
    keep = " with a larger grad_accum" if hasattr(cfg, "grad_accum") and batch == "batch_size" else ""
    options.append(f"a smaller {name}.{batch}{keep}")
    return (f"{name}: peak memory ~{need:.1f} GiB, more than the {available:.1f} GiB available now; "
            f"try {', or '.join(options)}")

