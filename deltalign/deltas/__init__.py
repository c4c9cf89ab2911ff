"""Delta-tuning methods: the one table of what each can do, and how each is built, saved and recognised.

Every stage trains a named delta on the one frozen backbone (:class:`deltalign.model.backbone.Backbone` switches and
loads them); ``<stage>.delta.method`` picks the method. LoRA and DoRA are peft's (peft mixes only its LoRA family
on one model); the others are small modules of ours (:mod:`deltalign.deltas.base` says how they work). Adding a
method = one module with a :class:`~deltalign.deltas.base.Delta` subclass, one row below, and its settings (and
name) in :class:`~deltalign.deltas.config.AdapterConfig`.

Columns: ``mergeable`` -- export can fold it into plain weights; ``head`` -- works under a scalar head (reward
model, critic: the head reads hidden states aligned with the caller's ids); ``prompt_learning`` -- it changes the
sequence the model sees (virtual tokens; :mod:`deltalign.deltas.sequence` hides that from callers); ``impl`` --
``peft`` or ``ours``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from deltalign.deltas.base import CONFIG_FILE, WEIGHTS_FILE, Delta, check_folder, read_config, save, settings_of
from deltalign.deltas.config import AdapterConfig
from deltalign.deltas.lora import method_of_peft, peft_config


@dataclass(frozen=True)
class Method:
    name: str
    mergeable: bool
    head: bool
    prompt_learning: bool
    impl: str  # "peft" or "ours"
    builder: str  # ours: "module:Class" under deltalign.deltas; peft: ""
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in [
    #      name          merge  head  prompt impl    builder                  summary
    Method("lora",       True,  True, False, "peft", "",                      "low-rank update of linear weights"),
    Method("dora",       True,  True, False, "peft", "",                      "LoRA + a learned magnitude per output"),
    Method("ia3",        True,  True, False, "ours", "ia3:IA3",               "rescales keys, values, FFN activation"),
    Method("prefix",     False, True, True,  "ours", "prefix:Prefix",         "keys/values in front of every layer"),
    Method("prompt",     False, True, True,  "ours", "prompt:Prompt",         "a soft prompt before the input"),
    Method("bottleneck", False, True, False, "ours", "bottleneck:Bottleneck", "Houlsby adapters after attn and/or FFN"),
    Method("ln",         True,  True, False, "ours", "ln:LN",                 "a trainable change of each norm weight"),
]}


def spec(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"adapter.method must be one of {', '.join(METHODS)} (got {method!r})")
    return METHODS[method]


def build(cfg: AdapterConfig, backbone, init: bool = True) -> Delta:
    """A fresh delta of ours for ``backbone`` (the caller has every delta off: some methods initialise from the
    base's own activations). ``init`` false: shapes only (the values are about to be loaded)."""
    m = spec(cfg.method)
    if m.impl != "ours":
        raise ValueError(f"{cfg.method} is peft's; Backbone.add_adapter builds it through peft")
    module, cls = m.builder.split(":")
    return getattr(importlib.import_module(f"deltalign.deltas.{module}"), cls)(cfg, backbone, init=init)


def is_ours(conf: dict) -> bool:
    """Whether an adapter_config.json was written by one of our deltas (else it is peft's)."""
    return "deltalign_method" in conf


def method_of(path: str | Path) -> str:
    """The method of a saved adapter folder (ours or peft's)."""
    conf = read_config(path)
    return conf["deltalign_method"] if is_ours(conf) else method_of_peft(conf)


__all__ = ["AdapterConfig", "CONFIG_FILE", "Delta", "METHODS", "Method", "WEIGHTS_FILE", "build", "check_folder",
           "is_ours", "method_of", "peft_config", "read_config", "save", "settings_of", "spec"]
