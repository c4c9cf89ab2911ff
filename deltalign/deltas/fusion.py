"""Composing finished deltas: what can compose, and learned per-layer gates over frozen LoRA deltas (AdapterFusion).

Which deltas can be sources, and why the others cannot, is :mod:`deltalign.deltas.composable`.

The gates (:class:`Fusion`, a delta of ours used while training): each LoRA module ``m`` in decoder layer ``l``
gets, while the gates are active,

    y = base_m(x) + sum_s  w[l, s] * scale_s * B_s(A_s(x))

where the sources' factors are the frozen peft adapters loaded on the same backbone (called, never copied or
written) and ``w[l] = softmax(logits[l])`` or ``sigmoid(logits[l])``: one gate per decoder layer per source, the
only trainable values (``layers x sources`` numbers). That sum is exactly a LoRA of rank ``sum_s r_s`` whose
``A`` stacks the sources' ``A_s`` and whose ``B`` stacks ``w[l, s] * scale_s * B_s`` (scale 1): :func:`bake` writes
the trained gates into such a plain peft adapter, which every part of deltalign loads (eval, generate, export,
another stage's ``load_adapter``) with no code of ours -- the same logits, up to float summation order. The gates
themselves are also kept: :func:`save_gates` writes ``gates.safetensors`` (the logits) and ``gates.json`` (the
gate function and the sources by path and sha256), and :func:`load_gates` attaches them again, frozen, over the
sources they name (refusing a source whose weights changed since).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from deltalign.deltas.base import CONFIG_FILE, WEIGHTS_FILE, Delta, decoder_layers
from deltalign.deltas.composable import Source, inspect_source
from deltalign.core import verify
from deltalign.core.fingerprints import sha256_file

GATES_FILE = "gates.safetensors"
GATES_JSON = "gates.json"
ACTIVATIONS = ("softmax", "sigmoid")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lora_modules(backbone, names: list[str]) -> dict[str, tuple[int, list[tuple[int, nn.Module, nn.Module, float]]]]:
    """Every module that one of the peft adapters ``names`` changes: path -> (decoder layer, [(source index,
    lora_A, lora_B, scale)] for each source that has it)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, m in backbone.causal_lm.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        parts = [(i, m.lora_A[n], m.lora_B[n], float(m.scaling[n])) for i, n in enumerate(names) if n in m.lora_A]
        if not parts:
            continue
        if any(m.use_dora.get(names[i], False) for i, *_ in parts):
            raise ValueError(f"{path}: a DoRA module (cannot be gated)")
        if not isinstance(parts[0][1], nn.Linear):
            raise ValueError(f"{path}: {type(parts[0][1]).__name__} LoRA factors (only linear layers are gated)")
        found = _LAYER.search(path)
        if found is None:
            raise ValueError(f"{path}: outside the decoder layers; per-layer gates need every adapted module "
                             "inside one")
        out[path] = (int(found.group(1)), parts)
    if not out:
        raise ValueError("the sources change no module of this model")
    return out


# --- the gates ----------------------------------------------------------------------------------------------------

class Gates(nn.Module):
    """One logit per decoder layer per source; ``forward(layer)`` gives that layer's weights [S]."""

    def __init__(self, n_layers: int, n_sources: int, activation: str, init: list[float] | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"gate activation must be one of {ACTIVATIONS} (got {activation!r})")
        self.activation = activation
        w = torch.tensor(init if init else [1.0 / n_sources] * n_sources, dtype=torch.float32)
        if w.shape != (n_sources,):
            raise ValueError(f"{len(w)} initial gate weights for {n_sources} sources")
        if activation == "softmax":
            if (w <= 0).any():
                raise ValueError("softmax gates start from weights > 0")
            logits = torch.log(w / w.sum())
        else:
            if ((w <= 0) | (w >= 1)).any():
                raise ValueError("sigmoid gates start from weights strictly between 0 and 1")
            logits = torch.log(w) - torch.log1p(-w)
        self.logits = nn.Parameter(logits.repeat(n_layers, 1))

    def forward(self, layer: int) -> torch.Tensor:
        return self._act(self.logits[layer])

    def weights(self) -> torch.Tensor:
        """[layers, sources] gate values."""
        return self._act(self.logits).detach()

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1) if self.activation == "softmax" else torch.sigmoid(x)


class Fusion(Delta):
    """Learned per-layer gates over the frozen peft LoRA adapters ``names`` on ``backbone`` (module docstring).

    Only ``gates.logits`` is a parameter of this module; the sources' factors are referenced, not registered, so
    the Backbone never makes them trainable through this delta and nothing here can write them. Dropout is not
    applied to the sources (they are frozen; the gated forward is the same function in training and in eval)."""

    method = "gates"

    def __init__(self, backbone, names: list[str], activation: str = "softmax", init: list[float] | None = None):
        super().__init__(cfg=None)
        self.sources = list(names)
        self._modules_of = lora_modules(backbone, names)  # a plain dict: not registered as submodules
        n_layers = len(decoder_layers(backbone.causal_lm))
        self.gates = Gates(n_layers, len(names), activation, init)

    def attach(self, lm) -> None:
        modules = dict(lm.named_modules())
        for path, (layer, parts) in self._modules_of.items():
            self.hook_output(modules[path], self._adder(layer, parts))

    def _adder(self, layer: int, parts):
        def add(output, x):
            w = self.gates(layer)  # called here: ZeRO-3 gathers the logits exactly when they act
            total = None
            for i, lora_a, lora_b, scale in parts:
                y = lora_b(lora_a(x.to(lora_a.weight.dtype))) * (w[i] * scale)
                total = y if total is None else total + y
            return output + total.to(output.dtype)
        return add

    @torch.no_grad()
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the one LoRA (A [R, in], B [out, R], scale 1) that equals the gated sum (R = the stacked
        ranks of the sources that have the module)."""
        w = self.gates.weights()
        out = {}
        for path, (layer, parts) in self._modules_of.items():
            a = torch.cat([lora_a.weight for _, lora_a, _, _ in parts], dim=0)
            b = torch.cat([lora_b.weight * (w[layer, i].to(lora_b.weight) * scale)
                           for i, _, lora_b, scale in parts], dim=1)
            out[path] = (a, b)
        return out


def attach(backbone, name: str, delta: Delta, trainable: bool) -> None:
    """Hook a delta built here into ``backbone`` under ``name`` (as ``Backbone.add_adapter`` does for the methods
    of the table) and activate it."""
    if name in backbone.adapters:
        raise ValueError(f"adapter {name!r} already attached")
    delta.to(next(backbone.causal_lm.parameters()).device)
    delta.attach(backbone.causal_lm)
    backbone.deltas[name] = delta
    (backbone.trainable.add if trainable else backbone.trainable.discard)(name)
    backbone.activate(name)


@torch.no_grad()
def bake(backbone, fusion: Fusion, name: str) -> None:
    """Add a plain peft LoRA adapter ``name`` to ``backbone`` equal to ``fusion`` with its current gates."""
    backbone.model.add_weighted_adapter(fusion.sources, [1.0] * len(fusion.sources), name, combination_type="cat")
    modules = dict(backbone.causal_lm.named_modules())
    for path, (a, b) in fusion.factors().items():
        m = modules[path]
        if float(m.scaling[name]) != 1.0:  # peft gives a cat adapter r == lora_alpha
            raise RuntimeError(f"{path}: unexpected scale {m.scaling[name]} of the baked adapter")
        ta, tb = m.lora_A[name].weight, m.lora_B[name].weight
        ta.zero_()
        tb.zero_()
        ta[: a.shape[0]] = a.to(ta)
        tb[:, : b.shape[1]] = b.to(tb)


def save_gates(fusion: Fusion, out_dir: str | Path, sources: list[Source], base: str) -> None:
    """``gates.safetensors`` (the logits) and ``gates.json`` (how to rebuild the gates over their sources)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"logits": fusion.gates.logits.detach().cpu().contiguous()}, str(out / GATES_FILE))
    meta = {"format": "deltalign-gates/1", "activation": fusion.gates.activation,
            "layers": int(fusion.gates.logits.shape[0]), "sources": [s.record() for s in sources],
            "weights": fusion.gates.weights().tolist(), "base_model_name_or_path": base,
            "note": f"the gates over the sources above; {CONFIG_FILE} + {WEIGHTS_FILE} beside this file hold the "
                    "same composition baked into one plain LoRA adapter"}
    (out / GATES_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def load_gates(backbone, path: str | Path, name: str = "gates") -> str:
    """Attach the gates saved in ``path`` (frozen) over the sources they name, loaded frozen too; returns
    ``name``. A source whose weights changed since the gates were trained is refused."""
    path = Path(path)
    meta = verify.read_json(path / GATES_JSON)
    paths = []
    for i, rec in enumerate(meta["sources"]):
        p = Path(rec["path"])
        key = f"{path / GATES_JSON}: sources[{i}] ({p})"
        if not (p / WEIGHTS_FILE).is_file():
            raise ValueError(f"{key}: not found (the baked adapter in {path} still holds the composition)")
        if sha256_file(p / WEIGHTS_FILE) != rec["sha256"]:
            raise ValueError(f"{key}: its weights changed since the gates were trained (the baked adapter in "
                             f"{path} still holds the composition as trained)")
        inspect_source(p, key)
        paths.append(p)
    names = [f"{name}.source{i}".replace(".", "_") for i in range(len(paths))]
    for n, p in zip(names, paths):
        backbone.load_adapter(n, p, trainable=False)
    fusion = Fusion(backbone, names, meta["activation"])
    logits = verify.load_tensors(path / GATES_FILE)["logits"]
    if logits.shape != fusion.gates.logits.shape:
        raise ValueError(f"{path / GATES_FILE}: gates of shape {tuple(logits.shape)}, this model and these sources "
                         f"need {tuple(fusion.gates.logits.shape)}")
    with torch.no_grad():
        fusion.gates.logits.copy_(logits)
    attach(backbone, name, fusion, trainable=False)
    return name


def finite(values: list[float]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
