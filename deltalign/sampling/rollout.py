"""Rollout tensors and log-probs shared by the online RL stages (:mod:`~deltalign.stages.ppo`,
:mod:`~deltalign.stages.grpo`): responses sampled from a policy adapter, laid out so one forward gives the
log-prob of every response token under whichever adapter is active.

* :func:`rollout_seed`: the sampling seed of one prompt at one step, independent of batch and process;
* :func:`rollout_batch`: right-padded ``prompt + response`` rows and the position that predicts each response token;
* :func:`rows_of`: such a batch restricted to some rows;
* :func:`length_chunks`: rows of such a batch as length-sorted forwards, each padded only to its own longest row;
* :func:`policy_logprobs`: log-probs (and entropy) of the response tokens at the sampling temperature;
* :func:`load_prompts`: a stage's training and held-out prompts, tokenised, long prompts dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from deltalign.data.sharing import PrefixSharing, prefix_tree
from deltalign.data.splits import Sources
from deltalign.core.settings import setting


@dataclass
class PromptData(Sources, PrefixSharing):
    """Where an online RL stage's prompts come from and which it keeps (its Config inherits these settings)."""

    max_prompt_length: int = setting(192, ge=1)
    """Prompts longer than this many tokens are dropped (and counted)."""
    bad_rows: Literal["error", "skip"] = "error"
    """A row with a problem of its own (missing or empty field, HH dialogues that differ before the last
    assistant turn): ``error`` stops the stage naming file/row/field; ``skip`` leaves it out with one log line
    naming it, and counts it in the metrics (``data.*.skipped``)."""


def load_prompts(cfg, tokenizer, with_eval: bool = True) -> dict:
    """Prompts of ``cfg.data`` (and ``cfg.eval_data``): ``examples``, ``prompt_ids``, ``keep`` (indices of the
    prompts within ``max_prompt_length``), ``eval_examples`` and ``counts`` (rows, skipped bad rows, prompts
    dropped for length), read under the stage's ``bad_rows`` rule."""
    from deltalign.data.splits import load_split
    from deltalign.data.tokenize import tokenize_prompt

    data = load_split(cfg.data, cfg.split, "prompt", bad_rows=cfg.bad_rows)
    held = load_split(cfg.eval_data if with_eval else "", "test", "prompt", bad_rows=cfg.bad_rows)
    prompt_ids = [tokenize_prompt(ex.prompt, tokenizer, ex.conversational) for ex in data.examples]
    keep = [i for i, p in enumerate(prompt_ids) if len(p) <= cfg.max_prompt_length]
    counts = data.counts | {"dropped": len(prompt_ids) - len(keep)}
    return {"examples": data.examples, "prompt_ids": prompt_ids, "keep": keep, "eval_examples": held.examples,
            "counts": {"train": counts, "eval": held.counts}}


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Right-padded ``prompt + response`` rows, and per response token the position whose hidden state predicts
    it: ``input_ids``/``attention_mask`` [B, T]; ``positions``/``response_ids``/``response_mask`` [B, R]."""
    B, T = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(len(r) for r in responses)
    ids, mask = torch.full((B, T), pad_id), torch.zeros(B, T, dtype=torch.long)
    pos, rids, rmask = torch.zeros(B, R, dtype=torch.long), torch.full((B, R), pad_id), torch.zeros(B, R)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[b, :n], mask[b, :n] = torch.tensor(p + r), 1
        pos[b] = torch.arange(len(p) - 1, len(p) - 1 + R).clamp(max=T - 1)
        rids[b, :len(r)], rmask[b, :len(r)] = torch.tensor(r), 1.0
    return {"input_ids": ids, "attention_mask": mask, "positions": pos, "response_ids": rids,
            "response_mask": rmask}


def rows_of(batch: dict, rows: torch.Tensor) -> dict:
    """A rollout batch restricted to ``rows`` (indices or a boolean mask)."""
    return {k: v[rows] for k, v in batch.items()}


def length_chunks(batch: dict, rows: torch.Tensor, size: int, share_prefixes: bool = False) -> list[tuple[torch.Tensor, dict]]:
    """``rows`` of a :func:`rollout_batch` as forwards of at most ``size`` rows (0: one forward), the rows sorted by
    length so that each forward pads only to its own longest row (``share_prefixes``: sorted by their tokens instead, so
    that rows sharing a prompt run together): ``(rows, sub-batch)`` pairs, each sub-batch cut to its longest
    sequence and longest response (``positions`` clamped to the shorter rows)."""
    if share_prefixes:
        seqs = [r[:n] for r, n in zip(batch["input_ids"][rows].tolist(), batch["attention_mask"][rows].sum(1).tolist())]
        ordered = rows[torch.tensor(sorted(range(len(seqs)), key=lambda i: seqs[i]), dtype=torch.long).to(rows.device)]
    else:
        lengths = batch["attention_mask"][rows].sum(1)
        ordered = rows[torch.argsort(lengths, descending=True, stable=True).to(rows.device)]
    out = []
    for part in ordered.split(size or len(ordered)):
        sub = rows_of(batch, part)
        T, R = int(sub["attention_mask"].sum(1).max()), max(int(sub["response_mask"].sum(1).max()), 1)
        sub["input_ids"], sub["attention_mask"] = sub["input_ids"][:, :T], sub["attention_mask"][:, :T]
        sub["response_ids"], sub["response_mask"] = sub["response_ids"][:, :R], sub["response_mask"][:, :R]
        sub["positions"] = sub["positions"][:, :R].clamp(max=T - 1)
        out.append((part, sub))
    return out


def at_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, ...] gathered at ``positions`` [B, R] -> [B, R, ...]."""
    idx = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def forward(model, batch: dict, share_prefixes: bool = False, **kw) -> torch.Tensor:
    """The forward of a :func:`rollout_batch` (``share_prefixes``: packed with shared prefixes, e.g. a group's prompt)."""
    if share_prefixes:
        kw["shared"] = prefix_tree(batch["input_ids"], batch["attention_mask"])
    return model(batch["input_ids"], batch["attention_mask"], **kw)


def policy_logprobs(backbone, model, batch: dict, temperature: float, entropy: bool | str = False,
                    share_prefixes: bool = False):
    """Log-probs [B, R] of the response tokens under the active adapter at ``temperature``; with ``entropy``
    also the per-token entropy [B, R] of that distribution (``"grad"``: differentiable, for an entropy bonus;
    otherwise detached, a metric that costs no backward pass over the vocabulary). ``share_prefixes``: see
    :func:`forward`."""
    hidden = at_positions(forward(model, batch, share_prefixes), batch["positions"])
    out = backbone.lm_logprobs(hidden, batch["response_ids"], temperature, entropy=bool(entropy))
    if not entropy:
        return out
    lp, ent = out
    return lp, (ent if entropy == "grad" else ent.detach())


def rollout_seed(seed: int, step: int, prompt: int) -> int:
    """The sampling seed of one prompt's rollout at one step: independent of batch and process, so a run gives
    the same rollouts in one process and in several."""
    return (seed * 1_000_003 + step) * 1_000_003 + prompt
