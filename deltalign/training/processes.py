"""The processes of one run, on accelerate: starting it for a plain, data-parallel or DeepSpeed launch (gloo on
CPU), and the collectives the engine needs -- sums, means and maxima over the processes, and plain data parallel
without a DDP wrapper.

Plain data parallel (several processes without DeepSpeed, ``configs/accelerate/ddp.yaml``): every process runs its
backward passes locally and :meth:`Processes.average_gradients` averages the trainable gradients once per update,
in one flattened all-reduce. So any number of backward passes per update works, each touching any subset of the
deltas (PPO: policy, then critic), with the same result as one process over the global batch. Every process starts
from rank 0's deltas (:meth:`Processes.broadcast`), as DDP does.
"""

from __future__ import annotations

import os

import torch

from deltalign import zero


def start_accelerator():
    """The ``Accelerator`` of this launch. On CPU, accelerate leaves the backend unset and each launched process
    would think it is alone; without DeepSpeed it also needs ``cpu=True``, or it sets up the process group but
    reduces nothing (distributed type NO): that case is an error here, not a silently local run."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    on_cpu = launched and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
    if use_ds and not torch.cuda.is_available():
        zero.skip_shm_build()
    accelerator = Accelerator(kwargs_handlers=handlers, cpu=on_cpu and not use_ds)
    if launched and accelerator.distributed_type.value == "NO":
        raise RuntimeError(f"{int(os.environ['WORLD_SIZE'])} processes launched, but accelerate set up no "
                           "distributed run: its reductions would silently be local")
    return accelerator


class Processes:
    """Collectives over the run's processes; every process must make the same calls. With one process each is
    the identity."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.device = accelerator.device

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a tensor over all processes; no gradient."""
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.detach().clone(), reduction="sum")

    def max_int(self, n: int) -> int:
        t = torch.tensor([float(n)], device=self.device)
        return int(self.accelerator.reduce(t, reduction="max").item()) if self.world > 1 else n

    def all_true(self, flag: bool) -> bool:
        return self.max_int(0 if flag else 1) == 0

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the processes (stages report values normalised by the step's global count,
        ``total / world``: their mean is the value of the whole global batch, as one process would have logged)."""
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``params`` to every process (one flattened broadcast)."""
        import torch.distributed as dist

        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])
            dist.broadcast(flat, src=0)
            for p, v in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(v.view_as(p))

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the processes in one flattened all-reduce (fp32). A parameter
        keeps ``grad = None`` only if it got no gradient on any process, as in one process."""
        import torch.distributed as dist

        has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        flat = torch.cat([has, *[(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                                 for p in params]])
        dist.all_reduce(flat)
        flat[len(params):].div_(self.world)
        grads = flat[len(params):].split([p.numel() for p in params])
        for p, any_grad, g in zip(params, flat[:len(params)].tolist(), grads):
            if any_grad:
                p.grad = g.view_as(p).to(p.dtype)
