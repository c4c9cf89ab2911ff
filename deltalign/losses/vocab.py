"""Token log-probs and entropy through the LM head, a chunk of tokens at a time.

``head_logprobs(hidden, weight, targets, temperature)`` equals ``token_logprobs(hidden @ weight.T / temperature,
targets)`` (and ``entropy_from_logits`` of the same logits) in value and gradient, but the full-vocabulary logits
of the whole batch never exist at once: the forward keeps only each token's log-sum-exp, and the backward
recomputes one chunk's logits at a time (the LM head's matmul runs once more per token: ~2 x vocab x hidden FLOPs,
a few per cent of a training step; in exchange [N, V] logits, their softmax and their gradient, each N x V x 4
bytes, are never held for the whole batch). The head weight gets no gradient (a frozen LM head, as in every
stage: deltas adapt the blocks, not the head).

Gradients, with ``z`` the logits of one token at temperature ``t``, ``p = softmax(z)`` and target ``y``:
``d lp / d z = onehot(y) - p``, ``d H / d z = -p * (z - sum(p * z))``, and ``d / d hidden = (d / d z) @ W / t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_TOKENS = 256
"""Tokens per chunk: at SmolLM2's vocabulary (49152) one chunk's float32 logits are 50 MB (the backward holds
three such buffers); the matmul [256, hidden] x [hidden, vocab] is still large enough to run at full speed."""


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, inv_t: float) -> Tensor:
    """``h @ weight.T * inv_t`` written into ``out`` (float32 or wider): one buffer reused by every chunk, instead of a
    fresh allocation per chunk and per elementwise step (at 50 MB each glibc maps them anew, page by page)."""
    if h.dtype == out.dtype == weight.dtype:
        torch.mm(h, weight.T, out=out)
    else:
        out.copy_(h @ weight.T)
    return out.mul_(inv_t) if inv_t != 1.0 else out


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, chunk, want_entropy):
        ctx.set_materialize_grads(False)
        N = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        lp, lse = (torch.empty(N, dtype=dtype, device=hidden.device) for _ in range(2))
        ent = torch.empty(N if want_entropy else 0, dtype=dtype, device=hidden.device)
        z_buf, e_buf = (torch.empty(min(chunk, N), weight.shape[0], dtype=dtype, device=hidden.device)
                        for _ in range(2))
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            z = _logits_into(z_buf[:n], hidden[s:s + n], weight, inv_t)
            top = z.amax(-1, keepdim=True)
            z.sub_(top)  # z - max: exp never overflows
            e = torch.exp(z, out=e_buf[:n])
            total = e.sum(-1)
            rel = total.log()  # log-sum-exp of z - max
            lp[s:s + n] = z.gather(-1, targets[s:s + n, None]).squeeze(-1) - rel
            lse[s:s + n] = top.squeeze(-1) + rel
            if want_entropy:  # H = lse - sum(p z) = rel - sum(e (z - max)) / total
                ent[s:s + n] = rel - torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(n) / total
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return (lp, ent) if want_entropy else lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_lp is None and g_ent is None):
            return None, None, None, None, None, None
        grad = torch.empty_like(hidden)
        N, chunk = hidden.shape[0], ctx.chunk
        z_buf = torch.empty(min(chunk, N), weight.shape[0], dtype=lse.dtype, device=hidden.device)
        p_buf = torch.empty_like(z_buf) if g_ent is not None else None
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            z = _logits_into(z_buf[:n], hidden[s:s + n], weight, ctx.inv_t)
            y = targets[s:s + n, None]
            g = g_lp[s:s + n, None].to(z.dtype) if g_lp is not None else None
            if g_ent is None:  # onehot(y) g - p g, built in the logits' buffer
                dz = z.sub_(lse[s:s + n, None]).exp_().mul_(-g).scatter_add_(-1, y, g)
            else:  # - g_ent p (z - sum(p z)) [+ onehot(y) g - p g], with sum(p z) = lse - H
                p = torch.sub(z, lse[s:s + n, None], out=p_buf[:n]).exp_()
                mean_z = (lse[s:s + n] - ent[s:s + n])[:, None]
                dz = z.sub_(mean_z).mul_(p).mul_(-g_ent[s:s + n, None].to(z.dtype))
                if g is not None:
                    dz.sub_(p.mul_(g)).scatter_add_(-1, y, g)
            if ctx.inv_t != 1.0:
                dz.mul_(ctx.inv_t)
            grad[s:s + n] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
        return grad, None, None, None, None, None


def head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                  entropy: bool = False, chunk_tokens: int = CHUNK_TOKENS):
    """Log-probs of ``targets`` [...] under ``softmax(hidden [..., H] @ weight [V, H].T / temperature)``, in at
    least float32; with ``entropy`` also that distribution's entropy per token. ``weight`` gets no gradient."""
    lead = targets.shape
    out = _HeadLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight.detach(), targets.reshape(-1),
                              1.0 / temperature, max(1, int(chunk_tokens)), bool(entropy))
    if entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)
