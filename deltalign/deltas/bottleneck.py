"""Bottleneck adapters (Houlsby et al. 2019): down-projection, non-linearity, up-projection, residual.

One adapter after the attention block and/or after the feed-forward block of every decoder layer
(``bottleneck_placement``), applied to that block's output before the layer adds it to the residual stream, as in
the paper. The up-projection starts at zero, so the delta starts as the identity (and, like LoRA's B, the
down-projection gets no gradient before the first update). Not mergeable: the non-linearity has no weight form.
"""

from __future__ import annotations

import torch
from torch import nn

from deltalign.deltas.base import Delta, decoder_layers, key

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
BLOCKS = {"attention": ("self_attn",), "ffn": ("mlp",), "both": ("self_attn", "mlp")}


class Adapter(nn.Module):
    """``h + up(act(down(h)))``."""

    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def _on_first(adapter: Adapter):
    """Apply ``adapter`` to a block's output: a tensor, or the first item of a tuple (attention returns weights too)."""
    def fn(out, x):
        return (adapter(out[0]), *out[1:]) if isinstance(out, tuple) else adapter(out)
    return fn


class Bottleneck(Delta):
    method = "bottleneck"

    def __init__(self, cfg, backbone, init: bool = True):
        super().__init__(cfg)
        lm = backbone.causal_lm
        prefix = f"{lm.base_model_prefix}.layers"
        self.adapters = nn.ModuleDict()
        self.sites: dict[str, str] = {}  # key -> block path in the causal LM
        for i, layer in enumerate(decoder_layers(lm)):
            for block in BLOCKS[cfg.bottleneck_placement]:
                if not hasattr(layer, block):
                    raise ValueError(f"bottleneck: decoder layer {i} has no `{block}` block")
                path = f"{prefix}.{i}.{block}"
                self.adapters[key(path)] = Adapter(lm.config.hidden_size, cfg.bottleneck_size,
                                                   cfg.bottleneck_act)
                self.sites[key(path)] = path

    def attach(self, lm) -> None:
        for k, path in self.sites.items():
            self.hook_output(lm.get_submodule(path), _on_first(self.adapters[k]))
