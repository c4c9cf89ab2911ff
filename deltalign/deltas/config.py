"""The settings of a stage's delta (``<stage>.delta``): the method and each method's own settings.

A setting belongs to the methods its docstring names; the others ignore it. The method names must match the table
in :mod:`deltalign.deltas` (a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltalign.core.settings import setting


@dataclass
class AdapterConfig:
    method: Literal["lora", "dora", "ia3", "prefix", "prompt", "bottleneck", "ln"] = "lora"
    """Delta method: ``lora``, ``dora`` (weight-decomposed LoRA), ``ia3`` (learned rescaling vectors), ``prefix``
    (prefix-tuning / P-tuning v2: trainable keys/values in front of every layer), ``prompt`` (prompt tuning: a
    trainable soft prompt before the input), ``bottleneck`` (Houlsby adapters) or ``ln`` (norm-weight tuning).
    What each can do: ``deltalign.deltas.METHODS``."""
    r: int = setting(16, ge=1)
    """LoRA rank."""
    alpha: int = setting(32, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = setting(0.05, ge=0, lt=1)
    """Dropout on the LoRA input (lora, dora)."""
    target_modules: list[str] | str = "all-linear"
    """Modules that get the delta: ``all-linear`` (every linear layer but the LM head) or a list of names (lora,
    dora, ia3; for ia3 ``all-linear`` means k_proj, v_proj and down_proj, whose input it scales)."""
    prefix_length: int = setting(16, ge=1)
    """prefix: trainable key/value positions in front of every layer."""
    prefix_projection: bool = False
    """prefix: produce the keys/values through a reparameterisation MLP (Li & Liang's prefix-tuning); off trains
    them directly (P-tuning v2)."""
    prefix_hidden: int = setting(512, ge=1)
    """prefix: hidden width of the reparameterisation MLP (with ``prefix_projection`` only)."""
    prompt_length: int = setting(16, ge=1)
    """prompt: soft-prompt embeddings prepended to every input."""
    init_text: str = ""
    """prompt, prefix: start from this text (prompt: its token embeddings, repeated to ``prompt_length``; prefix:
    the base model's keys/values over its tokens); '' starts from random vocabulary tokens instead."""
    bottleneck_size: int = setting(64, ge=1)
    """bottleneck: width of each adapter's down-projection."""
    bottleneck_placement: Literal["both", "attention", "ffn"] = "both"
    """bottleneck: adapters after the attention block, after the feed-forward block, or after both (Houlsby)."""
    bottleneck_act: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """bottleneck: the non-linearity between down- and up-projection."""
