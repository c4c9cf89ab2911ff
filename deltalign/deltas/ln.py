"""LayerNorm/RMSNorm tuning (the BitFit analogue for models without biases): the norm weights as a trainable delta.

Every normalisation layer of the decoder (each layer's two norms and the final one) gets a vector ``d``,
initialised to 0: its output ``w * n(x)`` becomes ``(w + d) * n(x)``, computed as ``w * n(x) + d * n(x)`` from the
norm's input and output so the hook never reads the base weight. Mergeable: ``w + d`` is the new norm weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltalign.deltas.base import Delta, inner, key, width


class Shift(nn.Module):
    """The trainable change ``d`` of one norm's weight; ``forward(x, out)`` is that norm's output with ``w + d``."""

    def __init__(self, n: int, eps: float, rms: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.eps, self.rms = eps, rms

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.rms:  # as LlamaRMSNorm: normalise in float32, back to the input dtype, then scale
            normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            normed = F.layer_norm(xf, xf.shape[-1:], eps=self.eps)
        return out + (self.weight * normed.to(x.dtype)).to(out.dtype)


def norm_kind(mod: nn.Module) -> tuple[bool, float] | None:
    """(is RMS, eps) of a normalisation layer with a weight, or None for any other module."""
    if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
        return False, mod.eps
    if type(mod).__name__.endswith("RMSNorm") and getattr(mod, "weight", None) is not None:
        return True, float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))
    return None


class LN(Delta):
    method = "ln"

    def __init__(self, cfg, backbone, init: bool = True):
        super().__init__(cfg)
        lm = backbone.causal_lm
        self.shifts = nn.ModuleDict()
        self.sites: dict[str, str] = {}  # key -> module path in the causal LM
        for path, mod in inner(lm).named_modules():
            kind = norm_kind(mod)
            if kind is not None:
                self.shifts[key(path)] = Shift(width(mod.weight), kind[1], kind[0])
                self.sites[key(path)] = f"{lm.base_model_prefix}.{path}"
        if not self.sites:
            raise ValueError(f"ln: {type(lm).__name__} has no LayerNorm/RMSNorm layer with a weight")

    def attach(self, lm) -> None:
        for k, path in self.sites.items():
            self.hook_output(lm.get_submodule(path), lambda out, x, s=self.shifts[k]: s(x, out))

    @torch.no_grad()
    def merge(self, lm) -> None:
        for k, path in self.sites.items():
            w = lm.get_submodule(path).weight
            w.add_(self.shifts[k].weight.to(w.dtype))
