"""Training mechanics every stage shares, on accelerate.

A stage writes its own loop; the engine supplies the parts that are the same everywhere:

    engine = Engine(cfg, out_dir)
    model = engine.prepare(backbone, n_steps=engine.total_steps(n_batches))
    for step, micro_batches in engine.steps(batches_for_epoch):
        total = engine.global_sum(sum(count(mb) for mb in micro_batches))
        for mb in micro_batches:
            loss_sum = ...                      # a SUM over the micro-batch's tokens / pairs
            engine.backward(loss_sum, total)    # normalised once, over the whole optimizer step
        engine.step({"loss": ...})              # clip, optimizer, schedule, log, checkpoint
    engine.finish()

Gradient accumulation is normalised once and correctly: each micro-batch contributes ``loss_sum / total`` where
``total`` counts the tokens (or pairs) of the whole optimizer step across every process, so a micro-batch with
more tokens weighs more, exactly as if the step were one big batch. Nothing is synchronised per micro-batch:
gradients are reduced across processes once per update, in :meth:`Engine.update` (DeepSpeed with
``managed_gradient_accumulation: false``, plain data parallel by the engine's own all-reduce).

Every step is a full global batch: each process always gets exactly ``grad_accum`` micro-batches. When an epoch's
micro-batch count is not a multiple of ``processes x grad_accum``, its last step is filled up with the epoch's
first micro-batches (wrap-pad; ``total_steps`` counts that step), so no process ever sits out a step.

Several processes without DeepSpeed (``configs/accelerate/ddp.yaml``): the model is not wrapped in DDP;
:meth:`Engine.update` averages the trainable gradients over the processes (:mod:`deltalign.training.processes`).

Checkpoints hold only what trains (adapter and head tensors), the optimizer and scheduler, the RNG state, the step
and any extra state a stage registers, in safetensors and JSON only (nothing is unpickled on resume). They are
written to a temp dir and renamed, so a kill at any moment leaves the previous checkpoint intact; a new run in the
same directory resumes from the last one.

Under DeepSpeed (``accelerate launch --config_file configs/accelerate/zero{2,3}.yaml``) the same stage code runs
unchanged: accumulation, the update boundary and clipping stay the engine's (see :mod:`deltalign.zero`);
``grad_norm`` is DeepSpeed's pre-clip global norm. ZeRO-3 shards every parameter, the frozen base included, and
never gathers the whole base unless told to: saving gathers only the delta (:meth:`Engine.save_delta`),
checkpoints only what trains (:mod:`deltalign.training.checkpoint`); generation and evaluation run inside
``with engine.generating():`` / ``with engine.evaluating() as evaluate:``, which every rank enters, and which
gather the full weights or step all ranks together, as ``zero3_generation`` says (:mod:`deltalign.sampling.ranks`).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from deltalign.core import atomic
from deltalign.training import checkpoint, faults

from deltalign import zero
from deltalign.training.processes import Processes, start_accelerator
from deltalign.training.train_config import TrainConfig, lr_lambda
from deltalign.sampling import ranks


class Engine:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, quiet: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.accelerator = start_accelerator()
        self.processes = Processes(self.accelerator)
        self.ds_plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        self.zero_stage = int(self.ds_plugin.zero_stage) if self.ds_plugin is not None else 0
        if self.zero_stage == 3:  # transformers' ZeRO-3 mode, whatever zero3_init_flag says: a base loaded from
            self.ds_plugin.set_deepspeed_weakref()  # now on is built partitioned (zero.loading)
            zero.return_gather_buffers()
        self.quiet = quiet or not self.is_main
        self.step_no = 0
        self.extra_state: dict[str, tuple[Callable[[], dict], Callable[[dict], None]]] = {}
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t0 = time.time()
        self._bar = None
        self.restored_extra: dict = {}  # the extra state of the checkpoint resumed from (register_state puts it)
        self.kept_rows: set[tuple[str, int]] = set()  # (kind, step) of the metrics rows kept from before a resume
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

    @property
    def deepspeed(self) -> bool:
        return self.ds_plugin is not None

    @property
    def data_parallel(self) -> bool:
        """Several processes without DeepSpeed: gradients are averaged by :meth:`update` (no DDP wrapper)."""
        return self.world > 1 and not self.deepspeed

    def total_steps(self, n_micro_batches: int) -> int:
        """Optimizer steps for the configured epochs (or max_steps)."""
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        per_epoch = math.ceil(n_micro_batches / (self.cfg.grad_accum * self.world))
        return max(1, math.ceil(per_epoch * self.cfg.epochs))

    def prepare(self, backbone, n_steps: int, updates_per_step: int = 1):
        """Build AdamW over the parameters that train now, the schedule, and hand all to accelerate.

        Everything a stage trains must be trainable before this call (DeepSpeed builds its groups here).
        ``updates_per_step``: optimizer updates inside one step (PPO: epochs x minibatches per rollout); the
        schedule runs over ``n_steps * updates_per_step`` updates.
        """
        model_cfg = getattr(backbone, "cfg", None)
        zero.check_supported(getattr(model_cfg, "quantization", "none"), self.zero_stage)
        self.backbone = backbone
        self.n_steps = n_steps
        n_updates = n_steps * updates_per_step
        params = [p for p in backbone.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("nothing to train: no parameter requires grad")
        self.param_names = [n for n, p in backbone.named_parameters() if p.requires_grad]
        self._params = params
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if self.deepspeed:
            zero.configure(self.ds_plugin.deepspeed_config, self.cfg.batch_size, self.world, self.cfg.max_grad_norm)
            self.accelerator.gradient_accumulation_steps = 1
        if self.data_parallel:
            # No DDP wrapper (device placement and mixed precision only): update() averages the gradients itself.
            self.model = self.accelerator.prepare_model(backbone, evaluation_mode=True)
            self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
            self.processes.broadcast(params)  # as DDP does: every process starts from rank 0's deltas
        else:
            self.model, self.optimizer = self.accelerator.prepare(backbone, self.optimizer)
        warmup = max(1, int(self.cfg.warmup_ratio * n_updates))
        # The schedule drives the optimizer that really steps (under ZeRO, the one inside DeepSpeed's wrapper).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._base_optimizer(), lambda s: lr_lambda(s, n_updates, warmup, self.cfg.min_lr_ratio))
        checkpoint.restore(self)
        return self.model

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that really steps: accelerate wraps it; ZeRO wraps it once more (and with CPU
        offload accelerate may have replaced it), so follow ``.optimizer`` to the innermost one."""
        opt = self.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt

    # --- generation, evaluation and saving: every process enters; under ZeRO-3 see deltalign.sampling.ranks ---
    def generating(self):
        """Every process enters it together; inside, each generates (and scores) its own rows."""
        return ranks.generating(self)

    def evaluating(self, forwards: bool = True):
        """Every process enters it together; yields whether this process runs the evaluation code."""
        return ranks.evaluating(self, forwards)

    def save_delta(self, name: str, out_dir: str | Path, head_file: str | Path | None = None) -> None:
        """Every process calls it: delta ``name`` (and, with ``head_file``, its scalar head) written by rank 0."""
        ranks.save_delta(self, name, out_dir, head_file)

    def register_state(self, name: str, get: Callable[[], dict], put: Callable[[dict], None]) -> None:
        """Include a stage's own state (e.g. a KL controller) in checkpoints; ``put`` is called on resume."""
        self.extra_state[name] = (get, put)
        if name in self.restored_extra:  # registered after prepare() resumed: put it now
            put(self.restored_extra[name])

    # --- the loop -------------------------------------------------------------------------------------------
    def steps(self, batches_for_epoch: Callable[[int], list]) -> Iterator[tuple[int, list]]:
        """Yield ``(step, micro_batches)`` for each optimizer step this process runs, skipping resumed steps.

        ``batches_for_epoch(epoch)`` must be deterministic; micro-batch i of a step goes to process i % world.
        Every process always gets exactly ``grad_accum`` micro-batches: an epoch's last step, when its micro-batch
        count is not a multiple of ``grad_accum x world``, is filled up with the epoch's first micro-batches
        (wrap-pad), so every step is a full global batch.
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
                    full = [batches[(i + j) % len(batches)] for j in range(group)]  # wrap-pad the last group
                    yield step, full[self.accelerator.process_index::self.world]
                step += 1
            epoch += 1
        self._bar.close()

    def global_sum(self, value: float) -> float:
        """Sum a count (tokens, pairs) over all processes."""
        return float(self.all_sum(torch.tensor(float(value), device=self.device)))

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a tensor over all processes (every process must call it); no gradient."""
        return self.processes.all_sum(t)

    def backward(self, loss_sum: torch.Tensor, total: float) -> None:
        """Backward of this micro-batch's share of the step loss: ``loss_sum / total`` (times world: the
        reduction across processes is a mean)."""
        loss = loss_sum * (self.world / max(total, 1e-12))
        if self.deepspeed:
            # Not accelerator.backward: under DeepSpeed it would also run the optimizer step after every call.
            self.model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def update(self) -> dict[str, float]:
        """One optimizer update: average the gradients over processes (plain data parallel), clip, step, advance
        the schedule, zero the gradients. Returns ``grad_norm``."""
        out = {}
        if self.deepspeed:
            self.model.step()  # clip (gradient_clipping = max_grad_norm), optimizer step, zero the gradients
            if self.cfg.max_grad_norm > 0:
                out["grad_norm"] = float(self.model.get_global_grad_norm())
            self.scheduler.step()
            zero.clear_gradients(self.model, self.zero_stage)
            return out
        if self.data_parallel:
            self.processes.average_gradients(self._params)
        if self.cfg.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.backbone.trainable_parameters(), self.cfg.max_grad_norm)
            out["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def step(self, metrics: dict[str, float], update: bool = True) -> None:
        """End an optimizer step: update (unless the stage already ran its own ``update`` calls), then
        accumulate metrics, log and checkpoint on schedule."""
        if update:
            metrics = {**metrics, **self.update()}
        metrics = self.processes.mean(metrics)
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
            checkpoint.save(self, self.cfg.keep_checkpoints)
        faults.kill_point(self.out.name, self.step_no, self.accelerator.process_index)  # tests only

    # --- logging --------------------------------------------------------------------------------------------
    def log(self, metrics: dict, kind: str = "train") -> None:
        """Append one JSON line to metrics.jsonl (main process only) and show it on the progress bar."""
        if not self.is_main:
            return
        if kind != "train" and ((kind, self.step_no) in self.kept_rows
                                or kind == "setup" and any(k == "setup" for k, _ in self.kept_rows)):
            return  # logged before the crash this run resumed from (the setup row, a baseline measured again)
        row = {"kind": kind, "step": self.step_no, "time": round(time.time() - self._t0, 2)}
        row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.crash_point(f"append {self.out / 'metrics.jsonl'}")
        try:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise atomic.failed(self.out / "metrics.jsonl", e) from None
        if self._bar is not None and not self.quiet:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}, refresh=False)

    def to_device(self, batch: dict) -> dict:
        """Move every tensor of a batch to this process's device."""
        from deltalign.data.batching import to_device

        return to_device(batch, self.device)

    def finish(self) -> None:
        """Wait for every process. The checkpoints stay until the stage's manifest is written
        (:meth:`deltalign.pipeline.graph.Pipeline.run` drops them then), so a kill in between loses no step."""
        self.accelerator.wait_for_everyone()
