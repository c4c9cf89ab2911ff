"""What every delta of ours shares: an ``nn.Module`` that holds only its own parameters and acts on the frozen base.

Our deltas (ia3, ln, bottleneck: forward hooks on base modules; prompt, prefix: virtual tokens given to the base by
:mod:`deltalign.deltas.sequence`) live in ``Backbone.deltas``. Rules that keep them right on one shared backbone and
under DeepSpeed ZeRO-3 (which gathers a module's parameters only while that module's forward runs):

* parameters live in small submodules that are CALLED where they act -- inside the forward hook of the base module
  they change, or by the sequence code for virtual tokens -- so ZeRO-3 gathers them exactly then;
* a hook computes from the activations it receives and the delta's own parameters, never from base weights (ZeRO-3
  may already have released those when a forward hook runs);
* hooks do nothing unless the delta is the active one (``active``, set by ``Backbone.activate``), so any number of
  deltas can be attached and only one acts; trainability (``requires_grad``) is owned by the Backbone;
* the base is never written, except by :meth:`Delta.merge` on the float32 copy that export loads.

A saved delta of ours is a folder: ``adapter_config.json`` (``deltalign_method``, the settings, the base path) and
``adapter_model.safetensors`` (the module's state dict). Never pickle.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

from deltalign.deltas.config import AdapterConfig
from deltalign.core import verify
from deltalign.core.atomic import crash_point, save_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class Delta(nn.Module):
    """Base class of our deltas. Subclasses build their parameters in ``__init__(cfg, backbone, init)`` (``init``
    false: shapes only, the values come from a saved state dict) and override what applies to them."""

    method = ""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.active = False  # set by Backbone.activate; hooks act only while it is true
        self._handles: list = []

    # --- how the delta enters the computation (override what applies) ---
    def attach(self, lm) -> None:
        """Register hooks on the transformers model ``lm`` (called once, when the delta is attached)."""

    def front_embeds(self, batch_size: int) -> torch.Tensor | None:
        """Embeddings [B, N, H] placed before the input (prompt tuning), or None."""
        return None

    def prefix_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, keys and values [B, kv_heads, N, head_dim] placed before the input's (prefix tuning), or None."""
        return None

    def merge(self, lm) -> None:
        """Write the delta into ``lm``'s weights (mergeable methods only; export does this on its own copy)."""
        raise NotImplementedError(f"a {self.method} delta cannot be merged into plain weights")

    def detach(self) -> None:
        """Remove the hooks (after a merge, or before dropping the delta)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- helpers for hook-based methods ---
    def hook_output(self, module: nn.Module, fn) -> None:
        """While active, ``module``'s output becomes ``fn(output, input)`` (its first input, positional or not)."""
        def hook(mod, args, kwargs, output):
            return fn(output, _first(args, kwargs)) if self.active else None
        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def hook_input(self, module: nn.Module, fn) -> None:
        """While active, ``module``'s first input (positional or not) becomes ``fn(input)``."""
        def hook(mod, args, kwargs):
            if not self.active:
                return None
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            first = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, first: fn(kwargs[first])}
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def _first(args: tuple, kwargs: dict):
    """A module call's first input: positional, or ``hidden_states`` (transformers passes some by keyword)."""
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))


# --- finding what to hook -----------------------------------------------------------------------------------------

def inner(lm) -> nn.Module:
    """The decoder stack under the LM head (``LlamaModel`` for a ``LlamaForCausalLM``)."""
    return getattr(lm, lm.base_model_prefix)


def decoder_layers(lm) -> nn.ModuleList:
    layers = getattr(inner(lm), "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__}: no decoder `layers` list (this method needs a Llama-style model)")
    return layers


def logical(path: str) -> str:
    """A module path without peft's ``.base_layer`` (peft wraps a linear layer it adapts and keeps the original
    inside): our deltas find, name and save the same modules with or without a LoRA adapter on the backbone."""
    return path.replace(".base_layer", "")


def key(path: str) -> str:
    """A module path as a ModuleDict key (dots are not allowed there)."""
    return path.replace(".", "__")


@contextlib.contextmanager
def full_weights(params):
    """The full values of base parameters inside the block. Under ZeRO-3 transformers loads the base already
    partitioned (every process holds a shard): building a delta from base values (embeddings, activations) then
    gathers them -- every process builds the same deltas, so all take part. Without ZeRO-3 it does nothing."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield


def width(weight: torch.Tensor) -> int:
    """The last dimension of a base weight (its full size under ZeRO-3, where the local tensor is a shard)."""
    return int(getattr(weight, "ds_shape", weight.shape)[-1])


def init_token_ids(text: str, n: int, tokenizer, vocab_size: int) -> torch.Tensor:
    """``n`` token ids: ``text``'s, repeated to length ``n``; for '' random vocabulary ids (torch's global RNG)."""
    if text:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"adapter.init_text {text!r} has no tokens")
        return torch.tensor([ids[i % len(ids)] for i in range(n)])
    return torch.randint(0, vocab_size, (n,))


# --- files --------------------------------------------------------------------------------------------------------

def save(delta: Delta, out_dir: str | Path, base: str, state: dict | None = None) -> None:
    """Write ``delta`` as ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf = {"deltalign_method": delta.method, "settings": asdict(delta.cfg), "base_model_name_or_path": base}
    crash_point(f"write {out / CONFIG_FILE}")
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2) + "\n")
    state = delta.state_dict() if state is None else state
    save_tensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / WEIGHTS_FILE)


def check_folder(path: str | Path) -> None:
    """A saved delta is whole before any weights load: its config parses, its weights are safetensors (a pickled
    ``adapter_model.bin`` is refused, never read) and not cut short. Raises FileNotFoundError or
    :class:`deltalign.core.verify.Damaged`, one line naming the file."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = " (it has a pickled adapter_model.bin, which deltalign never loads)" \
            if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}{pickled}")
    read_config(path)
    if why := verify.safetensors_problem(weights):
        raise verify.damaged(weights, why)


def read_config(path: str | Path) -> dict:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not an adapter folder)")
    return verify.read_json(f)


def settings_of(conf: dict) -> AdapterConfig:
    """The AdapterConfig saved in an own adapter's config (settings unknown to this version are an error)."""
    known = {f.name for f in fields(AdapterConfig)}
    extra = set(conf["settings"]) - known
    if extra:
        raise ValueError(f"adapter settings unknown to this deltalign version: {sorted(extra)}")
    return AdapterConfig(**conf["settings"])
