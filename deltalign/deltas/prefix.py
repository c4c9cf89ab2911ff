"""Prefix tuning (Li & Liang 2021) / P-tuning v2 (Liu et al. 2022): trainable keys and values in front of every layer.

Every attention layer attends to ``prefix_length`` extra key/value positions before the sequence. By default they
are trained directly (P-tuning v2); with ``prefix_projection`` they come out of a reparameterisation MLP over
``prefix_length`` trainable embeddings (prefix-tuning). :mod:`deltalign.deltas.sequence` feeds them to the model as
a KV cache with the attention mask extended, so callers see nothing of them. They start as the base model's own
keys/values over ``init_text`` (or random tokens): a natural state, not noise. Not mergeable: extra attention
positions have no weight form.
"""

from __future__ import annotations

import torch
from torch import nn

from deltalign.deltas.base import Delta, decoder_layers, full_weights, init_token_ids, inner


class Prefix(Delta):
    method = "prefix"

    def __init__(self, cfg, backbone, init: bool = True):
        super().__init__(cfg)
        lm = backbone.causal_lm
        c = lm.config
        heads = c.num_attention_heads
        self.layers = c.num_hidden_layers
        self.kv_heads = getattr(c, "num_key_value_heads", None) or heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        n = cfg.prefix_length
        ids = init_token_ids(cfg.init_text, n, backbone.tokenizer, c.vocab_size) if init else None
        if cfg.prefix_projection:  # embeddings -> Linear -> tanh -> Linear -> every layer's keys and values
            emb, start = lm.get_input_embeddings().weight, torch.zeros(n, c.hidden_size)
            if init:
                with full_weights([emb]):
                    start = emb[ids.to(emb.device)].detach().float().cpu().clone()
            self.embedding = nn.Parameter(start)
            self.mlp = nn.Sequential(nn.Linear(c.hidden_size, cfg.prefix_hidden), nn.Tanh(),
                                     nn.Linear(cfg.prefix_hidden, self.layers * 2 * self.kv_heads * self.head_dim))
        else:
            shape = (self.layers, 2, self.kv_heads, n, self.head_dim)
            self.kv = nn.Parameter(self._base_kv(lm, ids) if init else torch.zeros(shape))

    @staticmethod
    @torch.no_grad()
    def _base_kv(lm, ids: torch.Tensor) -> torch.Tensor:
        """The base model's keys and values over ``ids``: [layers, 2, kv_heads, n, head_dim] (the caller has every
        delta off)."""
        device = next(lm.parameters()).device
        with full_weights(list(inner(lm).parameters())):  # ZeRO-3: one forward over the gathered base
            cache = inner(lm)(input_ids=ids[None].to(device), use_cache=True).past_key_values
        return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).float().cpu()

    def attach(self, lm) -> None:
        # The prefix cache is read-only (never written by the layers), so a gradient-checkpointing replay of a layer
        # reads the same keys; transformers drops a cache under checkpointing unless the layer says so.
        for layer in decoder_layers(lm):
            layer._can_checkpoint_with_cache = True

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.cfg.prefix_projection:
            n = self.embedding.shape[0]
            flat = self.mlp(self.embedding)  # [n, layers * 2 * kv_heads * head_dim]
            kv = flat.view(n, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        else:
            kv = self.kv
        return [(kv[i, 0].expand(batch_size, -1, -1, -1), kv[i, 1].expand(batch_size, -1, -1, -1))
                for i in range(self.layers)]

    def prefix_kv(self, batch_size: int):
        return self(batch_size)  # called as a module: ZeRO-3 gathers the parameters for it
