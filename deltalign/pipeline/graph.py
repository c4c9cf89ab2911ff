"""The stage graph: which stages exist, what each needs upstream, and running a set of them in order.

A stage module knows nothing of this file: it exposes ``NAME``, ``Config`` and
``run(cfg, model_cfg, out_dir, upstream) -> metrics``, where ``upstream`` maps stage names to their finished
folders. The graph decides what runs: the requested stages plus whatever they need that is missing or stale.

Stale means the stage's content hash (:meth:`Pipeline.inputs`, hashed) differs from its manifest's. The hash covers
the stage's config and the model config (less ``NOT_HASHED`` settings: threads, log_every, checkpoint_every,
keep_checkpoints, model.gradient_checkpointing, model.memory_budget_gib), the base model's files, its data by
content (a `datasets` id by the revision it resolves to in the local cache), the source file of each user
``module:function`` reward in its ``rules``, the launch (global batch = processes x batch_size x grad_accum,
DeepSpeed JSON and settings, mixed precision), the deltalign/torch/transformers/peft versions, the hashes of the
stages it needs, and, for stages with ``hash_uses`` (dpo, export), the hashes of the finished stages it reads. What
it does not cover is listed in :mod:`deltalign.pipeline.rundir`. :meth:`Pipeline.run` holds the run directory's lock
(:func:`run_lock`) throughout.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deltalign.core import memory
from deltalign.core.verify import Damaged
from deltalign.model.backbone import ModelConfig
from deltalign.core import settings as configs
from deltalign.core.fingerprints import model_fingerprint, sha256_json
from deltalign.pipeline import autofit
from deltalign.pipeline.rundir import (STARTED, StageDir, data_fingerprint, launch_fingerprint, rules_fingerprint,
                                       run_lock, software_versions)


@dataclass
class RunConfig:
    name: str = "default"
    """Run name: outputs go to ``<root>/<name>/<stage>/``."""
    root: str = "runs"
    """Folder that holds the runs."""


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    needs: Callable[[object], list[str]] = field(default=lambda cfg: [])
    """Upstream stages this stage reads, given its config (run first if missing; part of the content hash)."""
    uses: tuple[str, ...] = ()
    """Stages whose finished output is passed along if present (not run; not hashed unless ``hash_uses``)."""
    hash_uses: bool = False
    """Include the finished ``uses`` stages' hashes in this stage's hash, so it reruns when one changes, appears or
    goes (export: its output IS their adapters; dpo: its report scores with the rm)."""


# The literal graph, in execution order. Later stages plug in here.
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("sft", "deltalign.stages.sft"),
    Stage("rm", "deltalign.stages.rm", needs=lambda c: ["sft"] if c.init == "sft" else []),
    Stage("dpo", "deltalign.stages.dpo", needs=lambda c: ["sft"] if "sft" in (c.reference, c.init) else [],
          uses=("rm",), hash_uses=True),
    Stage("kto", "deltalign.stages.kto", needs=lambda c: ["sft"] if "sft" in (c.reference, c.init) else [],
          uses=("rm",), hash_uses=True),
    Stage("ppo", "deltalign.stages.ppo",
          needs=lambda c: ["sft"] + (["rm"] if c.rm_weight or c.critic_init == "rm" else [])),
    Stage("grpo", "deltalign.stages.grpo", needs=lambda c: ["sft"] + (["rm"] if c.rm_weight else [])),
    Stage("compose", "deltalign.stages.compose", needs=lambda c: c.needs()),
    Stage("export", "deltalign.stages.export", needs=lambda c: c.needs(),
          uses=("sft", "rm", "dpo", "kto", "ppo", "grpo", "compose"),
          hash_uses=True),
]}


def stage_module(name: str):
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name].module)


def sections() -> dict[str, type]:
    """Every config section: run, model, one per stage (same word as the stage), and eval (the comparison)."""
    from deltalign.reports.evaluation import EvalConfig

    return {"run": RunConfig, "model": ModelConfig} | {n: stage_module(n).Config for n in STAGES} | \
        {"eval": EvalConfig}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Pipeline:
    def __init__(self, cfgs: dict, run_dir: str | Path | None = None, log=print):
        self.cfgs = cfgs
        run = cfgs["run"]
        self.run_dir = Path(run_dir) if run_dir else Path(run.root) / run.name
        self.log = log if is_main_process() else (lambda *a, **k: None)
        self.current: str | None = None  # the stage running now
        self._hashes: dict[str, str] = {}

    def plan(self, targets: list[str]) -> list[str]:
        """The targets and everything they need upstream, in graph order."""
        wanted: set[str] = set()

        def visit(name: str) -> None:
            stage_module(name)
            if name not in wanted:
                wanted.add(name)
                for up in STAGES[name].needs(self.cfgs[name]):
                    visit(up)

        for t in targets:
            visit(t)
        return [n for n in STAGES if n in wanted]

    def inputs(self, name: str) -> dict:
        """Everything the stage's output depends on, by content: what its hash covers (module docstring)."""
        cfg, stage = self.cfgs[name], STAGES[name]
        data = {f: data_fingerprint(getattr(cfg, f)) for f in ("data", "eval_data") if hasattr(cfg, f)}
        out = {
            "stage": name, "config": configs.hashed_dict(cfg), "model": configs.hashed_dict(self.cfgs["model"]),
            "model_files": model_fingerprint(self.cfgs["model"].path), "data": data,
            "upstream": {u: self.hash(u) for u in stage.needs(cfg)},
            "launch": launch_fingerprint(cfg), "software": software_versions(),
        }
        if isinstance(getattr(cfg, "rules", None), dict) and (code := rules_fingerprint(cfg.rules)):
            out["rules_code"] = code  # user rewards (ppo, grpo, any stage with a ``rules`` mapping)
        if isinstance(getattr(cfg, "sources", None), list):  # compose: deltas in folders outside this run
            out["sources"] = {s: data_fingerprint(s) for s in cfg.sources if s not in STAGES}
        if stage.hash_uses and (used := {u: m["hash"] for u in stage.uses
                                         if (m := StageDir(self.run_dir, u).manifest()) is not None}):
            out["used"] = used
        return out

    def hash(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = sha256_json(self.inputs(name))
        return self._hashes[name]

    def _settled(self, name: str, inputs: dict, h: str) -> tuple[dict, str]:
        """``(inputs, hash)`` after the stage ran, with each `datasets` id resolved again: a data set the run
        downloaded (or found moved on) is recorded at the revision it read, so the next run does not redo it.
        Nothing else is re-read: what changed during the run (code, files) is not what the run used."""
        cfg = self.cfgs[name]
        data = {f: data_fingerprint(getattr(cfg, f)) if v.startswith("datasets:") else v
                for f, v in inputs["data"].items()}
        if data == inputs["data"]:
            return inputs, h
        inputs = inputs | {"data": data}
        self._hashes[name] = sha256_json(inputs)  # what the stages downstream see as this upstream
        return inputs, self._hashes[name]

    def status(self, targets: list[str]) -> list[tuple[str, str, str]]:
        """``(stage, state, detail)`` for each stage ``run`` would visit: ``done`` (wall time, peak memory),
        ``stale`` (its inputs changed: it reruns), ``corrupt`` (finished, but an output does not read back whole:
        it is set aside and reruns), ``unreadable`` (its manifest or inputs file), ``unfinished`` (resumes from its
        newest checkpoint, or restarts) or ``missing``. Reads hashes, manifests and file headers only: no model
        loads, nothing is written."""
        from deltalign.training import checkpoint

        rows = []
        for name in self.plan(targets + self.damaged_uses(targets)):
            sd, h = StageDir(self.run_dir, name), self.hash(name)
            m, started, bad = sd.manifest(), sd.path / STARTED, sd.unreadable()
            if bad:
                rows.append((name, "unreadable", f"{', '.join(str(sd.path / b) for b in bad)} cannot be read: the "
                             "stage moves to .history/ and reruns"))
            elif m is not None and m.get("hash") == h and (broken := sd.damaged()):
                rows.append((name, "corrupt", f"{broken[0]}" + (f" (and {len(broken) - 1} more)" if len(broken) > 1
                                                                 else "") + ": it moves to .history/ and reruns"))
            elif m is not None and m.get("hash") == h:
                peak = m.get("peak_memory", {}).get("host_gib")
                rows.append((name, "done", f"{m.get('wall_time_s', 0):.0f} s" + (
                    f", peak {peak:.2f} GiB" if peak is not None else "") + f", {m.get('finished_at', '')}"))
            elif m is not None:
                rows.append((name, "stale", "its inputs changed: reruns (this output moves to .history/)"))
            elif started.exists():
                same = sd.started_hash() == h
                last = checkpoint.latest(sd.path) if same else None
                rows.append((name, "unfinished", f"resumes from step {checkpoint.step_of(last)}" if last else
                             "restarts (no checkpoint)" if same else "its inputs changed: restarts"))
            else:
                rows.append((name, "missing", "runs"))
        return rows

    def run(self, targets: list[str], force: bool = False) -> dict[str, dict]:
        """Run the targets and what they need, skipping each finished stage whose hash matches (unless ``force``
        and targeted). The main process holds the run directory's lock throughout: a second run on the same
        directory is refused (:class:`deltalign.pipeline.rundir.RunLocked`, a FileExistsError) before it reads or
        writes anything there."""
        with run_lock(self.run_dir) if is_main_process() else contextlib.nullcontext():
            return self._run(targets, force)

    def damaged_uses(self, targets: list[str]) -> list[str]:
        """The finished stages the planned ones read if present (``Stage.uses``) whose output is damaged: they run
        again too (set aside first), rather than hand a damaged file to the stage that reads them."""
        plan = self.plan(targets)
        return [u for u in STAGES if u not in plan and any(u in STAGES[n].uses for n in plan)
                and StageDir(self.run_dir, u).damaged()]

    def _run(self, targets: list[str], force: bool) -> dict[str, dict]:
        results = {}
        extra = self.damaged_uses(targets) if is_main_process() else []
        if extra and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the other processes could not agree on the plan
            raise Damaged(f"stage {extra[0]}: {StageDir(self.run_dir, extra[0]).damaged()[0]}; run `python -m "
                          f"deltalign run {extra[0]}` first (one process: it is set aside and trained again)")
        for name in self.plan(targets + extra):
            sd = StageDir(self.run_dir, name)
            h = self.hash(name)
            if sd.is_done(h) and not (force and name in targets) and not sd.damaged():
                self.log(f"[deltalign] {name}: up to date ({h[:12]}), skipping — {sd.path}")
                if is_main_process():
                    sd.drop_checkpoints()  # left by a kill between the manifest and their removal
                results[name] = sd.manifest()["metrics"]
                continue
            inputs = self.inputs(name)
            # gradient_checkpointing=auto: a concrete mode, from the stage's estimate and the memory budget
            model_cfg, why = autofit.resolve_stage(self.cfgs, name, getattr(stage_module(name), "READS", {}))
            if why:
                self.log(f"[deltalign] {why}")
            if is_main_process():
                sd.prepare(h, inputs, configs.dump_yaml({"model": model_cfg, name: self.cfgs[name]}), self.log)
            self.log(f"[deltalign] {name}: running ({h[:12]}) -> {sd.path}")
            upstream = {u: StageDir(self.run_dir, u).path for u in STAGES[name].needs(self.cfgs[name])}
            upstream |= {u: StageDir(self.run_dir, u).path for u in STAGES[name].uses
                         if StageDir(self.run_dir, u).manifest() is not None}
            t0, self.current = time.time(), name  # what an interrupted run names (pipeline.cli)
            memory.reset_peak()
            metrics = stage_module(name).run(self.cfgs[name], model_cfg, sd.path, upstream)
            inputs, h = self._settled(name, inputs, h)
            peak = memory.peak_of_all_processes(memory.peak())
            gc.collect()  # the stage's model sits in reference cycles (accelerate, peft, hooks): gone before the next
            memory.release_free_memory()
            if is_main_process():
                sd.finish(h, inputs, metrics, time.time() - t0, peak)
                sd.drop_checkpoints()  # only now: a kill before the manifest resumes from the last of them
            each = f" (the largest of {len(peak['processes'])} processes)" if "processes" in peak else ""
            self.log(f"[deltalign] {name}: done in {time.time() - t0:.0f}s; peak memory "
                     + ", ".join(f"{v:.2f} GiB {k.split('_')[0]}" for k, v in peak.items() if k != "processes") + each)
            results[name] = metrics
        return results
