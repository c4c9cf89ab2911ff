"""Training mechanics every stage shares, on accelerate.

A stage writes its own loop; the engine supplies the parts that are the same everywhere:

    engine = Engine(cfg, out_dir)
    model = engine.prepare(backbone, n_steps=engine.total_steps(n_batches))
    for step, micro_batches in engine.steps(batches_for_epoch):
        total = engine.global_sum(sum(count(mb) for mb in micro_batches))
        for mb in engine.accumulate(micro_batches):
            loss_sum = ...                      # a SUM over the micro-batch's tokens / pairs
            engine.backward(loss_sum, total)    # normalised once, over the whole optimizer step
        engine.step({"loss": ...})              # clip, optimizer, schedule, log, checkpoint
    engine.finish()

Gradient accumulation is normalised once and correctly: each micro-batch contributes ``loss_sum / total`` where
``total`` counts the tokens (or pairs) of the whole optimizer step across every process, so a micro-batch with
more tokens weighs more, exactly as if the step were one big batch.

Checkpoints hold only what trains (adapter and head tensors, in safetensors), the optimizer and scheduler, the
RNG state, the step and any extra state a stage registers. They are written to a temp dir and renamed, so a kill
at any moment leaves the previous checkpoint intact; a new run in the same directory resumes from the last one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from deltalign import atomic

CKPT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    batch_size: int = 8
    """Rows (or pairs) per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step per process."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: use epochs)."""
    warmup_ratio: float = 0.05
    """Share of the steps with linear warmup, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay on the trainable parameters."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = 0
    """Seed for data order, dropout and initialisation of fresh deltas."""
    log_every: int = 5
    """Log training metrics every N optimizer steps."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every N optimizer steps (0: never)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Engine:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, quiet: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        self.cfg = cfg
        self.out = Path(out_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # On CPU, accelerate leaves the backend unset and each launched process would think it is alone.
        handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
        self.accelerator = Accelerator(kwargs_handlers=handlers)
        self.quiet = quiet or not self.is_main
        self.step_no = 0
        self.extra_state: dict[str, tuple[Callable[[], dict], Callable[[dict], None]]] = {}
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t0 = time.time()
        self._bar = None
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    # --- set-up ---------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device

    def total_steps(self, n_micro_batches: int) -> int:
        """Optimizer steps for the configured epochs (or max_steps)."""
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        per_epoch = math.ceil(n_micro_batches / (self.cfg.grad_accum * self.world))
        return max(1, math.ceil(per_epoch * self.cfg.epochs))

    def prepare(self, backbone, n_steps: int):
        """Build AdamW over the parameters that train now, the schedule, and hand all to accelerate.

        Everything a stage trains must be trainable before this call (DeepSpeed builds its groups here).
        """
        self.backbone = backbone
        self.n_steps = n_steps
        params = [p for p in backbone.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("nothing to train: no parameter requires grad")
        self.param_names = [n for n, p in backbone.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = max(1, int(self.cfg.warmup_ratio * n_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, n_steps, warmup, self.cfg.min_lr_ratio))
        self.model, self.optimizer = self.accelerator.prepare(backbone, self.optimizer)
        self.resume()
        return self.model

    def register_state(self, name: str, get: Callable[[], dict], put: Callable[[dict], None]) -> None:
        """Include a stage's own state (e.g. a KL controller) in checkpoints; ``put`` is called on resume."""
        self.extra_state[name] = (get, put)

    # --- the loop -------------------------------------------------------------------------------------------
    def steps(self, batches_for_epoch: Callable[[int], list]) -> Iterator[tuple[int, list]]:
        """Yield ``(step, micro_batches)`` for each optimizer step this process runs, skipping resumed steps.

        ``batches_for_epoch(epoch)`` must be deterministic; micro-batch i of a step goes to process i % world.
        """
        group = self.cfg.grad_accum * self.world
        step, epoch = 0, 0
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.n_steps, initial=self.step_no, disable=self.quiet, desc=self.out.name)
        while step < self.n_steps:
            batches = batches_for_epoch(epoch)
            if not batches:
                raise RuntimeError("no training batches: the data set is empty after filtering")
            for i in range(0, len(batches), group):
                if step >= self.n_steps:
                    break
                if step >= self.step_no:
                    mine = batches[i:i + group][self.accelerator.process_index::self.world]
                    yield step, mine
                step += 1
            epoch += 1
        self._bar.close()

    def global_sum(self, value: float) -> float:
        """Sum a count (tokens, pairs) over all processes."""
        if self.world == 1:
            return float(value)
        t = torch.tensor(float(value), device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def accumulate(self, micro_batches: list) -> Iterator:
        """Iterate micro-batches; gradients are synchronised across processes only on the last one."""
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            ctx = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
            with ctx:
                yield mb

    def backward(self, loss_sum: torch.Tensor, total: float) -> None:
        """Backward of this micro-batch's share of the step loss: ``loss_sum / total`` (times world: DDP means)."""
        self.accelerator.backward(loss_sum * (self.world / max(total, 1e-12)))

    def step(self, metrics: dict[str, float]) -> None:
        """Clip, update, advance the schedule; accumulate metrics, log and checkpoint on schedule."""
        if self.cfg.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.backbone.trainable_parameters(), self.cfg.max_grad_norm)
            metrics = {**metrics, "grad_norm": float(norm)}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_no += 1
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._n += 1
        if self.step_no % self.cfg.log_every == 0 or self.step_no == self.n_steps:
            self.log({k: v / self._n for k, v in self._sums.items()} | {"lr": self.scheduler.get_last_lr()[0]})
            self._sums, self._n = {}, 0
        if self._bar is not None:
            self._bar.update(1)
        if self.cfg.checkpoint_every and self.step_no % self.cfg.checkpoint_every == 0 and self.step_no < self.n_steps:
            self.save_checkpoint()
        fail_at = os.environ.get("DELTALIGN_TEST_KILL_AT_STEP")  # tests simulate a kill -9 right here
        if fail_at and int(fail_at) == self.step_no:
            os._exit(137)

    # --- logging --------------------------------------------------------------------------------------------
    def log(self, metrics: dict, kind: str = "train") -> None:
        """Append one JSON line to metrics.jsonl (main process only) and show it on the progress bar."""
        if not self.is_main:
            return
        row = {"kind": kind, "step": self.step_no, "time": round(time.time() - self._t0, 2)}
        row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._bar is not None and not self.quiet:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}, refresh=False)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        backbone = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().cpu().clone() for n, p in backbone.named_parameters() if n in set(self.param_names)}

    def save_checkpoint(self) -> None:
        from safetensors.torch import save_file

        self.accelerator.wait_for_everyone()
        state = self.trainable_state()
        if self.is_main:
            root = self.out / CKPT_DIR
            with atomic.directory(root / f"step-{self.step_no:06d}", replace=True) as tmp:
                save_file(state, tmp / "trainable.safetensors")
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
                extra = {name: get() for name, (get, _) in self.extra_state.items()}
                atomic.write_json(tmp / "state.json", {"step": self.step_no, "python_rng": repr(random.getstate()),
                                                       "extra": extra})
            for old in sorted(root.glob("step-*"))[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.out / CKPT_DIR).glob("step-*"))
        return found[-1] if found else None

    def resume(self) -> None:
        """Restore the newest checkpoint in the run directory, if any; metrics logged after it are dropped."""
        import ast

        from safetensors.torch import load_file

        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return
        tensors = load_file(str(ckpt / "trainable.safetensors"))
        backbone = self.accelerator.unwrap_model(self.model)
        missing = set(self.param_names) - set(tensors)
        if missing:
            raise RuntimeError(f"{ckpt}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for n, p in backbone.named_parameters():
                if n in tensors:
                    p.copy_(tensors[n])
        blob = torch.load(ckpt / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        state = json.loads((ckpt / "state.json").read_text())
        random.setstate(ast.literal_eval(state["python_rng"]))
        for name, (_, put) in self.extra_state.items():
            put(state["extra"].get(name, {}))
        self.step_no = state["step"]
        if self.is_main and (self.out / "metrics.jsonl").exists():
            rows = [r for r in (self.out / "metrics.jsonl").read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r)["step"] <= self.step_no]
            atomic.write_text(self.out / "metrics.jsonl", "".join(r + "\n" for r in kept))
        if not self.quiet:
            print(f"[deltalign] resuming {self.out} from {ckpt.name} (step {self.step_no})", flush=True)

    def finish(self) -> None:
        """Wait for every process; drop the checkpoints of a run that completed."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(self.out / CKPT_DIR, ignore_errors=True)
