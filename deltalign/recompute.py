"""What gradient checkpointing recomputes in the backward pass (``model.gradient_checkpointing``).

``true``: every decoder layer keeps only its input and runs its forward again in the backward (non-reentrant).
``selective``: the same, except that the outputs of the frozen base's matrix multiplies are kept from the forward
(torch's selective activation checkpointing): the replay recomputes only norms, activations, attention and the
deltas' own small products. A delta's weights train, so their matmuls are recomputed; the base's do not, and they
are most of a layer's FLOPs. Memory lies between the two extremes (per token and layer, the widths of the base's
projections: q, k, v, o, gate, up, down); ``bench/profile_ppo.py`` measures both in PPO.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_MATMULS = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2}  # op -> index of the weight operand


def _keep_frozen_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep a matmul's output when its weight does not train (the frozen base's linear layers)."""
    weight = _MATMULS.get(op)
    if weight is not None and not args[weight].requires_grad:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_kwargs(mode: bool | str) -> dict:
    """``gradient_checkpointing_kwargs`` for transformers' ``gradient_checkpointing_enable`` in ``mode``."""
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_frozen_matmuls)
    return kwargs
