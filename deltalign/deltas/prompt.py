"""Prompt tuning (Lester et al. 2021): trainable soft-prompt embeddings prepended to every input.

``prompt_length`` vectors in the input-embedding space, initialised from the token embeddings of ``init_text``
(repeated to the length) or of random vocabulary tokens. :mod:`deltalign.deltas.sequence` puts them in front of
the input embeddings, extends the attention mask and drops their positions from the output, so callers see
nothing of them. Not mergeable: extra input positions have no weight form.
"""

from __future__ import annotations

import torch
from torch import nn

from deltalign.deltas.base import Delta, full_weights, init_token_ids, width


class Prompt(Delta):
    method = "prompt"

    def __init__(self, cfg, backbone, init: bool = True):
        super().__init__(cfg)
        lm = backbone.causal_lm
        emb = lm.get_input_embeddings().weight
        if init:
            ids = init_token_ids(cfg.init_text, cfg.prompt_length, backbone.tokenizer, lm.config.vocab_size)
            with full_weights([emb]):
                self.embeds = nn.Parameter(emb[ids.to(emb.device)].detach().float().cpu().clone())
        else:
            self.embeds = nn.Parameter(torch.zeros(cfg.prompt_length, width(emb)))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeds.unsqueeze(0).expand(batch_size, -1, -1)

    def front_embeds(self, batch_size: int) -> torch.Tensor:
        return self(batch_size)  # called as a module: ZeRO-3 gathers the parameter for it
