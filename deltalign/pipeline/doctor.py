"""``python -m deltalign doctor [STAGE ...]``: check the environment and a config before a long run.

It loads no weights. It reads the model directory's config and tokenizer, checks that the chat template is
prefix-stable (the completion can be cut from the prompt) and that padding differs from EOS, parses every data
source the planned stages read (under their ``bad_rows`` rule), tokenises up to ``SAMPLE`` rows per source to
report token-length percentiles against ``max_length``, and estimates each stage's steps, memory and time per
step on this machine. It prints a short report, one finding per line (``ok``, ``note``, ``FAIL``); any ``FAIL``
exits with code 2.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch

from deltalign import memory
from deltalign.pipeline import checks

SAMPLE = 2000  # rows tokenised per source for the length percentiles
# shares of the measured matmul peak reached here (make bench, bench/profile_ppo.py in bench/results): training and
# scoring forwards ~55-65%; decoding (one token per forward, memory-bound) ~20%
FLOP_SHARE = 0.55
DECODE_SHARE = 0.2


class Report:
    def __init__(self, out=print):
        self.out, self.failed = out, False

    def __call__(self, status: str, text: str) -> None:
        self.failed |= status == "FAIL"
        self.out(f"{status:<4}  {text}")


def _matmul_gflops(seconds: float = 0.5) -> float:
    """fp32 matmul throughput of this process (n=1024), a quick probe."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


def model_facts(path: Path) -> dict:
    """Parameter count (from the safetensors headers), hidden size, layers, vocab: no weights loaded."""
    from safetensors import safe_open

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
    h, layers, per_layer = facts["hidden"], facts["layers"], 20
    if checkpointing is False:
        return layers * per_layer
    kept = 1.0
    if checkpointing == "selective":
        kept += (2 * h + 2 * facts.get("kv", h) + 3 * facts.get("intermediate", 4 * h)) / h
    return layers * kept + per_layer


def check_tokenizer(tok, report: Report) -> None:
    """Chat template prefix-stable, pad distinct from EOS (``load_tokenizer`` already picked a spare pad)."""
    if not getattr(tok, "chat_template", None):
        report("note", "tokenizer has no chat template: only plain-text (prompt/completion string) data works")
    else:
        msgs = [{"role": "user", "content": "Hi?"}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Hello."}], tokenize=False)
        if full.startswith(prompt):
            report("ok", "chat template is prefix-stable (the completion is what follows the rendered prompt)")
        else:
            report("FAIL", "chat template is not prefix-stable: prompt + answer does not start with the prompt")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        report("FAIL", "pad token equals EOS: the model would never learn to stop")
    else:
        report("ok", f"pad token {tok.pad_token!r} differs from EOS {tok.eos_token!r}")


def _heads(split, kind: str, tok) -> list[list[int]]:
    """Each row's ids from its start: the prompt's (prompt and preference rows) or the whole row's (SFT)."""
    from deltalign.data.tokenize import tokenize_prompt

    if kind == "prompt":
        return [tokenize_prompt(ex.prompt, tok, ex.conversational) for ex in split.examples]
    return [x["input_ids" if kind == "sft" else "prompt_ids"] for x in split.items]


def _lengths(split, kind: str, heads: list[list[int]]) -> list[int]:
    if kind != "pref":
        return [len(h) for h in heads]
    return [len(h) + max(len(x["chosen_ids"]), len(x["rejected_ids"])) for h, x in zip(heads, split.items)]


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the prefix every sequence starts with (a chat template's system prompt, say)."""
    n = min((len(q) for q in seqs), default=0)
    for i in range(n):
        if any(q[i] != seqs[0][i] for q in seqs):
            return i
    return n


def _pct(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check_stage_data(name: str, cfg, module, tok, report: Report) -> tuple[int, float, float, int, int | None]:
    """Rows, skipped rows and token lengths of every source the stage reads; returns the training rows, their mean
    length in tokens (within max_length), for pairs the mean share of that length that is the prompt, the
    length of the prefix every training row starts with, and the longest row (within max_length; a prompt with
    its longest response)."""
    from deltalign.data.formats import load_rows
    from deltalign.data.splits import from_rows

    n_train, mean_len, prompt_share, common, longest = 0, float(getattr(cfg, "max_length", 256)), 0.0, 0, None
    for field, kind in getattr(module, "READS", {}).items():
        source = getattr(cfg, field)
        if not source:
            continue
        split = cfg.split if field == "data" else "test"
        checks.check_source(source, kind, f"{name}.{field}", split, getattr(cfg, "bad_rows", "error"))
        rows = load_rows(source, split)
        # the first SAMPLE rows tokenised in full (no max_length), bad ones left out silently
        full = from_rows(rows[:SAMPLE], source, kind, tok, 1 << 30, "completion", "skip", lambda line: None)
        heads = _heads(full, kind, tok)
        lengths = _lengths(full, kind, heads)
        limit_key = "max_prompt_length" if kind == "prompt" else "max_length"
        limit, rule = getattr(cfg, limit_key), getattr(cfg, "truncation", "drop")
        over = sum(n > limit for n in lengths)
        if field == "data":
            n_train, mean_len = len(rows), sum(min(n, limit) for n in lengths) / max(len(lengths), 1)
            common = min(_common_prefix(heads), limit)
            # a rollout row (prompt data): the prompt and its response
            longest = min(max(lengths), limit) + (cfg.rollout.max_new_tokens if kind == "prompt" else 0)
            if kind == "pref":
                shares = [min(len(x["prompt_ids"]), limit) / max(min(n, limit), 1) for x, n in zip(full.items, lengths)]
                prompt_share = sum(shares) / max(len(shares), 1)
        what = "prompt tokens" if kind == "prompt" else "tokens"
        line = (f"{name}.{field}: {source} ({len(rows)} rows, {full.counts['skipped']} bad in the first "
                f"{len(full.examples) + full.counts['skipped']}); {what} p50 {_pct(lengths, .5)}, p90 "
                f"{_pct(lengths, .9)}, p99 {_pct(lengths, .99)}, max {max(lengths)} vs {limit_key} {limit}")
        if over:
            line += f"; {over} of {len(lengths)} longer ({rule!r} applies)"
        report("FAIL" if over and rule == "error" else ("note" if over else "ok"), line)
    return n_train, mean_len, prompt_share, common, longest


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
        passes = cfg.ppo_epochs * train * (n + body)
    else:  # reference only with a KL term, reward model only when weighted
        score = (2 * n if cfg.beta > 0 else 0) + (2 * body if cfg.rm_weight > 0 else 0)
        passes = cfg.grpo_epochs * train * n
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


def doctor(cfgs: dict, plan: list[str], run_dir: Path, out=print) -> int:
    from transformers import __version__ as hf_version

    from deltalign.backbone import resolve_path
    from deltalign.data.tokenize import load_tokenizer
    from deltalign.pipeline.graph import stage_module

    report = Report(out)
    gflops = _matmul_gflops()
    report("ok", f"python {platform.python_version()}, torch {torch.__version__}, transformers {hf_version}; "
                 f"{torch.get_num_threads()} threads, fp32 matmul {gflops:.0f} GFLOP/s"
                 + (", CUDA" if torch.cuda.is_available() else ", CPU only"))
    model_cfg = cfgs["model"]
    try:
        checks.check_model(model_cfg)
        path = resolve_path(model_cfg.path)
        tok = load_tokenizer(path, model_cfg.trust_remote_code)
        facts = model_facts(path)
    except (FileNotFoundError, ValueError) as e:
        report("FAIL", str(e))
        return 2
    report("ok", f"model {model_cfg.path}: {facts['params'] / 1e6:.1f}M parameters, {facts['layers']} layers, "
                 f"hidden {facts['hidden']}, vocab {facts['vocab']} ({model_cfg.dtype}, {model_cfg.quantization})")
    if model_cfg.dtype != "float32" and not torch.cuda.is_available():
        report("note", f"model.dtype={model_cfg.dtype} on a CPU: no fast low-precision matmul here, float32 is faster")
    check_tokenizer(tok, report)
    for check in (lambda: checks.check_reference(cfgs, plan, run_dir), lambda: checks.check_rules(cfgs, plan)):
        try:
            check()
        except ValueError as e:
            report("FAIL", str(e))
    for name in plan:
        if not hasattr(stage_module(name), "READS"):
            continue
        try:
            rows, length, share, common, longest = check_stage_data(name, cfgs[name], stage_module(name), tok,
                                                                    report)
        except (FileNotFoundError, ValueError) as e:
            report("FAIL", " ".join(str(e).split()))
            continue
        runtime = memory.resident()  # torch, transformers and the stage's modules loaded: what a stage starts with
        report("note", estimate(name, cfgs[name], facts, rows, length, gflops, model_cfg, 1, share, common, longest,
                                runtime))
    out("doctor: " + ("problems found (FAIL lines above)" if report.failed else "ready to run"))
    return 2 if report.failed else 0
