"""What gradient checkpointing recomputes in the backward pass (``model.gradient_checkpointing``).

``true``: every decoder layer keeps only its input and runs its forward again in the backward (non-reentrant).
``selective``: the same, except that the outputs of the frozen base's matrix multiplies are kept from the forward:
the replay recomputes only norms, activations, attention and the deltas' own small products. A delta's weights
train, so their matmuls are recomputed; the base's do not, and they are most of a layer's FLOPs. Memory lies
between the two extremes (per token and layer, the widths of the base's projections: q, k, v, o, gate, up, down);
``bench/profile_ppo.py`` measures both in PPO.

Selective checkpointing is torch's ``context_fn`` hook of non-reentrant checkpointing with two dispatch modes of
ours rather than torch's ``create_selective_checkpoint_contexts``: torch's requires the replay to run exactly the
operations the forward ran, and under DeepSpeed ZeRO-3 it does not -- the layer's weight gathers (collectives,
buffer copies) happen where the forward's prefetching and the backward's put them. Ours counts only the frozen
matmuls, which run in the same order in both, and lets everything else run as it comes.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_MATMULS = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2}  # op -> index of the weight operand


def _frozen_matmul(op, args) -> bool:
    """A matmul whose weight does not train (the frozen base's linear layers)."""
    weight = _MATMULS.get(op)
    return weight is not None and not args[weight].requires_grad


class _Keep(TorchDispatchMode):
    """The forward: run every operation, and keep each frozen matmul's output in order."""

    def __init__(self, kept: list):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        out = op(*args, **(kwargs or {}))
        if _frozen_matmul(op, args):
            self.kept.append((out.detach(), out._version))
        return out


class _Reuse(TorchDispatchMode):
    """The replay: hand back the kept outputs in the same order instead of multiplying again; run the rest."""

    def __init__(self, kept: list):
        super().__init__()
        self.kept, self.next = kept, 0

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        if not _frozen_matmul(op, args):
            return op(*args, **(kwargs or {}))
        if self.next >= len(self.kept):
            raise RuntimeError("selective checkpointing: the replay ran more frozen matmuls than the forward")
        out, version = self.kept[self.next]
        self.kept[self.next], self.next = None, self.next + 1  # each output is handed back once, then dropped
        if out._version != version:
            raise RuntimeError("selective checkpointing: a kept matmul output was changed in place after the forward")
        if out.shape != (args[-2].shape[0], args[-1].shape[1]):  # [M, K] x [K, N] (addmm: after the bias)
            raise RuntimeError("selective checkpointing: the replay's frozen matmuls ran in another order")
        return out


def _keep_frozen_matmuls() -> tuple[_Keep, _Reuse]:
    """One checkpointed call's pair of contexts: the forward's and the replay's, sharing what was kept."""
    kept: list = []
    return _Keep(kept), _Reuse(kept)


def checkpointing_kwargs(mode: bool | str) -> dict:
    """``activation_checkpointing_kwargs`` for transformers' ``activation_checkpointing_enable`` in ``mode``."""
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _keep_frozen_matmuls
    return kwargs
