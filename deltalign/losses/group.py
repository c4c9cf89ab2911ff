"""Critic-free group RL (GRPO family): advantages per group, k3 KL, the asymmetrically clipped objective and the
loss aggregations."""

from __future__ import annotations

import torch
from torch import Tensor

from deltalign.losses.ppo import masked_mean
from deltalign.losses.supervised import Metrics


# ------------------------------------------------------- critic-free group RL (GRPO family)
#
# Rewards come as [N, G]: N prompts (groups), G sampled responses each. An advantage is one number per response,
# shared by all its tokens. The loss is a per-token tensor (``clipped_policy_loss``) reduced by one of the
# aggregations, each returning ``(loss_sum, count)`` so the caller divides once by the count of the whole
# (global) minibatch, as ``sft_loss_sum`` does.


def zero_variance_groups(rewards: Tensor) -> Tensor:
    """Bool [N]: groups (rows of ``rewards`` [N, G]) whose G rewards are all exactly equal.

    Every estimator below gives such a group advantage 0: it carries no learning signal (DAPO, Yu et al. 2025,
    counts and resamples them).
    """
    return (rewards == rewards[:, :1]).all(dim=1)


def grpo_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean(r)) / (std(r) + eps)`` within each group.

    ``rewards`` is [N, G]; the std is the UNBIASED one (Bessel, as TRL's ``GRPOTrainer``); ``eps`` (TRL: 1e-4)
    keeps a zero-variance group at advantage 0 instead of NaN. Returns [N, G].
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean(r)``, no std
    scaling (dividing by the std up-weights groups that are nearly all right or all wrong). The paper pairs it
    with a constant loss normaliser: :func:`constant_loss_sum`. Returns [N, G]."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j``, the leave-one-out
    baseline, so each baseline is independent of its own sample (unbiased). Equals ``G/(G-1)`` times
    :func:`dr_grpo_advantages`. Needs G >= 2. Returns [N, G]."""
    G = rewards.shape[1]
    if G < 2:
        raise ValueError(f"rloo_advantages needs at least 2 samples per group, got {G}")
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference) on tokens sampled from the policy (Schulman,
    "Approximating KL divergence"; GRPO's and TRL's KL term): ``exp(d) - d - 1`` with ``d = ref - logp``.
    Unbiased, and >= 0 for every token."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Per-token GRPO loss [B, R] with asymmetric clipping (DAPO's "clip-higher"), 0 outside ``mask``.

    ``ratio = exp(logp - old_logp)``;
    ``loss_t = -min(A * ratio, A * clip(ratio, 1 - clip_low, 1 + clip_high)) + beta * k3_kl(logp, ref)``.
    ``advantages`` is [B] (one per sequence, broadcast over its tokens) or [B, R]. The KL term needs
    ``ref_logprobs`` and counts only when ``beta > 0``. Reduce the result with :func:`token_loss_sum`,
    :func:`sequence_loss_sum` or :func:`constant_loss_sum`.

    Metrics (masked token means, detached): ``clip_low`` = share of tokens with ratio < 1 - clip_low and A < 0,
    ``clip_high`` = ratio > 1 + clip_high and A > 0 (the tokens whose gradient the clip removes, as TRL counts
    them); ``approx_kl`` = k3 estimate of KL(old || new); ``kl`` = mean k3 KL to the reference (when given).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.min(adv * ratio, adv * clipped)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else None
    if kl is not None and beta:
        per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    with torch.no_grad():
        metrics = {
            "clip_low": masked_mean(((ratio < 1.0 - clip_low) & (adv < 0)).to(m.dtype), m),
            "clip_high": masked_mean(((ratio > 1.0 + clip_high) & (adv > 0)).to(m.dtype), m),
            "approx_kl": masked_mean((ratio - 1) - logratio, m),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, m)
    return per_token * m, metrics


def token_loss_sum(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """DAPO's token-level aggregation: ``(sum of the masked per-token losses, number of masked tokens)``.
    Divided once by the count over the whole (global) minibatch, every token weighs the same, so long
    responses are not down-weighted as in the per-sequence mean (TRL's ``loss_type="dapo"``, its default)."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(), m.sum()


def sequence_loss_sum(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """GRPO's original aggregation: the mean over each sequence's tokens, then over sequences. Returns
    ``(sum over sequences of their token means, number of sequences)``; a row without tokens counts as 0."""
    m = mask.to(per_token.dtype)
    return masked_mean(per_token, m, dim=1).sum(), torch.tensor(float(per_token.shape[0]), dtype=per_token.dtype)


def constant_loss_sum(per_token: Tensor, mask: Tensor, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Dr. GRPO's aggregation: the token sum over a constant, ``sequences x max_tokens`` (the generation budget),
    so the loss weight of a token depends neither on its response's length nor on the batch's token count.
    Returns ``(sum of the masked per-token losses, sequences x max_tokens)``."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(), torch.tensor(float(per_token.shape[0] * max_tokens), dtype=per_token.dtype)
