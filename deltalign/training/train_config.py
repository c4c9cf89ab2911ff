"""The settings every training stage shares (each stage's Config extends :class:`TrainConfig`) and the
learning-rate schedule they describe; :mod:`deltalign.training.engine` applies both."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from deltalign.core.settings import setting


@dataclass
class TrainConfig:
    lr: float = setting(2e-4, gt=0)
    """Peak learning rate (AdamW)."""
    batch_size: int = setting(8, ge=1)
    """Rows (or pairs) per micro-batch per process."""
    grad_accum: int = setting(1, ge=1)
    """Micro-batches per optimizer step per process."""
    epochs: float = setting(1.0, gt=0)
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = setting(0, ge=0)
    """Stop after this many optimizer steps (0: use epochs)."""
    warmup_ratio: float = setting(0.05, ge=0, le=1)
    """Share of the steps with linear warmup, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = setting(0.1, ge=0, le=1)
    """Final learning rate as a share of the peak."""
    weight_decay: float = setting(0.0, ge=0)
    """AdamW weight decay on the trainable parameters."""
    max_grad_norm: float = setting(1.0, ge=0)
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = 0
    """Seed for data order, dropout and initialisation of fresh deltas."""
    log_every: int = setting(5, ge=1, hashed=False)
    """Log training metrics every N optimizer steps."""
    checkpoint_every: int = setting(50, ge=0, hashed=False)
    """Write a resumable checkpoint every N optimizer steps (0: never)."""
    keep_checkpoints: int = setting(2, ge=1, hashed=False)
    """How many recent checkpoints to keep."""
    threads: int = setting(0, ge=0, hashed=False)
    """torch CPU threads (0: leave torch's default)."""
    zero3_generation: Literal["lockstep", "gather"] = setting("lockstep", hashed=False)
    """Under DeepSpeed ZeRO-3 only: how generation (PPO/GRPO rollouts) and evaluation see the sharded base.
    ``lockstep``: the weights stay sharded, ZeRO-3 gathers a layer at a time and every process runs the same
    forwards (no process ever holds the whole base); ``gather``: every process gathers the full weights for the
    duration -- faster, when one device holds the whole model (TRL's ``ds3_gather_for_generation``, its default).
    Both give the same tokens."""


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
