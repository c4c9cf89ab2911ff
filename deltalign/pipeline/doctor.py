"""``python -m deltalign doctor [STAGE ...]``: check the environment and a config before a long run.

It loads no weights. It reads the model directory's config and tokenizer, checks that the chat template is
prefix-stable (the completion can be cut from the prompt) and that padding differs from EOS, parses every data
source the planned stages read (under their ``bad_rows`` rule), tokenises up to ``SAMPLE`` rows per source to
report token-length percentiles against ``max_length``, and estimates each stage's steps, memory and time per
step on this machine (:mod:`deltalign.pipeline.estimate`), warning where a stage's peak would exceed the memory
available now. It prints a short report, one finding per line (``ok``, ``note``, ``warn``, ``FAIL``); any ``FAIL``
exits with code 2.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from deltalign.core import memory
from deltalign.pipeline import autofit, checks
from deltalign.pipeline.autofit import SAMPLE  # noqa: F401  (rows tokenised per source for the percentiles)
from deltalign.pipeline.estimate import estimate, memory_advice, model_facts


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
    n_train, mean_len, prompt_share, common, longest = 0, float(getattr(cfg, "max_length", 256)), 0.0, 0, None
    for field, kind in getattr(module, "READS", {}).items():
        source = getattr(cfg, field)
        if not source:
            continue
        split = cfg.split if field == "data" else "test"
        checks.check_source(source, kind, f"{name}.{field}", split, getattr(cfg, "bad_rows", "error"))
        full, n_rows = autofit.sample(source, split, kind, tok)
        heads = autofit.row_heads(full, kind, tok)
        lengths = autofit.row_lengths(full, kind, heads)
        limit_key = "max_prompt_length" if kind == "prompt" else "max_length"
        limit, rule = getattr(cfg, limit_key), getattr(cfg, "truncation", "drop")
        over = sum(n > limit for n in lengths)
        if field == "data":
            n_train, mean_len = n_rows, sum(min(n, limit) for n in lengths) / max(len(lengths), 1)
            common = min(_common_prefix(heads), limit)
            # the longest row (a rollout row: the prompt and its response) and a pair's prompt share:
            # what gradient_checkpointing=auto resolves from in the run too
            longest, prompt_share = autofit.longest_and_share(kind, cfg, full, lengths)
        what = "prompt tokens" if kind == "prompt" else "tokens"
        line = (f"{name}.{field}: {source} ({n_rows} rows, {full.counts['skipped']} bad in the first "
                f"{len(full.examples) + full.counts['skipped']}); {what} p50 {_pct(lengths, .5)}, p90 "
                f"{_pct(lengths, .9)}, p99 {_pct(lengths, .99)}, max {max(lengths)} vs {limit_key} {limit}")
        if over:
            line += f"; {over} of {len(lengths)} longer ({rule!r} applies)"
        report("FAIL" if over and rule == "error" else ("note" if over else "ok"), line)
    return n_train, mean_len, prompt_share, common, longest


def doctor(cfgs: dict, plan: list[str], run_dir: Path, out=print) -> int:
    from transformers import __version__ as hf_version

    from deltalign.model.backbone import resolve_path
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
    try:
        for line in checks.position_warnings(cfgs, plan):
            report("warn", line.removeprefix("warning: "))
    except ValueError as e:
        report("FAIL", str(e))
    for check in (lambda: checks.check_target_modules(cfgs, plan), lambda: checks.check_reference(cfgs, plan, run_dir),
                  lambda: checks.check_rules(cfgs, plan), lambda: checks.check_deltas(cfgs, plan)):
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
        runtime = autofit.runtime()  # torch, transformers and the stage's modules loaded: what a stage starts with
        if autofit.trains(name, cfgs[name]):  # what `run` will pick (autofit.resolve_stage), and why
            by_mode = autofit.estimates(name, cfgs[name], model_cfg, facts, longest, share, runtime)
            stage_model, line = autofit.resolve(name, model_cfg, by_mode, *autofit.budget(model_cfg))
            report("note", line or f"{name}: model.gradient_checkpointing="
                                   f"{autofit.WORDS[model_cfg.gradient_checkpointing]} (set explicitly)")
        else:
            stage_model = autofit.resolve_stage(cfgs, name)[0]
        report("note", estimate(name, cfgs[name], facts, rows, length, gflops, stage_model, 1, share, common,
                                longest, runtime))
        advice = memory_advice(name, cfgs[name], facts, stage_model, longest, runtime, share, memory.available())
        if advice:
            report("warn", advice)
    out("doctor: " + ("problems found (FAIL lines above)" if report.failed else "ready to run"))
    return 2 if report.failed else 0
