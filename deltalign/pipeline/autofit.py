"""``model.gradient_checkpointing: auto`` (the default), resolved before a training stage's model loads.

The pipeline (:meth:`deltalign.pipeline.graph.Pipeline.run`) and ``doctor`` call :func:`resolve_stage`: it estimates
the stage's peak memory under each mode (:func:`deltalign.pipeline.estimate.peak_memory`, at the data's longest row
as ``doctor`` measures it) and :func:`choose` takes the fastest of off / selective / full whose estimate fits the
budget (:func:`budget`). The stage gets a copy of the model config with that concrete value, and one log line says
what was picked and why. An explicit ``true`` / ``selective`` / ``false`` is passed down unchanged. The choice
cannot change a result (checkpointing recomputes the same values; tests/test_autofit.py holds the losses equal), so
``gradient_checkpointing`` and ``memory_budget_gib`` stay out of the content hash.

Under several processes (accelerate, ZeRO) each process resolves on its own, before any process group exists, so
the inputs are what is the same on every process: the settings, the data, the model's shapes, a fixed runtime
allowance and the machine's total memory (:func:`deltalign.core.memory.total`) -- never the memory free at that
moment, which the other processes are changing. On machines that differ, set ``model.memory_budget_gib``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from deltalign.core import memory

MODES = (False, "selective", True)
"""Fastest first: what ``auto`` may pick."""
WORDS = {False: "false", "selective": "selective", True: "true"}
LABELS = {False: "without", "selective": "selective", True: "full"}
MARGIN = 0.1
"""Share of the memory kept back from the budget (the estimate is to ~1.5x; other programs move)."""
RUNTIME_GIB = 1.0
"""Under several processes: the runtime a process starts with (torch, transformers, accelerate, DeepSpeed),
counted alike on every process instead of each one's resident memory."""
SAMPLE = 2000
"""Rows tokenised per source for the longest row (and ``doctor``'s length percentiles)."""


def choose(estimates: dict, budget: float | None) -> tuple[bool | str, str]:
    """``(mode, reason)``: the first of :data:`MODES` whose estimated peak (GiB, ``estimates[mode]``) is within
    ``budget``; full checkpointing where none is (saying so); off where the budget is unknown."""
    figures = ", ".join(f"{estimates[m]:.1f}" + (" GiB without" if m is False else f" {LABELS[m]}") for m in MODES)
    if budget is None:
        mode, why = False, f"estimated {figures}, budget unknown (the memory available cannot be read)"
    else:
        mode = next((m for m in MODES if estimates[m] <= budget), True)
        why = f"estimated {figures}, budget {budget:.1f} GiB"
        if estimates[mode] > budget:
            why += " (over the budget even so: a smaller batch lowers it further; doctor says which setting)"
    return mode, f"model.gradient_checkpointing=auto -> {WORDS[mode]}: {why}"


def processes() -> tuple[int, int]:
    """``(world, local)``: processes of the launch, and those on this machine (accelerate and torchrun set both)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)


def budget(model_cfg) -> tuple[float | None, str]:
    """``(GiB, how it was set)``: the peak a stage may reach per process. ``model.memory_budget_gib`` when set;
    else one process: what it holds now plus what is available, less :data:`MARGIN` of that; several: its share
    of the total memory (a GPU each, or the host divided among this machine's processes), less the margin."""
    if model_cfg.memory_budget_gib > 0:
        return model_cfg.memory_budget_gib, "model.memory_budget_gib"
    world, local = processes()
    where = "GPU" if memory.on_device() else "host"
    if world > 1:
        total = memory.total()
        if total is None:
            return None, "the total memory cannot be read"
        share = total if memory.on_device() else total / max(local, 1)
        each = "" if memory.on_device() else f" / {local} processes"
        return share * (1 - MARGIN), f"{1 - MARGIN:.0%} of the {where}'s total {total:.1f} GiB{each}"
    free = memory.available()
    if free is None:
        return None, "the memory available cannot be read"
    held = 0.0 if memory.on_device() else memory.resident()
    return held + free * (1 - MARGIN), f"{1 - MARGIN:.0%} of the {free:.1f} GiB {where} memory available now" + (
        f" + {held:.1f} GiB this process holds" if held else "")


def runtime() -> float:
    """The memory a stage's process starts with, as the estimate counts it: none on a GPU (the device holds no
    runtime), :data:`RUNTIME_GIB` under several processes (the same on each), else this process's resident."""
    if memory.on_device():
        return 0.0
    return RUNTIME_GIB if processes()[0] > 1 else memory.resident()


# --- the data's longest row (doctor's measurement too) ------------------------------------------------------------

def row_heads(split, kind: str, tok) -> list[list[int]]:
    """Each row's ids from its start: the prompt's (prompt and preference rows) or the whole row's (SFT)."""
    from deltalign.data.tokenize import tokenize_prompt

    if kind == "prompt":
        return [tokenize_prompt(ex.prompt, tok, ex.conversational) for ex in split.examples]
    return [x["input_ids" if kind == "sft" else "prompt_ids"] for x in split.items]


def row_lengths(split, kind: str, heads: list[list[int]]) -> list[int]:
    """Each row's length in tokens: a pair's prompt with its longer response."""
    if kind != "pref":
        return [len(h) for h in heads]
    return [len(h) + max(len(x["chosen_ids"]), len(x["rejected_ids"])) for h, x in zip(heads, split.items)]


def longest_and_share(kind: str, cfg, full, lengths: list[int]) -> tuple[int, float]:
    """The longest training row within its limit (a rollout row: the prompt and its response) and, for pairs, the
    mean share of a pair's length that is its prompt."""
    limit = getattr(cfg, "max_prompt_length" if kind == "prompt" else "max_length")
    longest = min(max(lengths), limit) + (cfg.rollout.max_new_tokens if kind == "prompt" else 0)
    share = 0.0
    if kind == "pref":
        shares = [min(len(x["prompt_ids"]), limit) / max(min(n, limit), 1) for x, n in zip(full.items, lengths)]
        share = sum(shares) / max(len(shares), 1)
    return longest, share


def sample(source: str, split: str, kind: str, tok):
    """The first :data:`SAMPLE` rows of ``source`` tokenised in full (no max_length), bad ones left out silently;
    and how many rows it has."""
    from deltalign.data.formats import load_rows
    from deltalign.data.splits import from_rows

    rows = load_rows(source, split)
    return from_rows(rows[:SAMPLE], source, kind, tok, 1 << 30, "completion", "skip", lambda line: None), len(rows)


# --- resolution ---------------------------------------------------------------------------------------------------

def estimates(name: str, cfg, model_cfg, facts: dict, longest: int | None, prompt_share: float,
              runtime_gib: float) -> dict:
    """The stage's estimated peak (GiB) under each of :data:`MODES`
    (:func:`deltalign.pipeline.estimate.peak_memory`)."""
    from deltalign.pipeline.estimate import peak_memory

    return {m: peak_memory(name, cfg, facts, dataclasses.replace(model_cfg, gradient_checkpointing=m), longest,
                           runtime_gib, prompt_share)["total"] for m in MODES}


def resolve(name: str, model_cfg, by_mode: dict, budget_gib: float | None, budget_how: str = ""):
    """``(model config, line)``: under ``auto`` a copy with the mode :func:`choose` picks from ``by_mode``
    (:func:`estimates`) and the line saying why; an explicit setting: the config itself and None."""
    if model_cfg.gradient_checkpointing != "auto":
        return model_cfg, None
    mode, reason = choose(by_mode, budget_gib)
    return dataclasses.replace(model_cfg, gradient_checkpointing=mode), f"{name}: {reason}" + (
        f" ({budget_how})" if budget_how else "")


def _reads(name: str) -> dict:
    """A stage's READS (setting -> row shape): its module imported by name (the graph's table is above us)."""
    return getattr(importlib.import_module(f"deltalign.stages.{name}"), "READS", {})


def trains(name: str, cfg, reads: dict | None = None) -> bool:
    """Whether the estimator models the stage's training (it reads training data in batches); ``reads``: the
    stage's READS (default: its module's)."""
    return "data" in (_reads(name) if reads is None else reads) and hasattr(cfg, "batch_size") and bool(cfg.data)


def measure(cfgs: dict, name: str, reads: dict | None = None) -> tuple[dict, int | None, float]:
    """``(model facts, longest row, prompt share)`` of a training stage, as ``doctor`` measures them: the model's
    shapes from its headers, the first :data:`SAMPLE` rows of its data tokenised. Loads no weights."""
    from deltalign.data.tokenize import load_tokenizer
    from deltalign.model.backbone import resolve_path
    from deltalign.pipeline.estimate import model_facts

    model_cfg, cfg = cfgs["model"], cfgs[name]
    path = resolve_path(model_cfg.path)
    tok = load_tokenizer(path, model_cfg.trust_remote_code)
    kind = (_reads(name) if reads is None else reads)["data"]
    full, _ = sample(cfg.data, cfg.split, kind, tok)
    heads = row_heads(full, kind, tok)
    longest, share = longest_and_share(kind, cfg, full, row_lengths(full, kind, heads)) if heads else (None, 0.0)
    return model_facts(path), longest, share


def resolve_stage(cfgs: dict, name: str, reads: dict | None = None):
    """``(model config for the stage, log line or None)``: :func:`resolve` from the stage's :func:`measure` and this
    machine's :func:`budget`. A stage the estimator does not model (export) gets ``auto`` as off, silently."""
    model_cfg, cfg = cfgs["model"], cfgs[name]
    if model_cfg.gradient_checkpointing != "auto":
        return model_cfg, None
    if not trains(name, cfg, reads):
        return dataclasses.replace(model_cfg, gradient_checkpointing=False), None
    by_mode = estimates(name, cfg, model_cfg, *measure(cfgs, name, reads), runtime())
    return resolve(name, model_cfg, by_mode, *budget(model_cfg))
