"""Forwards over labelled batches (SFT rows, RM and DPO pairs): hidden states, logits and log-probs only at the
positions that predict a label, the LM head in chunks (:meth:`deltalign.model.backbone.Backbone.lm_logprobs`)."""

from __future__ import annotations

import torch


def shared_of(batch: dict) -> dict:
    """The keyword that makes a forward run the batch packed, when the batch carries its packed form."""
    return {"shared": batch["shared"]} if "shared" in batch else {}


def labelled_hidden(model, batch: dict):
    """Hidden states only at positions that predict a label: ``(hidden [N, H], targets [N], rows [N])``.

    ``model`` is the (possibly accelerate-prepared) callable wrapping the backbone. ``batch['labels']`` is aligned
    with ``input_ids`` (-100 on prompt and pad); position t predicts label t+1. Skipping the LM head on prompt
    and pad positions saves most of its cost (vocab x hidden per token).
    """
    hidden = model(batch["input_ids"], batch["attention_mask"], **shared_of(batch))
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    return hidden[:, :-1][mask], labels[mask], rows


def labelled_logits(backbone, model, batch: dict):
    """LM logits only at positions that predict a label: ``(logits [N, V], targets [N], rows [N])``."""
    hidden, targets, rows = labelled_hidden(model, batch)
    return backbone.lm_logits(hidden), targets, rows


def response_logprobs(backbone, model, batch: dict) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled (response) tokens: shape [B] (the LM head in chunks of
    tokens: :meth:`Backbone.lm_logprobs`)."""
    hidden, targets, rows = labelled_hidden(model, batch)
    token_lp = backbone.lm_logprobs(hidden, targets)
    n_rows = batch["labels"].shape[0]
    return torch.zeros(n_rows, dtype=token_lp.dtype, device=token_lp.device).index_add(0, rows, token_lp)
