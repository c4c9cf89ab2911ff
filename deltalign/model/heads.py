"""Heads on the backbone's last hidden states: the scalar head of the reward model and critic, and the frozen LM
head's logits and log-probs (chunked, or from each rank's rows under ZeRO-3). :class:`deltalign.model.backbone.Backbone`
holds the heads by name and calls these; this module is about what a head computes."""

from __future__ import annotations

import torch
from torch import nn

from deltalign.zero import vocab as zero_vocab
from deltalign.core import verify
from deltalign.core.atomic import save_tensors


class ScalarHead(nn.Module):
    """A linear map from the last hidden state to one number: reward-model score or critic value."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def read(path) -> dict[str, torch.Tensor]:
    """A saved head's tensors (safetensors only; checked whole first: :class:`deltalign.core.verify.Damaged`)."""
    return verify.load_tensors(path)


def write(head: nn.Module, path) -> None:
    """Save a head's tensors to ``path`` (safetensors)."""
    save_tensors({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, path)


def _weight(head: nn.Module) -> tuple[nn.Parameter | None, bool]:
    """The LM head's weight (read without a ZeRO-3 gather) and whether the head is a bias-free linear layer."""
    weight = zero_vocab.weight_of(head)
    return weight, type(head) is nn.Linear and head.bias is None and weight is not None


def lm_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits in float32 for the hidden states given (select positions first: the head is the cost);
    without a gradient under ZeRO-3, from each rank's rows of the head (:func:`deltalign.zero.vocab.logits`)."""
    weight, linear = _weight(head)
    if linear and hasattr(weight, "ds_id"):
        out = zero_vocab.logits(weight, hidden)
        if out is not None:
            return out.float()
    return head(hidden).float()


def lm_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                entropy: bool = False, chunked: bool = True):
    """Log-probs of ``targets`` (and the entropy, if asked) under the LM head at ``temperature``, chunked
    (:func:`deltalign.losses.head_logprobs`: no full-vocabulary logits of the whole batch, the backward
    recomputes each chunk's logits) when the head is a plain frozen linear layer held whole and ``chunked``;
    from each rank's rows when ZeRO-3 partitions it (:func:`deltalign.zero.vocab.head_logprobs`: never
    gathered); otherwise (``chunked=False``: faster where the logits fit; a trained head, hooks) through the
    full logits."""
    from deltalign.losses import entropy_from_logits, head_logprobs, token_logprobs

    weight, linear = _weight(head)
    plain = linear and not weight.requires_grad
    if plain and hasattr(weight, "ds_id"):  # ZeRO-3: from the rows each rank holds, never gathered
        out = zero_vocab.head_logprobs(weight, hidden, targets, temperature, entropy)
        if out is not None:
            return out
    if (chunked and plain and not hasattr(weight, "ds_id") and not head._forward_hooks
            and not head._forward_pre_hooks):
        return head_logprobs(hidden, weight, targets, temperature, entropy=entropy)
    logits = lm_logits(head, hidden)
    logits = logits / temperature if temperature != 1.0 else logits  # no [N, V] copy at temperature 1
    lp = token_logprobs(logits, targets)
    return (lp, entropy_from_logits(logits)) if entropy else lp
