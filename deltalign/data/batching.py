"""Batching with little padding: length-grouped index batches, padding to tensors, pad-share accounting.

Padding is decided by position (the attention mask), never by token id, so ``pad_id == eos_id`` is safe:
labels are ``-100`` exactly on pad positions and on whatever the caller already masked (the prompt).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100
MEGA_BATCHES = 50  # a mega-batch holds this many batches; lengths are sorted only within one


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           shuffle: bool = True) -> list[list[int]]:
    """Index batches whose members have similar lengths; every index appears exactly once.

    With ``shuffle``: shuffle the indices (RNG seeded by ``(seed, epoch)``), cut them into mega-batches of
    ``50 * batch_size``, sort each by length (longest first), cut into batches, shuffle the batch order and
    move the batch holding the longest sequence to the front (so an out-of-memory shows up at once).
    Only the very last batch may be short. Without ``shuffle``: all indices sorted by length, longest first
    (deterministic, the least padding; for evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i: i + batch_size] for i in range(0, n, batch_size)]
    rng = random.Random(f"deltalign:{seed}:{epoch}")  # str seeds hash deterministically (not via hash())
    order = list(range(n))
    rng.shuffle(order)
    mega = MEGA_BATCHES * batch_size
    batches = []
    for start in range(0, n, mega):
        chunk = sorted(order[start: start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    if not batches:
        return []
    last = batches.pop() if len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if last is not None:
        batches.append(last)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def pad_batch(seqs: list[list[int]], pad_id: int, labels: list[list[int]] | None = None,
              pad_side: str = "right") -> dict:
    """Pad ``seqs`` to one LongTensor batch.

    Returns ``input_ids`` and ``attention_mask`` [B, T], ``labels`` [B, T] (only if ``labels`` is given; pads
    become ``-100``), and ints ``n_tokens`` (real tokens) and ``n_pad`` (pad positions).
    ``pad_side="left"`` is for generation.
    """
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    if labels is not None and [len(s) for s in seqs] != [len(lab) for lab in labels]:
        raise ValueError("labels must have the same lengths as seqs")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long) if labels is not None else None
    for r, s in enumerate(seqs):
        cols = slice(0, len(s)) if pad_side == "right" else slice(width - len(s), width)
        ids[r, cols] = torch.tensor(s, dtype=torch.long)
        mask[r, cols] = 1
        if lab is not None:
            lab[r, cols] = torch.tensor(labels[r], dtype=torch.long)
    n_tokens = sum(len(s) for s in seqs)
    out = {"input_ids": ids, "attention_mask": mask, "n_tokens": n_tokens, "n_pad": ids.numel() - n_tokens}
    if lab is not None:
        out["labels"] = lab
    return out


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor moved to ``device``, nested dicts too (other values as they are)."""
    return {k: (v.to(device) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict) else v)
            for k, v in batch.items()}


def pair_batch(items: list[dict], pad_id: int) -> dict:
    """One batch of 2B rows for B preference pairs: ``prompt + chosen`` rows first, then ``prompt + rejected``.

    ``items`` are :func:`deltalign.data.tokenize.tokenize_pair` outputs. Returns :func:`pad_batch` output
    (right-padded) whose ``labels`` are ``-100`` on prompt tokens and pads, plus LongTensors
    ``prompt_lengths`` and ``response_lengths`` [2B], and ``margin`` [B] (float, missing margins = 0.0) when
    any item has a margin. Row ``i`` and row ``B + i`` are the two sides of pair ``i``.
    """
    if not items:
        raise ValueError("pair_batch needs at least one pair")
    seqs, labels, p_len, r_len = [], [], [], []
    for side in ("chosen_ids", "rejected_ids"):
        for it in items:
            prompt, resp = list(it["prompt_ids"]), list(it[side])
            seqs.append(prompt + resp)
            labels.append([IGNORE] * len(prompt) + resp)
            p_len.append(len(prompt))
            r_len.append(len(resp))
    out = pad_batch(seqs, pad_id, labels)
    out["prompt_lengths"] = torch.tensor(p_len, dtype=torch.long)
    out["response_lengths"] = torch.tensor(r_len, dtype=torch.long)
    margins = [it.get("margin") for it in items]
    if any(m is not None for m in margins):
        out["margin"] = torch.tensor([0.0 if m is None else float(m) for m in margins], dtype=torch.float32)
    return out


@dataclass
class PadCounter:
    """Running pad-token share of all positions processed: ``add(n_tokens, n_pad)``, then read ``share``."""

    n_tokens: int = 0
    n_pad: int = 0

    def add(self, n_tokens: int, n_pad: int) -> None:
        self.n_tokens += int(n_tokens)
        self.n_pad += int(n_pad)

    @property
    def share(self) -> float:
        total = self.n_tokens + self.n_pad
        return self.n_pad / total if total else 0.0

    def state_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "n_pad": self.n_pad}

    def load_state_dict(self, state: dict) -> None:
        self.n_tokens, self.n_pad = int(state.get("n_tokens", 0)), int(state.get("n_pad", 0))
