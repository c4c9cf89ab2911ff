"""SFT, reward-model and DPO-family losses: pure functions on tensors, one per variant."""

from __future__ import annotations

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


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Mächler 2012): ``log(-expm1(x))`` near 0,
    ``log1p(-exp(x))`` far below it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_loss(chosen_mean_logp: Tensor, rejected_mean_logp: Tensor, lam: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, Eqs. 4-7), per pair; no reference model.

    Inputs are *length-averaged* response log-probs [B] (``l = log P(y|x) / |y|``).
    ``log_odds = (l_c - l_r) - (log1mexp(l_c) - log1mexp(l_r))``, the log of the odds ratio
    ``odds(y_c) / odds(y_r)`` with ``odds(y) = P / (1 - P)``; the term is ``-lam * log sigmoid(log_odds)``.
    The whole ORPO loss is the chosen response's NLL plus the mean of this term (``lam`` is the paper's λ, TRL's
    ``beta``). Returns ``(term_per_pair, log_odds, chosen_reward, rejected_reward)``, the rewards the detached
    ``lam * l`` (as TRL logs them).
    """
    lc, lr = _f32(chosen_mean_logp), _f32(rejected_mean_logp)
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    return -lam * F.logsigmoid(log_odds), log_odds.detach(), (lam * lc).detach(), (lam * lr).detach()
