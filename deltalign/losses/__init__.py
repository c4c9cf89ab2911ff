"""Pure loss functions for SFT, reward modelling, DPO-family, PPO and critic-free group RL (GRPO family).

Every loss is a plain function on tensors: no module state and no model calls. There is one function per variant
(no mode strings). Losses return the loss and, where useful, detached metrics. The KL controllers are the only
stateful helpers here. Five modules, one import path (``from deltalign.losses import ...``):

* :mod:`~deltalign.losses.supervised`: token log-probs, SFT cross-entropy, Bradley-Terry, DPO / IPO / SimPO, ORPO's
  odds-ratio term;
* :mod:`~deltalign.losses.unpaired`: KTO (unpaired rows labelled desirable / undesirable) and its reference point;
* :mod:`~deltalign.losses.ppo`: masked statistics, KL-penalised rewards, GAE, clipped policy and value losses,
  entropy, the KL controllers;
* :mod:`~deltalign.losses.group`: GRPO / Dr. GRPO / RLOO advantages, k3 KL, the asymmetrically clipped objective
  and its sequence-level (GSPO) and clipped-weight (CISPO) variants, DAPO's soft overlong penalty, token /
  sequence / constant loss aggregation;
* :mod:`~deltalign.losses.vocab`: token log-probs and entropy through the LM head in chunks of tokens (no
  full-vocabulary logits of a whole batch).
"""

from deltalign.losses.group import (cispo_policy_loss, clipped_policy_loss, constant_loss_sum, dr_grpo_advantages,
                                    grpo_advantages, k3_kl, rloo_advantages, sequence_clipped_policy_loss,
                                    sequence_loss_sum, soft_overlong_penalty, token_loss_sum, zero_variance_groups)
from deltalign.losses.ppo import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae_advantages,
                                  kl_penalty_rewards, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss)
from deltalign.losses.supervised import (Metrics, bradley_terry_loss, dpo_sigmoid_loss, ipo_loss, log1mexp,
                                         orpo_odds_loss, sft_loss_sum, simpo_loss, token_logprobs)
from deltalign.losses.unpaired import kto_kl_sum, kto_loss, kto_mismatched_rows, kto_reference_point
from deltalign.losses.vocab import head_logprobs

__all__ = ["AdaptiveKLController", "FixedKLController", "Metrics", "bradley_terry_loss", "cispo_policy_loss",
           "clipped_policy_loss", "constant_loss_sum", "dpo_sigmoid_loss", "dr_grpo_advantages", "entropy_from_logits",
           "gae_advantages", "grpo_advantages", "head_logprobs", "ipo_loss", "k3_kl", "kl_penalty_rewards",
           "kto_kl_sum", "kto_loss", "kto_mismatched_rows", "kto_reference_point", "log1mexp", "masked_mean",
           "masked_whiten", "orpo_odds_loss", "ppo_policy_loss", "ppo_value_loss", "rloo_advantages",
           "sequence_clipped_policy_loss", "sequence_loss_sum", "sft_loss_sum", "simpo_loss",
           "soft_overlong_penalty", "token_logprobs", "token_loss_sum", "zero_variance_groups"]
