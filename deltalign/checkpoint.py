"""Resumable checkpoints of a training run: only what trains, written so that a kill never loses the last one.

A checkpoint (``<run>/<stage>/checkpoints/step-NNNNNN/``) holds the trainable tensors (adapter and head
values, safetensors), the optimizer and scheduler state, every process's RNG state, the step and any extra state
a stage registered (e.g. PPO's KL controller). It is written to a temporary directory and renamed into place, so
a kill at any moment leaves the previous checkpoint intact; the newest ``keep`` are kept. Under DeepSpeed each
rank adds its own optimizer shard (``ds/``, frozen parameters excluded) -- the only files a rank other than 0
writes. :func:`restore` loads the newest one into a prepared :class:`deltalign.engine.Engine` and drops the
metrics logged after it.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
from pathlib import Path

import torch

from deltalign import atomic, zero

CKPT_DIR = "checkpoints"


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint in a stage's run directory, if any."""
    found = sorted((Path(out_dir) / CKPT_DIR).glob("step-*"))
    return found[-1] if found else None


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """Full values of every trainable tensor. Every process must call it (ZeRO-3 gathers)."""
    backbone = engine.accelerator.unwrap_model(engine.model)
    wanted = set(engine.param_names)
    return zero.full_tensors([(n, p) for n, p in backbone.named_parameters() if n in wanted], engine.zero_stage)


def _all_rng(engine) -> list:
    """Every process's torch RNG state (dropout differs per process), gathered to all."""
    state = torch.get_rng_state()
    if engine.world == 1:
        return [state]
    from accelerate.utils import gather_object

    return gather_object([state])


def save(engine, keep: int) -> None:
    """Write a checkpoint of the engine's current step (every process calls it)."""
    from safetensors.torch import save_file

    acc = engine.accelerator
    acc.wait_for_everyone()
    state = trainable_state(engine)
    rngs = _all_rng(engine)
    root = engine.out / CKPT_DIR
    final = root / f"step-{engine.step_no:06d}"
    tmp = root / f".step-{engine.step_no:06d}.partial"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if engine.deepspeed:  # every rank writes its own optimizer shard (ZeRO); frozen parameters are left out
        engine.model.save_checkpoint(str(tmp), tag="ds", save_latest=False, exclude_frozen_parameters=True)
    acc.wait_for_everyone()
    if engine.is_main:
        save_file(state, tmp / "trainable.safetensors")
        blob = {"scheduler": engine.scheduler.state_dict(), "torch_rng": rngs[0], "torch_rng_all": rngs}
        if not engine.deepspeed:
            blob["optimizer"] = engine.optimizer.state_dict()
        torch.save(blob, tmp / "optimizer.pt")
        extra = {name: get() for name, (get, _) in engine.extra_state.items()}
        atomic.write_json(tmp / "state.json", {"step": engine.step_no, "python_rng": repr(random.getstate()),
                                               "extra": extra, "world": engine.world,
                                               "deepspeed": engine.deepspeed})
        if final.exists():
            old = root / f".step-{engine.step_no:06d}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def restore(engine) -> bool:
    """Load the newest checkpoint into the prepared engine, if there is one; metrics logged after it are
    dropped. Returns whether it resumed."""
    from safetensors.torch import load_file

    ckpt = latest(engine.out)
    if ckpt is None:
        return False
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    missing = set(engine.param_names) - set(tensors)
    if missing:
        raise RuntimeError(f"{ckpt}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    state = json.loads((ckpt / "state.json").read_text())
    if bool(state.get("deepspeed", False)) != engine.deepspeed or int(state.get("world", 1)) != engine.world:
        raise RuntimeError(f"{ckpt}: written with deepspeed={state.get('deepspeed', False)}, "
                           f"{state.get('world', 1)} process(es); resume it the same way (or start afresh)")
    blob = torch.load(ckpt / "optimizer.pt", weights_only=True)
    if engine.deepspeed:
        # DeepSpeed restores the trainable weights (ZeRO: from its fp32 master shards) and the optimizer.
        engine.model.load_checkpoint(str(ckpt), tag="ds", load_module_strict=False, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    else:
        backbone = engine.accelerator.unwrap_model(engine.model)
        with torch.no_grad():
            for n, p in backbone.named_parameters():
                if n in tensors:
                    p.copy_(tensors[n])
        engine.optimizer.load_state_dict(blob["optimizer"])
    engine.scheduler.load_state_dict(blob["scheduler"])
    rngs = blob.get("torch_rng_all") or [blob["torch_rng"]]
    rank = engine.accelerator.process_index
    torch.set_rng_state(rngs[rank] if len(rngs) == engine.world else blob["torch_rng"])
    random.setstate(ast.literal_eval(state["python_rng"]))
    for name, (_, put) in engine.extra_state.items():
        put(state["extra"].get(name, {}))
    engine.step_no = state["step"]
    if engine.is_main and (engine.out / "metrics.jsonl").exists():
        rows = [r for r in (engine.out / "metrics.jsonl").read_text().splitlines() if r.strip()]
        kept = [r for r in rows if json.loads(r)["step"] <= engine.step_no]
        atomic.write_text(engine.out / "metrics.jsonl", "".join(r + "\n" for r in kept))
    if not engine.quiet:
        print(f"[deltalign] resuming {engine.out} from {ckpt.name} (step {engine.step_no})", flush=True)
    return True
