"""Pure loss functions for SFT, reward modelling, DPO-family, PPO and critic-free group RL (GRPO family).

Every loss is a plain function on tensors: no module state and no model calls.
There is one function per variant (no mode strings). Losses return the loss and,
where useful, detached metrics. The KL controllers at the end are the only
stateful helpers here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]


def _f32(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------- SFT


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Return per-token ``log p(label)`` with the shape of ``labels``, and 0 where ignored.

    ``logits`` is [B, T, V] and already aligned with ``labels`` [B, T]: the caller
    shifts them (logits[:, :-1] predicts labels[:, 1:]). log_softmax runs in float32
    (or float64 if the logits are float64).
    """
    mask = labels != ignore_index
    logp = torch.log_softmax(_f32(logits), dim=-1)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out * mask


def sft_loss_sum(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Return ``(loss_sum, n_tokens)``: summed token cross-entropy and the count of tokens.

    ``loss_sum = -sum_t log p(y_t)`` over tokens with ``labels != ignore_index``. It
    is a SUM, not a mean, so that gradient accumulation can divide once by the
    total token count of the whole optimizer step (the micro-batch token-mean
    would overweight short micro-batches). ``n_tokens`` is a long scalar tensor.
    """
    loss_sum = -token_logprobs(logits, labels, ignore_index).sum()
    return loss_sum, (labels != ignore_index).sum()


# ------------------------------------------------------------------ reward model


def bradley_terry_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    margin: Tensor | None = None,
    magnitude_coef: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Pairwise Bradley-Terry reward-model loss, per pair (the caller reduces it).

    ``loss = -logsigmoid(r_c - r_r - m) + c * (r_c + r_r)^2``

    * ``m`` is an optional margin for each pair (Llama 2, Touvron et al. 2023, Sec. 3.2.2).
    * ``c = magnitude_coef`` is the "center rewards" regulariser, which pushes
      rewards towards zero mean (TRL ``RewardConfig.center_rewards_coefficient``,
      from Eisenstein et al. 2023).

    Metrics: ``accuracy`` = mean(r_c > r_r), ``margin`` = mean(r_c - r_r).
    """
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits)
    if magnitude_coef:
        loss = loss + magnitude_coef * (r_chosen + r_rejected) ** 2
    d = diff.detach()
    return loss, {"accuracy": (d > 0).float().mean(), "margin": d.float().mean()}


# -------------------------------------------------------------------- DPO family


def _rewards(beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def dpo_sigmoid_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss (Rafailov et al. 2023), with optional conservative label smoothing.

    Inputs are log-probs summed over each response, shape [B].
    ``h = (pi_c - ref_c) - (pi_r - ref_r)``,
    ``loss = -(1 - eps) * logsigmoid(beta h) - eps * logsigmoid(-beta h)``.
    ``eps > 0`` is conservative DPO (cDPO, Mitchell 2023; TRL ``label_smoothing``).
    When policy == reference, h = 0 and the loss is exactly ln 2 for any beta.

    Returns ``(loss_per_pair, chosen_reward, rejected_reward)``. Each reward is the
    detached ``beta * (policy - ref)``.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing:
        loss = loss - label_smoothing * F.logsigmoid(-beta * h)
    return (loss, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO loss (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17).

    ``loss = (h - 1/(2 beta))^2`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``.
    By default this is the paper's form, on log-probs summed over each response.
    TRL instead divides each log-ratio by the response length. To get TRL's form,
    pass ``chosen_len`` and ``rejected_len`` (token counts, [B]). Then
    ``h = (pi_c - ref_c)/|y_c| - (pi_r - ref_r)/|y_r|``. The returned rewards are
    always the detached, summed ``beta * (policy - ref)``, whichever form is used.
    """
    lc = policy_chosen - ref_chosen
    lr = policy_rejected - ref_rejected
    if (chosen_len is None) != (rejected_len is None):
        raise ValueError("pass both chosen_len and rejected_len, or neither")
    if chosen_len is not None:
        lc, lr = lc / chosen_len.to(lc.dtype), lr / rejected_len.to(lr.dtype)
    loss = (lc - lr - 1.0 / (2.0 * beta)) ** 2
    return (loss, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO loss (Meng et al. 2024), which needs no reference model.

    ``loss = -logsigmoid(beta * pi_c/|y_c| - beta * pi_r/|y_r| - gamma)``

    ``pi`` are summed response log-probs and ``|y|`` are response token counts.
    ``gamma`` is the target reward margin from the paper. TRL's CPO/SimPO trainer
    has a ``gamma_beta_ratio`` setting instead, and ``gamma = beta * gamma_beta_ratio``.
    Returns ``(loss_per_pair, chosen_reward, rejected_reward)``, where each reward
    is the detached, length-normalised ``beta * pi / |y|``.
    """
    rc = beta * policy_chosen / chosen_len.to(policy_chosen.dtype)
    rr = beta * policy_rejected / rejected_len.to(policy_rejected.dtype)
    loss = -F.logsigmoid(rc - rr - gamma)
    return loss, rc.detach(), rr.detach()


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
