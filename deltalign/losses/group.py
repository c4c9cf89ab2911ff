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
    per_token = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    m = mask.to(per_token.dtype)
    with torch.no_grad():
        metrics = {
            "clip_low": masked_mean(((ratio < 1.0 - clip_low) & (adv < 0)).to(m.dtype), m),
            "clip_high": masked_mean(((ratio > 1.0 + clip_high) & (adv > 0)).to(m.dtype), m),
            "approx_kl": masked_mean((ratio - 1) - logratio, m),
        }
    return _with_kl(per_token, m, metrics, logprobs, ref_logprobs, beta)


def _with_kl(per_token: Tensor, m: Tensor, metrics: Metrics, logprobs: Tensor, ref_logprobs: Tensor | None,
             beta: float) -> tuple[Tensor, Metrics]:
    """``per_token`` plus ``beta`` times the per-token k3 KL to the reference (when given), masked; the KL's
    masked mean into ``metrics["kl"]``."""
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        if beta:
            per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), m)
    return per_token * m, metrics


def sequence_clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one importance ratio per *sequence*,
    ``s = exp(mean over the response's tokens of (logp - old_logp))``, clipped two-sided per sequence;
    ``loss = -min(A * s, A * clip(s, 1 - clip_low, 1 + clip_high))`` on each of its tokens (so
    :func:`sequence_loss_sum` gives the paper's per-sequence objective), plus ``beta`` times the per-token k3 KL.
    TRL 1.12's ``importance_sampling_level="sequence"``. The paper's clip range is tiny (3e-4 / 4e-4): a
    sequence's mean log-ratio moves far less than a token's. ``advantages`` is [B]. Metrics: ``ratio`` (the mean
    sequence ratio), ``clip_low`` / ``clip_high`` (shares of *sequences* the clip stops), ``kl``.
    """
    m = mask.to(logprobs.dtype)
    ratio = torch.exp(masked_mean(logprobs - old_logprobs, m, dim=1))  # [B]
    per_seq = -torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    per_token = per_seq.unsqueeze(-1).expand_as(logprobs)
    with torch.no_grad():
        metrics = {"ratio": ratio.mean(),
                   "clip_low": ((ratio < 1.0 - clip_low) & (advantages < 0)).to(m.dtype).mean(),
                   "clip_high": ((ratio > 1.0 + clip_high) & (advantages > 0)).to(m.dtype).mean()}
    return _with_kl(per_token, m, metrics, logprobs, ref_logprobs, beta)


def cispo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_max: float = 5.0,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """CISPO (MiniMax-M1, 2025): clip the importance *weight*, not the update, so every token keeps a gradient.
    ``loss_t = -sg(min(ratio_t, eps_max)) * A * logp_t`` (+ ``beta`` k3 KL), ``sg`` = stop-gradient; ``eps_max``
    is an absolute cap on the ratio (TRL 1.12 ``loss_type="cispo"`` with ``epsilon_high``; ScaleRL recommends 5),
    with no lower clip. Reduce with :func:`token_loss_sum` (the global token count, as TRL). Metrics:
    ``clip_high`` = share of tokens whose weight the cap lowered, ``approx_kl`` as :func:`clipped_policy_loss`."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    per_token = -torch.clamp(ratio, max=eps_max).detach() * adv * logprobs
    m = mask.to(per_token.dtype)
    with torch.no_grad():
        metrics = {"clip_high": masked_mean((ratio > eps_max).to(m.dtype), m),
                   "approx_kl": masked_mean((ratio - 1) - logratio, m)}
    return _with_kl(per_token, m, metrics, logprobs, ref_logprobs, beta)


def soft_overlong_penalty(lengths: Tensor, max_tokens: int, cache: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13; TRL's ``get_soft_overlong_punishment``), a reward
    term per response: 0 up to ``max_tokens - cache`` tokens, then falling linearly to -1 at ``max_tokens``, -1
    beyond. ``cache`` 0: no penalty within the budget."""
    if not 0 <= cache <= max_tokens:
        raise ValueError(f"the overlong cache ({cache}) must lie in [0, max_tokens={max_tokens}]")
    lengths = lengths.to(torch.float64)
    start = max_tokens - cache
    soft = (start - lengths) / cache if cache else torch.zeros_like(lengths)
    return torch.where(lengths <= start, torch.zeros_like(lengths),
                       torch.where(lengths <= max_tokens, soft, torch.full_like(lengths, -1.0)))


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
