"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): unpaired rows, each a
prompt and a completion labelled desirable or undesirable.

The policy's implied reward of a row is ``r = log pi(y|x) - log pi_ref(y|x)`` (summed over the completion). It is
judged against a reference point ``z0``, an estimate of KL(pi || pi_ref) that carries no gradient: the mean of
the same log-ratio over *mismatched* prompt/completion pairs of the batch, clamped at 0. Per row (TRL 1.12's
``loss_type="kto"``, trl/trainer/kto_trainer.py)::

    desirable:    w_D * (1 - sigmoid(beta * (r - z0)))
    undesirable:  w_U * (1 - sigmoid(beta * (z0 - r)))

Two choices differ from TRL's, on purpose:

* mismatched means a *different prompt* (:func:`kto_mismatched_rows`): TRL rotates the completions by one, which
  pairs a prompt with its own answer when split pairs put siblings side by side;
* ``z0`` is the mean over every row of every process (:func:`kto_kl_sum` gives a sum and a count for the caller
  to add up over processes; :func:`kto_reference_point` divides once), so two processes give the value of one;
  TRL averages the per-process means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kto_mismatched_rows(prompt_keys: list) -> list[int]:
    """For each row ``i``, the row ``j`` whose completion it is paired with for the KL estimate: the nearest row
    before ``i`` (cyclically) whose prompt differs, so no prompt meets its own completion. With all prompts
    distinct this is TRL's rotation by one (row i, the completion of row i - 1). Needs at least two different
    prompts in the batch."""
    n = len(prompt_keys)
    if len(set(prompt_keys)) < 2:
        raise ValueError(f"KTO's reference point needs at least two different prompts in a batch (got {n} "
                         f"row(s) of {len(set(prompt_keys))} prompt(s))")
    out = []
    for i, key in enumerate(prompt_keys):
        k = 1
        while prompt_keys[(i - k) % n] == key:
            k += 1
        out.append((i - k) % n)
    return out


def kto_kl_sum(policy_mismatched: Tensor, ref_mismatched: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of policy - reference log-probs over the mismatched pairs, their count)``, detached: add both up
    over processes, then :func:`kto_reference_point`."""
    d = (policy_mismatched - ref_mismatched).detach()
    return d.sum(), torch.tensor(float(d.numel()), dtype=d.dtype, device=d.device)


def kto_reference_point(kl_sum: Tensor, count: Tensor) -> Tensor:
    """``z0 = max(0, kl_sum / count)``, detached (KTO's KL estimate: no gradient flows through it)."""
    return (kl_sum / count).clamp(min=0).detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, z0: Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-row KTO loss [B] and the detached implied rewards ``beta * (policy - reference)`` [B].

    ``policy_logps`` / ``ref_logps``: completion log-probs summed per row; ``desirable``: bool [B]; ``z0``: the
    reference point (:func:`kto_reference_point`). The caller reduces (a mean over the rows of the step)."""
    r = policy_logps - ref_logps
    good = 1 - F.sigmoid(beta * (r - z0))
    bad = 1 - F.sigmoid(beta * (z0 - r))
    loss = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return loss, (beta * r).detach()
