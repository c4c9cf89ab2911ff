"""IA3 (Liu et al. 2022): learned vectors that rescale the attention keys and values and the feed-forward activation.

Each targeted linear layer gets one vector, initialised to ones (the delta starts as the identity): the OUTPUT of a
key/value projection is multiplied by it, and the INPUT of a feed-forward layer (``down_proj``: the activation) is.
Mergeable: scaling a linear layer's output rows or input columns is a change of its weight.
"""

from __future__ import annotations

import torch
from torch import nn

from deltalign.deltas.base import Delta, inner, key, logical

DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")  # peft's defaults for Llama-style models


def feedforward(name: str) -> bool:
    """Whether IA3 scales this target's input (feed-forward layers) rather than its output."""
    return "mlp" in name or name in ("down_proj", "up_proj")


class Scale(nn.Module):
    """One learned vector: ``x * weight`` along the last dimension."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.to(x.dtype)


class IA3(Delta):
    method = "ia3"

    def __init__(self, cfg, backbone, init: bool = True):
        super().__init__(cfg)
        targets = cfg.target_modules
        targets = list(DEFAULT_TARGETS) if targets == "all-linear" else [targets] if isinstance(targets, str) \
            else list(targets)
        self.scales = nn.ModuleDict()
        self.sites: dict[str, tuple[str, bool]] = {}  # key -> (module path in the causal LM, scales the input)
        prefix = backbone.causal_lm.base_model_prefix
        for path, mod in inner(backbone.causal_lm).named_modules():
            name = logical(path)
            hit = next((t for t in targets if name == t or name.endswith("." + t)), None)
            if hit is None or not isinstance(mod, nn.Linear) or key(name) in self.sites:
                continue
            on_input = feedforward(hit)
            self.scales[key(name)] = Scale(mod.in_features if on_input else mod.out_features)
            self.sites[key(name)] = (f"{prefix}.{path}", on_input)
        if not self.sites:
            raise ValueError(f"ia3: no linear layer matches adapter.target_modules {targets}")

    def attach(self, lm) -> None:
        for k, (path, on_input) in self.sites.items():
            scale = self.scales[k]
            if on_input:
                self.hook_input(lm.get_submodule(path), scale)
            else:
                self.hook_output(lm.get_submodule(path), lambda out, x, s=scale: s(out))

    @torch.no_grad()
    def merge(self, lm) -> None:
        for k, (path, on_input) in self.sites.items():
            mod = lm.get_submodule(path)
            s = self.scales[k].weight.to(mod.weight.dtype)
            if on_input:
                mod.weight.mul_(s[None, :])
            else:
                mod.weight.mul_(s[:, None])
                if mod.bias is not None:
                    mod.bias.mul_(s)
