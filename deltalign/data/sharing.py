"""Shared-prefix packing: every token prefix that several rows of a batch share is computed once.

A preference pair's chosen and rejected rows repeat the prompt; rows of any batch may repeat a system prompt. In a
causal model a token's hidden state depends only on the tokens before it, so a shared prefix gives the same
values in every row that holds it. :func:`deltalign.data.sharing.prefix_tree` stores a right-padded batch as one trie of tokens per
packed row (depth-first order): each node is one token, attends to its ancestors and itself only (a tree attention
mask), and has its depth as position id. The forward then runs on the packed rows, and ``rows``/``cols`` map every
position of the original batch back to its node (:meth:`deltalign.model.backbone.Backbone.forward` gathers the hidden
states back: callers see the batch they built, and the gradient of a shared node is the sum over the rows that
use it -- the same as in the padded batch).

The mask is dense ([R, 1, L, L]), so packed rows are cut at ``budget`` nodes: attention over a packed row costs
L^2 per layer where the padded batch's costs B T^2 / 2 (causal). When that is less, the packed rows also carry an
``owner`` per node and attention runs over the batch's own rows (:mod:`deltalign.deltas.row_attention`): the linear layers
still see each distinct token once. A prompt or prefix delta's virtual tokens are a prefix of every node
(:func:`deltalign.deltas.sequence.run_shared`); those batches keep the tree mask. LoRA dropout draws one mask per
shared node instead of one per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BUDGET = 1024  # nodes per packed row (a longer single row gets a packed row of its own)
MIN_SAVING = 0.15
"""A batch runs packed only when its shared prefixes save at least this share of its tokens: packing costs
gathers and attention over rows of its own, so HH dialogues, which share only a chat template's few tokens (5-8%
of a batch), ran ~10% slower packed than padded (bench/README.md); pairs (their prompt: 30-50%) and the
embedded rows (a common system prompt: ~40%) gain."""


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _pack(seqs: list[list[int]]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One trie of ``seqs`` (already sorted): tokens, parent index (-1: a root), depth, and each row's node indices."""
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    nodes: list[list[int]] = []
    prev: list[int] = []
    path: list[int] = []
    for seq in seqs:
        k = _common(seq, prev)  # in sorted order the previous row holds the longest prefix shared with any earlier
        own = path[:k]
        for t in range(k, len(seq)):
            tokens.append(seq[t])
            parent.append(own[-1] if own else -1)
            depth.append(t)
            own.append(len(tokens) - 1)
        nodes.append(own)
        prev, path = seq, own
    return tokens, parent, depth, nodes


def saving(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The share of a right-padded batch's real tokens that its rows' shared prefixes would save (the trie of all
    rows, before :data:`BUDGET` cuts it into packed rows)."""
    lengths = attention_mask.sum(1).tolist()
    seqs = sorted(row[:n] for row, n in zip(input_ids.tolist(), lengths))
    total = sum(lengths)
    shared = sum(_common(a, b) for a, b in zip(seqs, seqs[1:]))
    return shared / total if total else 0.0


def prefix_tree(input_ids: torch.Tensor, attention_mask: torch.Tensor, budget: int = BUDGET,
                   attend: str = "auto") -> dict:
    """The right-padded batch ``input_ids``/``attention_mask`` [B, T] as packed rows with shared prefixes stored once.

    Returns ``input_ids``, ``position_ids`` and ``real`` (False on the packed rows' padding) [R, L], the tree
    attention ``mask`` [R, 1, L, L] (bool, True = attend; padding attends to itself), ``rows``/``cols`` [B, T]
    (the node of each original position; a pad position maps to its row's last node), ``flat`` [B, T] (the same
    as ``rows * L + cols``, an index into the packed rows flattened), ``n_tokens`` (nodes,
    the tokens actually computed) and, when attention over the original rows costs less than over the packed
    rows (B T^2 / 2 against R L^2 scores), ``owner`` [R, L]: for each node one position ``b * T + t`` that holds it
    (``attend``: ``auto`` decides so; ``rows`` or ``tree`` forces one way).
    """
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if (mask != (torch.arange(mask.shape[1]) < lengths.unsqueeze(1))).any():
        raise ValueError("prefix_tree needs a right-padded batch (a row's tokens first, then its padding)")
    if (lengths == 0).any():
        raise ValueError("prefix_tree got an empty row")
    ids = input_ids.tolist()
    seqs = [row[:n] for row, n in zip(ids, lengths.tolist())]
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])

    groups: list[list[int]] = [[]]
    size, prev = 0, []
    for i in order:  # cut into packed rows of at most `budget` nodes
        new = len(seqs[i]) - _common(seqs[i], prev)
        if groups[-1] and size + new > budget:
            groups.append([])
            size, new = 0, len(seqs[i])
        groups[-1].append(i)
        size, prev = size + new, seqs[i]

    packs = [_pack([seqs[i] for i in g]) for g in groups]
    width = max(len(p[0]) for p in packs)
    n_rows, T = len(packs), input_ids.shape[1]
    out_ids = np.zeros((n_rows, width), dtype=np.int64)
    pos = np.zeros((n_rows, width), dtype=np.int64)
    real = np.zeros((n_rows, width), dtype=bool)
    tree = np.zeros((n_rows, width, width), dtype=bool)
    rows = np.zeros((len(seqs), T), dtype=np.int64)
    cols = np.zeros((len(seqs), T), dtype=np.int64)
    for r, (g, (tokens, parent, depth, nodes)) in enumerate(zip(groups, packs)):
        n = len(tokens)
        out_ids[r, :n], pos[r, :n], real[r, :n] = tokens, depth, True
        anc = tree[r]
        for j, p in enumerate(parent):  # ancestors come first in depth-first order
            if p >= 0:
                anc[j, :p + 1] = anc[p, :p + 1]
            anc[j, j] = True
        anc[np.arange(n, width), np.arange(n, width)] = True
        for i, own in zip(g, nodes):
            rows[i] = r
            cols[i, :len(own)] = own
            cols[i, len(own):] = own[-1]
    out = {"input_ids": out_ids, "position_ids": pos, "real": real, "mask": tree[:, None], "rows": rows, "cols": cols,
           "flat": rows * width + cols}
    if attend == "rows" or (attend == "auto" and len(seqs) * T * T / 2 < n_rows * width * width):
        owner = np.zeros((n_rows, width), dtype=np.int64)
        for i in reversed(range(len(seqs))):
            n = len(seqs[i])
            owner[rows[i, :n], cols[i, :n]] = i * T + np.arange(n)
        out["owner"] = owner
    return {k: torch.from_numpy(v).to(input_ids.device) for k, v in out.items()} | {"n_tokens": int(real.sum())}


@dataclass
class PrefixSharing:
    """The setting every stage that runs batches has (its Config inherits it through RowRules or PromptData)."""

    share_prefixes: bool = True
    """Compute the token prefixes that rows of a batch share (a pair's prompt, a group's prompt, a common system
    prompt) once: each batch runs as packed rows with a tree attention mask (:mod:`deltalign.data.sharing`), the
    same values up to float rounding from fewer tokens. Not with an attention implementation that takes no custom
    mask: there the batch runs padded, as with ``false``."""

    def shares_prefixes(self, backbone) -> bool:
        """Whether this stage's batches run packed (``share_prefixes``, where the backbone allows it)."""
        return self.share_prefixes and backbone.can_share_prefixes()


def with_prefix_tree(batch: dict, on: bool) -> dict:
    """``batch`` with its packed form under ``shared`` when ``on`` and packing saves at least :data:`MIN_SAVING` of
    its tokens (what :func:`deltalign.model.labelled.shared_of` and the forward read); the batch itself unchanged
    otherwise."""
    if on and saving(batch["input_ids"], batch["attention_mask"]) >= MIN_SAVING:
        batch["shared"] = prefix_tree(batch["input_ids"], batch["attention_mask"])
    return batch

