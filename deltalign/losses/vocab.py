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


def _logits(h: Tensor, weight: Tensor, inv_t: float) -> Tensor:
    z = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))
    return z * inv_t if inv_t != 1.0 else z


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, chunk, want_entropy):
        ctx.set_materialize_grads(False)
        N = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        lp = torch.empty(N, dtype=dtype, device=hidden.device)
        ent = torch.empty(N, dtype=dtype, device=hidden.device) if want_entropy else None
        for s in range(0, N, chunk):
            z = _logits(hidden[s:s + chunk], weight, inv_t)
            lse = z.logsumexp(-1)
            lp[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse
            if want_entropy:
                p = (z - lse[:, None]).exp_()
                ent[s:s + chunk] = lse - (p * z.nan_to_num(neginf=0.0)).sum(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return (lp, ent) if want_entropy else lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_lp is None and g_ent is None):
            return None, None, None, None, None, None
        grad = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], ctx.chunk):
            z = _logits(hidden[s:s + ctx.chunk], weight, ctx.inv_t)
            p = torch.softmax(z, -1)
            if g_lp is not None:  # onehot(y) * g - p * g
                g = g_lp[s:s + ctx.chunk, None].to(z.dtype)
                dz = (p * -g).scatter_add_(-1, targets[s:s + ctx.chunk, None], g)
            else:
                dz = torch.zeros_like(z)
            if g_ent is not None:
                zf = z.nan_to_num(neginf=0.0)
                mean_z = (p * zf).sum(-1, keepdim=True)
                dz.sub_(p * (zf - mean_z) * g_ent[s:s + ctx.chunk, None].to(z.dtype))
            grad[s:s + ctx.chunk] = ((dz * ctx.inv_t).to(weight.dtype) @ weight).to(hidden.dtype)
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
