"""Vocabulary-parallel embedding lookup and LM-head log-probs under ZeRO-3: the vocabulary table is never gathered.

ZeRO-3 keeps 1/world of every parameter's flattened values on each rank; for a [V, H] table whose partition
splits at row boundaries, rank r holds rows ``[r * V / world, (r + 1) * V / world)``. Gathering the table costs
V x H values on every rank at each use -- the first module of every forward, the LM head, the head's backward:
for a 1B Llama with SmolLM2's 49152-token vocabulary that is 0.4 GB in float32, more than any decoder layer. So:

* :func:`lookup`: the ranks exchange their token ids, each fills the rows it holds, an all-reduce sums them;
* :func:`logits` (no gradient, for generation): each rank scores every rank's hidden states over its rows, an
  all-gather joins the vocabulary slices;
* :func:`head_logprobs`: the ranks exchange the hidden states to score; each computes the logits over its own
  rows a chunk of tokens at a time and keeps its log-sum-exp, target logit and sum of p * z; one all-gather per
  chunk combines them. The backward exchanges the output gradients and all-reduces each rank's share of the
  hidden-state gradient (the formulas of :mod:`deltalign.losses.vocab`, over a slice of the vocabulary).

Both return None where they do not apply (no ZeRO-3 partition, the table gathered right now, or a partition that
cuts a row): the caller then uses the module as usual. Every rank must call them together, as ZeRO-3 already
requires of every forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from deltalign.losses.vocab import CHUNK_TOKENS


def weight_of(module):
    """``module.weight`` read without DeepSpeed's gather-on-access: inside a ZeRO-3 engine's forward, reading a
    partitioned parameter as a module attribute gathers it whole (and ties it to the module running); reading the
    module's parameter table does not."""
    return dict(module.named_parameters(recurse=False)).get("weight")


def shard_rows(weight) -> tuple[Tensor, int] | None:
    """``(rows this rank holds [n, H], index of its first row)`` of a ZeRO-3-partitioned [V, H] weight that is not
    gathered now and whose partition splits at row boundaries (the same answer on every rank); else None."""
    if not hasattr(weight, "ds_id") or not dist.is_initialized() or len(weight.ds_shape) != 2:
        return None
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return None
    V, H = weight.ds_shape
    part = weight.ds_tensor.numel()
    if part % H:
        return None
    rows = part // H
    first = dist.get_rank() * rows
    return weight.ds_tensor.detach().view(rows, H)[: max(0, min(rows, V - first))], first


def _every_rank(x: Tensor) -> tuple[Tensor, int, int]:
    """``x`` [n, ...] of every rank, zero-padded to the longest: ``([world * m, ...], m, n)``."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    m = max(int(c) for c in counts)
    padded = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts), m, x.shape[0]


def _own(x: Tensor, m: int, n: int) -> Tensor:
    """This rank's ``n`` rows of an :func:`_every_rank` result padded to ``m`` rows per rank."""
    rank = dist.get_rank()
    return x[rank * m: rank * m + n]


def lookup(weight, ids: Tensor) -> Tensor | None:
    """The embeddings of ``ids`` [...] -> [..., H] from the rows each rank holds (None: use the module)."""
    shard = shard_rows(weight)
    if shard is None:
        return None
    rows, first = shard
    all_ids, m, n = _every_rank(ids.reshape(-1))
    local = all_ids - first
    hit = (local >= 0) & (local < rows.shape[0])
    out = rows.new_zeros((all_ids.shape[0], rows.shape[1]))
    out[hit] = rows[local[hit]]
    dist.all_reduce(out)  # each id's row comes from exactly one rank
    return _own(out, m, n).view(*ids.shape, rows.shape[1])


def logits(weight, hidden: Tensor) -> Tensor | None:
    """Full-vocabulary logits [..., V] of ``hidden`` [..., H] without a gradient (generation's next-token scores)
    from the rows each rank holds: each scores every rank's rows over its slice, an all-gather joins the slices.
    None where :func:`shard_rows` does not apply or a gradient is wanted."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return None
    shard = shard_rows(weight)
    if shard is None:
        return None
    rows, first = shard
    full = weight.ds_tensor.numel() // rows.shape[1]  # rows per rank before the last rank's cut
    h, m, n = _every_rank(hidden.reshape(-1, hidden.shape[-1]))
    local = h.to(rows.dtype) @ rows.T
    local = torch.cat([local, local.new_full((local.shape[0], full - rows.shape[0]), float("-inf"))], dim=1)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    out = _own(torch.cat(parts, dim=1), m, n)[:, : weight.ds_shape[0]]
    return out.view(*hidden.shape[:-1], out.shape[-1])


def _combine(stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-rank ``[3, c]`` (local log-sum-exp, local sum of p * z under the local softmax, target logit or 0) of
    every rank -> global log-sum-exp, mean of z under the full softmax, target logit [c]."""
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stats)
    s = torch.stack(parts)  # [world, 3, c]
    lse = s[:, 0].logsumexp(0)
    w = (s[:, 0] - lse).exp()  # each rank's share of the probability mass
    return lse, (w * s[:, 1]).sum(0), s[:, 2].sum(0)


class _ShardedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, rows, first, targets, inv_t, want_entropy):
        ctx.set_materialize_grads(False)
        h, m, n = _every_rank(hidden.detach())
        t, _, _ = _every_rank(targets)
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        lse, mean_z, lp = (torch.empty(h.shape[0], dtype=dtype, device=h.device) for _ in range(3))
        for s in range(0, h.shape[0], CHUNK_TOKENS):
            z = (h[s:s + CHUNK_TOKENS].to(rows.dtype) @ rows.T).to(dtype) * inv_t
            local_lse = z.logsumexp(-1)
            p = (z - local_lse[:, None]).exp()
            y = t[s:s + CHUNK_TOKENS] - first
            hit = (y >= 0) & (y < rows.shape[0])
            zt = torch.where(hit, z.gather(-1, y.clamp(0, rows.shape[0] - 1)[:, None]).squeeze(-1), 0.0)
            out = _combine(torch.stack([local_lse, (p * z).sum(-1), zt]))
            lse[s:s + CHUNK_TOKENS], mean_z[s:s + CHUNK_TOKENS], lp[s:s + CHUNK_TOKENS] = out
        lp = lp - lse
        ctx.save_for_backward(h, t, lse, mean_z)
        ctx.rows, ctx.first, ctx.inv_t, ctx.m, ctx.n, ctx.hidden_dtype = rows, first, inv_t, m, n, hidden.dtype
        return (_own(lp, m, n), _own(lse - mean_z, m, n)) if want_entropy else _own(lp, m, n)

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        h, t, lse, mean_z = ctx.saved_tensors
        rows, first, inv_t = ctx.rows, ctx.first, ctx.inv_t
        zero = torch.zeros(ctx.n, dtype=lse.dtype, device=lse.device)
        # every rank takes part whatever its own gradients are: the others need its share of theirs
        G_lp, _, _ = _every_rank((g_lp if g_lp is not None else zero).to(lse.dtype))
        G_ent, _, _ = _every_rank((g_ent if g_ent is not None else zero).to(lse.dtype))
        grad = torch.zeros(h.shape[0], rows.shape[1], dtype=rows.dtype, device=h.device)
        for s in range(0, h.shape[0], CHUNK_TOKENS):
            c = slice(s, s + CHUNK_TOKENS)
            z = (h[c].to(rows.dtype) @ rows.T).to(lse.dtype) * inv_t
            p = (z - lse[c, None]).exp()
            dz = -p * (G_lp[c, None] + G_ent[c, None] * (z - mean_z[c, None]))
            y = t[c] - first
            hit = (y >= 0) & (y < rows.shape[0])
            dz[hit, y[hit]] += G_lp[c][hit]
            grad[c] = (dz * inv_t).to(rows.dtype) @ rows
        dist.all_reduce(grad)
        return _own(grad, ctx.m, ctx.n).to(ctx.hidden_dtype), None, None, None, None, None


def head_logprobs(weight, hidden: Tensor, targets: Tensor, temperature: float = 1.0, entropy: bool = False):
    """Log-probs of ``targets`` [N] (and the entropy, if asked) under ``softmax(hidden [N, H] @ weight.T /
    temperature)`` from the rows each rank holds; None where :func:`shard_rows` does not apply."""
    shard = shard_rows(weight)
    if shard is None:
        return None
    rows, first = shard
    lead = targets.shape
    out = _ShardedHead.apply(hidden.reshape(-1, hidden.shape[-1]), rows, first, targets.reshape(-1),
                             1.0 / temperature, bool(entropy))
    return (out[0].view(lead), out[1].view(lead)) if entropy else out.view(lead)
