"""Resumable checkpoints of a training run: only what trains, written so that a kill never loses the last one.

A checkpoint (``<run>/<stage>/checkpoints/step-NNNNNN/``) holds safetensors and JSON only, so resuming unpickles
nothing:

* ``trainable.safetensors`` -- the full values of the trainable tensors (adapter and head values);
* ``optimizer.safetensors`` -- the optimizer's tensors: ``state/<param>/<key>`` (AdamW's ``exp_avg``,
  ``exp_avg_sq``, ``step``). Under DeepSpeed the full fp32 moments of each trainable parameter, gathered from
  the ZeRO shards (so the file does not depend on how they were sharded), its fp32 master value
  ``master/<param>`` and the per-partition scalars ``flat/<i>/<key>`` (the step count);
* ``rng.safetensors`` -- every process's torch RNG state (``rng/<rank>``);
* ``state.json`` -- the step, the optimizer's hyperparameters (param groups) and other scalars, the scheduler,
  Python's RNG state, any extra state a stage registered (e.g. PPO's KL controller), the process count, and the
  sha256 of each safetensors file (verified on resume, so a damaged file is caught, not trained on).

Only rank 0 writes. A checkpoint is written to a temporary directory and renamed into place, so a kill at any
moment leaves the previous checkpoint intact; the newest ``keep`` are kept. :func:`restore` loads the newest whole
one into a prepared :class:`deltalign.training.engine.Engine` and drops the metrics logged after it; a checkpoint
that is not whole (unreadable ``state.json``, a file missing or not matching its checksum, an older format) is
renamed ``step-NNNNNN.corrupt`` with one line saying so, and the one before it is tried.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from deltalign import zero
from deltalign.core import atomic
from deltalign.core.fingerprints import sha256_file
from deltalign.core.settings import ConfigError

CKPT_DIR = "checkpoints"
FORMAT = 2  # 1: optimizer.pt (torch.save) and DeepSpeed's own ds/ shards
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


def _all(out_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(out_dir) / CKPT_DIR).glob("step-*") if re.fullmatch(r"step-\d+", p.name))


def latest(out_dir: Path) -> Path | None:
    """The newest checkpoint folder in a stage's run directory, if any (see :func:`latest_whole`)."""
    found = _all(out_dir)
    return found[-1] if found else None


def check_whole(ckpt: Path) -> tuple[dict | None, str]:
    """``(state, "")`` for a whole checkpoint, else ``(None, what is wrong)``."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        return None, f"state.json unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None, "a checkpoint of an older deltalign (optimizer.pt, read with pickle) or not one at all"
    for name in FILES:
        digest = state.get("sha256", {}).get(name)
        if not (ckpt / name).is_file():
            return None, f"{name} is missing"
        if digest is not None and sha256_file(ckpt / name) != digest:
            return None, f"{name} does not match its checksum (damaged)"
    return state, ""


def latest_whole(out_dir: Path, set_aside: bool = False, log=print) -> tuple[Path | None, dict | None]:
    """The newest whole checkpoint and its state (``(None, None)`` if none). With ``set_aside`` (the main
    process, resuming), each newer one that is not whole is renamed ``<name>.corrupt`` with one line to ``log``."""
    for ckpt in reversed(_all(out_dir)):
        state, why = check_whole(ckpt)
        if state is not None:
            return ckpt, state
        if set_aside:
            dest = ckpt.with_name(ckpt.name + ".corrupt")
            atomic.crash_point(f"rename {ckpt} (set aside)")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(ckpt, dest)
            log(f"[deltalign] {ckpt}: {why}; set aside as {dest.name}, resuming from the checkpoint before it")
    return None, None


def step_of(ckpt: Path) -> int:
    """The step a checkpoint folder holds (its name, ``step-NNNNNN``, as :func:`save` writes it)."""
    return int(ckpt.name.split("-")[1])


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """Full values of every trainable tensor. Every process must call it (ZeRO-3 gathers)."""
    return zero.full_tensors(_trainable(engine), engine.zero_stage)


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    backbone = engine.accelerator.unwrap_model(engine.model)
    wanted = set(engine.param_names)
    return [(n, p) for n, p in backbone.named_parameters() if n in wanted]


def _all_rng(engine) -> list[torch.Tensor]:
    """Every process's torch RNG state (dropout differs per process), gathered to all."""
    state = torch.get_rng_state()
    if engine.world == 1:
        return [state]
    from accelerate.utils import gather_object

    return gather_object([state])


def _plain(obj, where: str):
    """``obj`` as JSON values (tuples become lists); anything else (a tensor, an object) is an error, never str()."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (list, tuple)):
        return [_plain(v, where) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    raise TypeError(f"checkpoint: {where} is a {type(obj).__name__}, not a JSON value")


def _like(value, current):
    """A JSON value read back, with the tuples of ``current`` (e.g. AdamW's betas) restored."""
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _optimizer_state(engine) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer as tensors (for safetensors) and JSON values. Every process must call it (ZeRO gathers)."""
    if engine.deepspeed:
        return zero.optimizer_state(engine.model, _trainable(engine))
    sd = engine.optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        name = engine.param_names[idx]
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state/{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [engine.param_names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer_state(engine, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if engine.deepspeed:
        zero.load_optimizer_state(engine.model, _trainable(engine), tensors, meta)
        return
    index = {n: i for i, n in enumerate(engine.param_names)}
    current = engine.optimizer.state_dict()["param_groups"]
    if len(current) != len(meta["param_groups"]):
        raise RuntimeError(f"checkpoint: {len(meta['param_groups'])} optimizer param groups, expected {len(current)}")
    groups = []
    for cur, saved in zip(current, meta["param_groups"]):
        g = {k: _like(v, cur.get(k)) for k, v in saved.items() if k != "params"}
        groups.append(g | {"params": [index[n] for n in saved["params"]]})
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, name, k = key.split("/", 2)
        state.setdefault(index[name], {})[k] = t
    for name, st in meta["scalars"].items():
        state.setdefault(index[name], {}).update(st)
    engine.optimizer.load_state_dict({"state": state, "param_groups": groups})


def save(engine, keep: int) -> None:
    """Write a checkpoint of the engine's current step (every process calls it; only rank 0 writes)."""
    acc = engine.accelerator
    acc.wait_for_everyone()
    state = trainable_state(engine)
    # ZeRO gathers (every process takes part); otherwise every process holds the same state and rank 0 reads it
    opt_tensors, opt_meta = _optimizer_state(engine) if engine.deepspeed or engine.is_main else ({}, {})
    rngs = _all_rng(engine)
    root = engine.out / CKPT_DIR
    final = root / f"step-{engine.step_no:06d}"
    tmp = root / f".step-{engine.step_no:06d}.partial"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        atomic.crash_point(f"mkdir {tmp}")
        tmp.mkdir(parents=True)
        sums = {}
        for name, tensors in zip(FILES, (state, opt_tensors, {f"rng/{r}": s for r, s in enumerate(rngs)})):
            try:
                atomic.save_tensors(tensors, tmp / name)
            except atomic.WriteFailed:
                shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint: the previous one stays the newest
                raise
            sums[name] = sha256_file(tmp / name)
        extra = {name: get() for name, (get, _) in engine.extra_state.items()}
        meta = {"format": FORMAT, "step": engine.step_no, "python_rng": repr(random.getstate()),
                "extra": extra, "world": engine.world, "deepspeed": engine.deepspeed,
                "optimizer": opt_meta, "scheduler": engine.scheduler.state_dict(), "sha256": sums}
        if engine.deepspeed:
            meta["deepspeed_counters"] = zero.counters(engine.model)
        atomic.write_json(tmp / "state.json", _plain(meta, "state"))
        atomic.crash_point(f"rename {final}")
        if final.exists():
            old = root / f".step-{engine.step_no:06d}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            atomic.crash_point(f"rename {final} (old one set aside)")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for old in _all(root.parent)[:-keep]:
            atomic.crash_point(f"delete {old}")
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def restore(engine) -> bool:
    """Load the newest checkpoint into the prepared engine, if there is one; metrics logged after it are
    dropped. Returns whether it resumed. Every process must call it (ZeRO scatters)."""
    from safetensors.torch import load_file

    ckpt, state = latest_whole(engine.out, set_aside=engine.is_main, log=print if not engine.quiet else _quiet)
    if ckpt is None:
        _keep_metrics(engine, 0)  # a run killed before its first checkpoint: its setup rows, not its steps
        return False
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    missing = set(engine.param_names) - set(tensors)
    if missing:
        raise RuntimeError(f"{ckpt}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    if bool(state.get("deepspeed", False)) != engine.deepspeed or int(state.get("world", 1)) != engine.world:
        raise ConfigError(f"{ckpt}: written with deepspeed={state.get('deepspeed', False)}, "
                          f"{state.get('world', 1)} process(es), resumed with deepspeed={engine.deepspeed}, "
                          f"{engine.world}; resume it the same way (or rerun with --force to start afresh)")
    # the trainable values (ZeRO-3: scattered into the shards), then the optimizer (ZeRO: its fp32 master too)
    zero.set_full_tensors(_trainable(engine), tensors, engine.zero_stage)
    _load_optimizer_state(engine, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    if engine.deepspeed:
        zero.set_counters(engine.model, state.get("deepspeed_counters", {}))
    current = engine.scheduler.state_dict()
    engine.scheduler.load_state_dict({k: _like(v, current.get(k)) for k, v in state["scheduler"].items()})
    rngs = load_file(str(ckpt / "rng.safetensors"))
    rank = engine.accelerator.process_index
    torch.set_rng_state(rngs[f"rng/{rank}"] if len(rngs) == engine.world else rngs["rng/0"])
    random.setstate(ast.literal_eval(state["python_rng"]))
    engine.restored_extra = state["extra"]
    for name, (_, put) in engine.extra_state.items():
        put(state["extra"].get(name, {}))
    engine.step_no = state["step"]
    _keep_metrics(engine, engine.step_no)
    if not engine.quiet:
        print(f"[deltalign] resuming {engine.out} from {ckpt.name} (step {engine.step_no})", flush=True)
    return True


def _quiet(line: str) -> None:
    pass


def _keep_metrics(engine, step: int) -> None:
    """Keep the metrics rows up to ``step`` (a half-written last line goes too), so that each step is logged once
    after the resume; the rows kept are noted in ``engine.kept_rows`` (not logged again)."""
    f = engine.out / "metrics.jsonl"
    if not f.exists():
        return
    kept = []
    for line in f.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
            engine.kept_rows.add((row.get("kind"), row.get("step", 0)))
    if engine.is_main:
        atomic.write_text(f, "".join(r + "\n" for r in kept))
