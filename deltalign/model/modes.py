"""Training and evaluation modes. One rule everywhere: whatever switches a module tree to eval restores EACH
module's own previous flag afterwards (:func:`eval_mode`), so a stage that trains with dropout off
(:func:`train_without_dropout`) keeps it off after scoring, evaluating or generating."""

from __future__ import annotations

import contextlib

from torch import nn


def train_without_dropout(module: nn.Module) -> nn.Module:
    """Training mode (gradient checkpointing, which transformers runs only in training mode, stays on) with
    every dropout off: LoRA dropout modules and attention dropout. A stage's ``disable_dropout`` setting calls
    this: the trained forward is then the same function as a reference or old-policy forward in eval mode."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.Dropout) or hasattr(m, "attention_dropout"):
            m.eval()
    return module


def train_mode(module: nn.Module, disable_dropout: bool = False) -> nn.Module:
    """Training mode; with ``disable_dropout`` (the stage setting of that name) every dropout off."""
    return train_without_dropout(module) if disable_dropout else module.train()


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode for the block, then EACH module's own training flag back -- not one ``train(flag)`` for the
    whole tree, which would switch every dropout back on after :func:`train_without_dropout`. Every place that
    evaluates inside a training run uses this (scoring, reference log-probs, held-out loss, generation)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
