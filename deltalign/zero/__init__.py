"""DeepSpeed ZeRO under the engine: the few places where ZeRO needs more than accelerate does by itself.

The engine (:mod:`deltalign.training.engine`) calls these (:mod:`deltalign.model.heads` and the embedding lookup call
:mod:`~deltalign.zero.vocab`); stages never do. What each one is for:

* :func:`check_supported` -- what ZeRO-3 cannot run (a 4-bit base), refused at the
  command line before any model loads (the launch's stage from :func:`launched_zero_stage`) and, for any other
  caller, when the engine prepares;
* :func:`skip_shm_build` -- on CPU, DeepSpeed would JIT-compile a shared-memory all-reduce at start-up;
* :func:`configure` -- the engine owns accumulation, its normalisation and the update boundary, so DeepSpeed's
  own gradient-accumulation scaling is switched off and the boundary is the caller's
  (``managed_gradient_accumulation: false``): every backward only accumulates, ``step()`` reduces and updates,
  so any number of backward calls per update works (PPO: policy + critic);
* :func:`clear_gradients` -- ZeRO-3 keeps reduced gradients in a flat buffer it never clears (the first backward
  of an update copies, later ones add): zeroed after each update, a parameter first reached by a later backward
  (PPO's critic, after the policy) starts from 0, not from the previous update's gradient;
* :func:`gathered` -- ZeRO-3 shards every parameter, the frozen base included: code that runs on rank 0 only
  (evaluation, generation, saving) needs the full weights and ZeRO-3's hooks off;
* :func:`gathered_parameters`, :func:`full_tensors` / :func:`set_full_tensors` -- the full values of some (sharded)
  parameters -- a delta, what trains -- for saving and checkpoints, and setting them on resume;
* :func:`return_gather_buffers` -- ZeRO-3's gather buffers go back to the OS when freed (no heap fragmentation);
* :mod:`deltalign.sampling.ranks` -- which processes run generation, evaluation and saving, and what they gather
  (the engine's ``generating``, ``evaluating``, ``save_delta``);
* :mod:`deltalign.zero.loading` -- the base loaded partitioned: built with no values, then each process reads only
  its own range of each tensor into its partition;
* :mod:`deltalign.zero.vocab` -- the embedding lookup and the LM head's log-probs from the rows of the vocabulary
  table each rank holds (the largest parameter of a small model, never gathered; :mod:`deltalign.model.heads` and
  :mod:`deltalign.deltas.sequence` call these);
* :func:`optimizer_state` / :func:`load_optimizer_state` -- the optimizer for a checkpoint, without DeepSpeed's
  own ``save_checkpoint`` / ``load_checkpoint`` (which unpickle on load): per trainable parameter its full fp32
  master value and moments (``deepspeed.utils.safe_get_full_*``), plus the per-partition step count.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from deltalign.core.settings import ConfigError


def skip_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at start-up (minutes on a 2-core machine, and
    a C++ toolchain needed); without it DeepSpeed falls back to plain torch.distributed (gloo), which is what we
    use anyway. Set DELTALIGN_DS_SHM=1 to let DeepSpeed build and use it."""
    if os.environ.get("DELTALIGN_DS_SHM", "0") == "1":
        return
    import importlib

    try:  # not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports `torch`, which that would bind
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    ds_torch.build_shm_op = lambda: None


def return_gather_buffers(threshold: int = 256 * 1024) -> None:
    """ZeRO-3 allocates a full-size buffer for every parameter it gathers and frees it after use, module by module,
    each forward and backward. glibc serves blocks below its (adaptive, up to 32 MiB) mmap threshold from the heap,
    where the freed buffers leave holes that the next, differently sized ones do not fill: measured on a 0.23B
    model, the resident memory of a ZeRO-3 process grew by 1.1 GB over 3 SFT steps (it holds a 0.46 GB shard), and
    stayed 1 GB above its shard with no parameter gathered. A fixed mmap threshold (no adaptation) makes every
    block above it its own mapping, returned to the OS when freed: 0.1 GB growth (about 10% slower steps: fresh
    pages are faulted in). glibc only; elsewhere nothing happens."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def launched_zero_stage() -> int:
    """The ZeRO stage this launch configured (0: no DeepSpeed), from the environment ``accelerate launch`` sets --
    readable before DeepSpeed starts or any model loads (the command line's checks)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return 0
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        ds = json.loads(Path(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")).read_text())
        return int(ds.get("zero_optimization", {}).get("stage", 0))
    with contextlib.suppress(ValueError):
        return int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))
    return 0


def check_supported(quantization: str, zero_stage: int) -> None:
    """Refuse what is known not to work before DeepSpeed fails obscurely: a 4-bit base under ZeRO-3 (DeepSpeed
    would have to shard bitsandbytes' packed 4-bit tensors; that needs ``zero3_init_flag`` and
    ``bnb_4bit_quant_storage`` and is not supported here yet)."""
    if zero_stage == 3 and quantization != "none":
        raise ConfigError(f"model.quantization={quantization!r} (QLoRA) is not supported under DeepSpeed ZeRO-3 yet; "
                         "use configs/accelerate/zero2.yaml, or model.quantization=none with ZeRO-3 "
                         "(ZeRO-3 already shards the base across processes)")


def configure(ds: dict, micro_batch_size: int, world: int, max_grad_norm: float) -> None:
    """Adjust the DeepSpeed config (in place) before ``accelerator.prepare``: accumulation, boundary, clipping."""
    # The engine owns accumulation and its normalisation: DeepSpeed must neither divide the loss by its
    # gradient_accumulation_steps nor decide the boundary itself.
    ds["gradient_accumulation_steps"] = 1
    ds["managed_gradient_accumulation"] = False
    ds["gradient_clipping"] = float(max_grad_norm)
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size  # informational (throughput logs)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * world


def clear_gradients(ds_engine, zero_stage: int) -> None:
    """After an update: zero ZeRO-3's flat buffer of reduced gradient partitions (see the module docstring)."""
    flat = getattr(ds_engine.optimizer, "grad_partitions_flat_buffer", None)
    if zero_stage == 3 and flat is not None:
        flat.zero_()


@contextlib.contextmanager
def gathered(ds_engine, backbone):
    """Every process must enter this together. Inside, each process holds the full weights gathered from the
    ZeRO-3 shards, with ZeRO-3's module hooks off (no collective in a forward); yields ``backbone``."""
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload
    from transformers.integrations import deepspeed as hf_ds

    # As deepspeed.runtime.zero.stage3.unwrap_model_for_generation, plus the start-of-forward hook, whose
    # step reset is itself a collective (rank 0 alone in a forward would wait for the others forever).
    opt = ds_engine.optimizer
    offload = getattr(opt, "parameter_offload", None) or opt
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(ds_engine.module.parameters())):
        for hook in [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        depth = len(parameter_offload.FWD_MODULE_STACK)
        # transformers' generate() turns on synced_gpus (an all-reduce per token) when it sees ZeRO-3;
        # with the weights gathered each process generates on its own, so hide ZeRO-3 from it meanwhile.
        hf_ref, hf_ds._hf_deepspeed_config_weak_ref = hf_ds._hf_deepspeed_config_weak_ref, None
        try:
            yield backbone
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = hf_ref
            offload.setup_zero_stage3_hooks()
            del parameter_offload.FWD_MODULE_STACK[depth:]


@contextlib.contextmanager
def gathered_parameters(params, zero_stage: int, modifier_rank: int | None = None):
    """ZeRO-3: inside, every process holds the full values of these parameters only (every process must enter);
    read-only, or with ``modifier_rank`` that process's changes are scattered into the shards on leaving.
    Otherwise nothing happens."""
    sharded = [p for p in params if hasattr(p, "ds_id")] if zero_stage == 3 else []
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield


def full_tensors(named: list[tuple[str, torch.nn.Parameter]], zero_stage: int) -> dict[str, torch.Tensor]:
    """CPU copies of the full values of these parameters (ZeRO-3: gathered; every process must call it)."""
    with gathered_parameters([p for _, p in named], zero_stage):
        return {n: p.detach().cpu().clone() for n, p in named}


def set_full_tensors(named: list[tuple[str, torch.nn.Parameter]], values: dict[str, torch.Tensor],
                     zero_stage: int) -> None:
    """Set these parameters to full values (ZeRO-3: scattered into the shards; every process must call it)."""
    with torch.no_grad(), gathered_parameters([p for _, p in named], zero_stage, modifier_rank=0):
        for n, p in named:
            p.copy_(values[n])


@contextlib.contextmanager
def _flat_partitions(ds_engine):
    """Yield the torch optimizer inside ZeRO and the flat fp32 partitions it steps (this process's shards), in the
    order of its param groups. ZeRO-3 leaves the groups empty between steps: they are filled meanwhile."""
    opt = ds_engine.optimizer
    base = opt.optimizer
    fill = getattr(opt, "_set_fp32_optimizer_param_groups", None)  # ZeRO-3
    if fill is not None:
        fill()
    try:
        yield base, [p for g in base.param_groups for p in g["params"]]
    finally:
        if fill is not None:
            opt._clear_fp32_optimizer_param_groups()


def optimizer_state(ds_engine, named: list[tuple[str, torch.nn.Parameter]]) -> tuple[dict[str, torch.Tensor], dict]:
    """The ZeRO optimizer as CPU tensors and JSON values (every process must call it; all but rank 0 may drop the
    result): ``master/<param>`` the full fp32 value, ``state/<param>/<key>`` the full moments, ``flat/<i>/<key>``
    the tensors of partition i that are not per-element (the step count); the JSON holds the param groups'
    hyperparameters, the per-element keys and the partitions' other values."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    per_element = lambda f, v: torch.is_tensor(v) and v.dim() == 1 and v.shape == f.shape  # noqa: E731
    tensors: dict[str, torch.Tensor] = {}
    flat_scalars = []
    with _flat_partitions(ds_engine) as (base, flats):
        keys = sorted({k for f in flats for k, v in base.state.get(f, {}).items() if per_element(f, v)})
        for i, f in enumerate(flats):
            other = {k: v for k, v in base.state.get(f, {}).items() if not per_element(f, v)}
            tensors |= {f"flat/{i}/{k}": v.detach().cpu().clone() for k, v in other.items() if torch.is_tensor(v)}
            flat_scalars.append({k: v for k, v in other.items() if not torch.is_tensor(v)})
        groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    for n, p in named:
        tensors[f"master/{n}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for k in keys:
            tensors[f"state/{n}/{k}"] = safe_get_full_optimizer_state(p, k).detach().cpu().clone()
    return tensors, {"param_groups": groups, "keys": keys, "flat_scalars": flat_scalars}


def load_optimizer_state(ds_engine, named: list[tuple[str, torch.nn.Parameter]], tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    """Put :func:`optimizer_state`'s output back into a freshly prepared ZeRO optimizer (every process calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    # The torch optimizer creates its state at its first step: create it here (zeros of the right shapes, the saved
    # step), through its own load_state_dict, then fill the moments in from the full tensors.
    with _flat_partitions(ds_engine) as (base, flats):
        if len(meta["flat_scalars"]) != len(flats) or len(meta["param_groups"]) != len(base.param_groups):
            raise RuntimeError(f"checkpoint: {len(meta['flat_scalars'])} ZeRO partitions in "
                               f"{len(meta['param_groups'])} param groups; this run has {len(flats)} in "
                               f"{len(base.param_groups)}")
        current = base.state_dict()["param_groups"]
        groups = [{k: (tuple(v) if isinstance(cur.get(k), tuple) and isinstance(v, list) else v)
                   for k, v in saved.items()} | {"params": cur["params"]}
                  for cur, saved in zip(current, meta["param_groups"])]
        state = {}
        for i, f in enumerate(flats):
            st = {k: torch.zeros_like(f) for k in meta["keys"]} | meta["flat_scalars"][i]
            prefix = f"flat/{i}/"
            st |= {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            state[i] = st
        base.load_state_dict({"state": state, "param_groups": groups})
    opt = ds_engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link each parameter to its new moments
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for n, p in named:
        if hasattr(p, "ds_id"):  # ZeRO-3: DeepSpeed's own setter fails on a padded partition (see _set_partition)
            _set_partition(opt, p, tensors[f"master/{n}"])
            for k in meta["keys"]:
                _set_partition(opt, p, tensors[f"state/{n}/{k}"], k)
        else:
            safe_set_full_fp32_param(p, tensors[f"master/{n}"])
            for k in meta["keys"]:
                safe_set_full_optimizer_state(p, tensors[f"state/{n}/{k}"], k)


def _set_partition(opt, p: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """This process's ZeRO-3 partition of a parameter's fp32 master value (or of its optimizer state ``key``) from
    the full tensor. DeepSpeed's ``set_full_hp_param`` reads past the end of the value on the last rank when the
    parameter does not divide evenly over the processes (a 1-element head bias over 2 ranks); the padding is 0."""
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    size = part.numel()
    start = size * opt._get_param_partition_rank(p)
    chunk = value.flatten()[start:start + size]
    with torch.no_grad():
        part.zero_()
        part.view(-1)[:chunk.numel()].copy_(chunk.to(part.dtype))


COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def counters(ds_engine) -> dict[str, int]:
    """DeepSpeed's own step counters (its logging and profiling use them), for a checkpoint."""
    return {k: int(getattr(ds_engine, k, 0)) for k in COUNTERS}


def set_counters(ds_engine, values: dict[str, int]) -> None:
    for k in COUNTERS:
        if k in values and hasattr(ds_engine, k):
            setattr(ds_engine, k, int(values[k]))

