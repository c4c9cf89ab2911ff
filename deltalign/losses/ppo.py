"""PPO pieces (masked statistics, KL-penalised rewards, GAE, clipped policy and value losses, entropy) and the KL
controllers, the only stateful helpers among the losses."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from deltalign.losses.supervised import Metrics, _f32


# --------------------------------------------------------------------------- PPO


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Return the mean of ``x`` over entries where ``mask`` is 1, over all entries or along ``dim``.

    An empty mask gives 0, not NaN.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True,
                  all_sum: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """Normalise ``x`` over its masked entries to mean 0 and std 1.

    ``(x - mean) / sqrt(var + 1e-8)``, with the UNBIASED variance (Bessel factor
    n/(n-1)), as TRL and OpenRLHF compute it. With ``shift_mean=False`` the mean is
    added back, so only the scale changes (TRL does this to whiten rewards).
    Entries outside the mask are set to 0. Needs at least 2 masked entries.
    ``all_sum`` sums a tensor over processes: with it, the statistics are those of
    the global batch (as if one process held every row).
    """
    m = mask.to(x.dtype)
    n, total = all_sum(torch.stack([m.sum(), (x * m).sum()])).unbind()
    if n < 2:
        raise ValueError(f"masked_whiten needs >= 2 masked entries, got {int(n)}")
    mean = total / n
    var = all_sum(((x - mean) ** 2 * m).sum()) / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalty_rewards(
    score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: a KL penalty on every response token, plus the score at the end.

    ``kl_t = logprobs_t - ref_logprobs_t`` (the k1 estimator) on response tokens
    (``mask`` == 1), and 0 elsewhere. ``reward_t = -kl_coef * kl_t``. The scalar
    ``score`` [B] is added at the LAST response token of each row, which is the
    last 1 in ``mask``, so left or right padding both work. A row with no
    response token gets no score. This follows Ziegler et al. 2019 and
    "The N Implementation Details of RLHF with PPO" (Huang et al. 2023).
    Returns ``(rewards, kl)``, both [B, T].
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values
    has = last >= 0
    add = torch.zeros_like(rewards)
    add[has, last[has]] = score[has].to(rewards.dtype)
    return rewards + add, kl


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), backwards in time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma*lam*A_{t+1}``,
    over the response tokens (``mask`` == 1, one contiguous span per row). Values
    and advantages after the end of the response count as 0. The outputs are
    0 outside the mask. ``returns = advantages + values`` are the value targets.
    Both outputs are detached: they are targets, not differentiable quantities.
    """
    m = mask.to(values.dtype)
    r, v = rewards.detach() * m, values.detach() * m
    T = r.shape[1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Metrics]:
    """Clipped PPO surrogate (Schulman et al. 2017), as a masked mean over response tokens.

    ``ratio = exp(logp - old_logp)``,
    ``loss = mean(max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)))``.
    Metrics: ``clipfrac`` is the fraction of tokens where the clipped term is
    active. ``approx_kl`` is the k3 estimator ``mean((ratio - 1) - log ratio)`` of
    KL(old || new) (Schulman's "Approximating KL divergence", as in cleanrl).
    It is unbiased and >= 0.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((pg2 > pg1).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - logratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Metrics]:
    """Clipped value loss (OpenAI baselines PPO2, cleanrl, TRL).

    ``v_clip = old_v + clip(v - old_v, -eps, eps)``,
    ``loss = 0.5 * mean(max((v - R)^2, (v_clip - R)^2))`` over masked tokens.
    Metric ``clipfrac``: the fraction of tokens where the clipped error is the larger one.
    """
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((l2 > l1).float(), mask)}
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Return per-token entropy ``H = -sum_v p_v log p_v`` with ``p = softmax(logits)``, shape [B, T].

    Runs in at least float32. A logit of -inf (a banned token) adds 0, not NaN.
    """
    logp = torch.log_softmax(_f32(logits), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


# ----------------------------------------------------------------- KL controllers


class FixedKLController:
    """Constant KL coefficient. ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``.
    If the KL is above target the coefficient grows; if below, it shrinks.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = (float(state[k]) for k in ("value", "target", "horizon"))
