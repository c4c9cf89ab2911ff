"""The stage graph: which stages exist, what each needs upstream, and running a set of them in order.

A stage module knows nothing of this file: it exposes ``NAME``, ``Config`` and
``run(cfg, model_cfg, out_dir, upstream) -> metrics``, where ``upstream`` maps stage names to their finished
folders. The graph decides what runs: the requested stages plus whatever they need that is missing or stale.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deltalign.backbone import ModelConfig
from deltalign.pipeline import config as configs
from deltalign.pipeline.rundir import StageDir, data_fingerprint, model_fingerprint, sha256_json


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
    """Include the finished ``uses`` stages' hashes in this stage's hash (export: its output IS their adapters)."""


# The literal graph, in execution order. Later stages plug in here.
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("sft", "deltalign.stages.sft"),
    Stage("rm", "deltalign.stages.rm", needs=lambda c: ["sft"] if c.init == "sft" else []),
    Stage("dpo", "deltalign.stages.dpo", needs=lambda c: ["sft"] if "sft" in (c.reference, c.init) else [],
          uses=("rm",)),
    Stage("ppo", "deltalign.stages.ppo",
          needs=lambda c: ["sft"] + (["rm"] if c.rm_weight or c.critic_init == "rm" else [])),
    Stage("grpo", "deltalign.stages.grpo", needs=lambda c: ["sft"] + (["rm"] if c.rm_weight else [])),
    Stage("export", "deltalign.stages.export", needs=lambda c: c.upstream(), uses=("sft", "rm", "dpo", "ppo", "grpo"),
          hash_uses=True),
]}


def stage_module(name: str):
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name].module)


def sections() -> dict[str, type]:
    """Every config section: run, model, one per stage (same word as the stage), and eval (the comparison)."""
    from deltalign.evaluation import EvalConfig

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
        """Everything the stage's output depends on, by content."""
        cfg = self.cfgs[name]
        data = {f: data_fingerprint(getattr(cfg, f)) for f in ("data", "eval_data") if hasattr(cfg, f)}
        out = {
            "stage": name, "config": configs.to_dict(cfg), "model": configs.to_dict(self.cfgs["model"]),
            "model_files": model_fingerprint(self.cfgs["model"].path), "data": data,
            "upstream": {u: self.hash(u) for u in STAGES[name].needs(cfg)},
        }
        if STAGES[name].hash_uses:
            out["used"] = {u: m["hash"] for u in STAGES[name].uses
                           if (m := StageDir(self.run_dir, u).manifest()) is not None}
        return out

    def hash(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = sha256_json(self.inputs(name))
        return self._hashes[name]

    def run(self, targets: list[str], force: bool = False) -> dict[str, dict]:
        results = {}
        for name in self.plan(targets):
            sd = StageDir(self.run_dir, name)
            h = self.hash(name)
            if sd.is_done(h) and not (force and name in targets):
                self.log(f"[deltalign] {name}: up to date ({h[:12]}), skipping — {sd.path}")
                results[name] = sd.manifest()["metrics"]
                continue
            inputs = self.inputs(name)
            if is_main_process():
                sd.prepare(h, inputs, configs.dump_yaml({"model": self.cfgs["model"], name: self.cfgs[name]}),
                           self.log)
            self.log(f"[deltalign] {name}: running ({h[:12]}) -> {sd.path}")
            upstream = {u: StageDir(self.run_dir, u).path for u in STAGES[name].needs(self.cfgs[name])}
            upstream |= {u: StageDir(self.run_dir, u).path for u in STAGES[name].uses
                         if StageDir(self.run_dir, u).manifest() is not None}
            t0 = time.time()
            metrics = stage_module(name).run(self.cfgs[name], self.cfgs["model"], sd.path, upstream)
            if is_main_process():
                sd.finish(h, inputs, metrics, time.time() - t0)
            self.log(f"[deltalign] {name}: done in {time.time() - t0:.0f}s")
            results[name] = metrics
        return results
