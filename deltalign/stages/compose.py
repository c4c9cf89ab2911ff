"""Compose: combine two or more finished LoRA deltas into one (``compose``), on the one frozen base.

Methods (``method``):

- ``cat`` -- exact: peft's ``add_weighted_adapter(combination_type="cat")`` stacks the sources' factors into one
  LoRA of rank ``sum r_s`` whose output at every adapted module is exactly ``sum_s w_s * delta_s(x)``. With deltas
  that share an init (two DPO policies started from one SFT adapter), weights summing to 1 keep the shared part once
  and average the rest; ``[1, 1, -1]`` over ``[dpo_a, dpo_b, sft]`` is task arithmetic (``sft + (a - sft) + (b -
  sft)``).
- ``ties`` -- TIES-merging (Yadav et al. 2023) on each module's full update ``delta W_s = scale_s B_s A_s``: keep
  each source's ``density`` share of largest-magnitude entries, elect a sign per entry, average the agreeing entries
  (weighted), then factor the result back to rank ``rank`` by SVD (peft's ``ties_svd``; peft's plain ``ties`` would
  merge the A and B factors separately, which is not TIES on the update).
- ``svd`` -- the weighted sum of the updates, factored back to rank ``rank`` by SVD (exact when ``rank`` reaches
  the rank of the sum, e.g. ``sum r_s``).
- ``gates`` -- learned per-layer gates over the frozen sources' outputs (AdapterFusion's idea, our module:
  :mod:`deltalign.deltas.fusion`): ``y = base(x) + sum_s w[l, s] * delta_s(x)`` with ``w[l] = softmax`` (or
  ``sigmoid``) of one logit per decoder layer per source, started at ``weights`` (uniform by default, so step 0 IS
  the ``cat`` average), trained with the SFT loss on ``data`` while the base and the sources stay frozen -- only
  ``layers x sources`` numbers train. SFT-style rows, not preference pairs: the gates only choose how much of each
  already aligned delta to use where, which demonstrations of the wanted behaviour (both families mixed) teach
  directly; a preference loss would need a reference policy, and for a mixture of policies there is no natural one
  (each source has its own), plus twice the forwards per row and cached reference log-probs. The trained gates are
  baked into one plain LoRA adapter (exact: a gated sum of LoRAs IS a LoRA of the stacked ranks) and also kept as
  ``gates.safetensors`` + ``gates.json`` (:func:`deltalign.deltas.fusion.load_gates` attaches them again over the
  sources they name).

Output in ``out_dir``, for every method: the composed delta as a plain peft LoRA adapter (``adapter_config.json``,
``adapter_model.safetensors``) that ``Backbone.load_adapter`` -- and so eval, generate, export and any later stage
-- reads like an SFT or DPO adapter; ``compose.json`` (the recipe: method, weights, settings, each source by path
and sha256); ``eval.json``; for ``gates`` also ``gates.safetensors``, ``gates.json`` and ``metrics.jsonl``.

What cannot compose (refused before any work, naming ``compose.sources[i]``): any delta that is not LoRA (DoRA,
ia3, ln, prefix, prompt, bottleneck: :data:`deltalign.deltas.composable.NOT_COMPOSABLE` says why for each), a
reward model (its head would need composing), deltas trained on another base model. The stage runs in one process (it
trains at most a few hundred numbers); a multi-process launch is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deltalign.core import atomic
from deltalign.model.backbone import Backbone, ModelConfig
from deltalign.model.modes import train_mode
from deltalign.data.batching import PadCounter
from deltalign.data.splits import RowRules
from deltalign.deltas import composable, fusion
from deltalign.training.engine import Engine
from deltalign.stages.skeleton import epoch_batches
from deltalign.training.train_config import TrainConfig
from deltalign.sampling.generation import GenerationConfig, checker_row
from deltalign.core.settings import setting
from deltalign.stages.sft import heldout_loss, train_step

NAME = "compose"
READS = {"data": "sft", "eval_data": "sft"}  # setting -> row shape (checked before the run)
GATES = "gates"  # the name of the live gates delta on the backbone while they train
PEFT_METHOD = {"cat": "cat", "ties": "ties_svd", "svd": "svd"}
_STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")  # a bare word: a stage of this run; else a folder


def is_stage_name(source: str) -> bool:
    return bool(_STAGE_NAME.match(source))


@dataclass
class Config(RowRules, TrainConfig):
    """Combine finished LoRA deltas into one. The training settings (``lr``, ``batch_size``, ``max_steps``,
    ``epochs``, ...) and ``data`` apply to ``method: gates`` only."""

    sources: list[str] = field(default_factory=lambda: ["sft", "dpo"])
    """Deltas to combine (two or more): a bare word is a stage of this run (its finished folder, run first if
    missing), anything else a folder holding a finished delta (``runs/a/dpo``, ``./mine``). Only LoRA deltas compose.
    The default halves the way from SFT to DPO (cat, weights 0.5/0.5: the SFT part once, half the DPO change)."""
    weights: list[float] = field(default_factory=list)
    """One weight per source (empty: the method's default). ``cat``, ``svd``: any finite numbers, negative ones
    subtract (default 1/n each, an average); ``ties``: the scale of each source's task vector (default 1 each: TIES
    already averages the entries that agree); ``gates``: the gates' starting values (default 1/n each), > 0 for
    ``softmax`` (normalised to sum 1), strictly between 0 and 1 for ``sigmoid``."""
    method: Literal["cat", "ties", "svd", "gates"] = "cat"
    """``cat`` (exact weighted sum, rank = the sum of the ranks), ``ties`` (TIES on each module's update, then SVD
    to ``rank``), ``svd`` (weighted sum, then SVD to ``rank``) or ``gates`` (learned per-layer gates over the
    frozen sources, trained on ``data``, then baked into one LoRA)."""
    density: float = setting(0.5, gt=0, le=1)
    """ties: share of each source's update entries kept (largest magnitudes) before the sign election, in (0, 1]."""
    ties_sign: Literal["total", "frequency"] = "total"
    """ties: elect each entry's sign by the summed values (``total``, the paper's) or by the count of signs."""
    rank: int = setting(0, ge=0)
    """ties, svd: rank of the composed LoRA (0: the largest source rank); at most the smallest dimension of any
    adapted matrix."""
    gate: Literal["softmax", "sigmoid"] = "softmax"
    """gates: ``softmax`` over the sources in each layer (weights sum to 1: a shared SFT part stays whole, the
    rest is a per-layer mixture) or ``sigmoid`` (each source's weight independent, in (0, 1))."""
    lr: float = setting(5e-2, gt=0)
    """gates: peak learning rate of the gate logits (AdamW; a logit moves about lr per step, so far above an
    adapter's)."""
    data: str = "embedded:sft_train"  # (settings declared in data.splits.Sources; SFT rows, as sft)
    eval_data: str = "embedded:sft_eval"
    eval_batch_size: int = setting(16, ge=1)
    """Rows per batch for held-out loss."""
    eval_checker: bool = True
    """Generate on held-out prompts and score them with the embedded checker (each source and the composition)."""
    eval_limit: int = setting(0, ge=0)
    """Use at most this many held-out examples for generation (0: all)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for held-out generations."""

    def __post_init__(self) -> None:
        if len(self.sources) < 2:
            raise ValueError(f"compose.sources: at least two deltas to combine (got {self.sources!r})")
        for i, s in enumerate(self.sources):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"compose.sources[{i}]: empty")
            if s == NAME:
                raise ValueError(f"compose.sources[{i}]: {s!r} is this stage")
        seen = [s for i, s in enumerate(self.sources) if s in self.sources[:i]]
        if seen:
            raise ValueError(f"compose.sources: {seen[0]!r} listed twice")
        w = self.weights
        if w:
            if len(w) != len(self.sources):
                raise ValueError(f"compose.weights: {len(w)} weight(s) for {len(self.sources)} sources "
                                 "(one per source, or none for the method's default)")
            if not fusion.finite(w):
                raise ValueError(f"compose.weights: every weight must be a finite number (got {w})")
            if self.method == "gates" and self.gate == "softmax" and any(x <= 0 for x in w):
                raise ValueError(f"compose.weights: gate softmax starts from weights > 0 (got {w})")
            if self.method == "gates" and self.gate == "sigmoid" and any(not 0 < x < 1 for x in w):
                raise ValueError(f"compose.weights: gate sigmoid starts from weights strictly between 0 and 1 "
                                 f"(got {w})")
            if all(x == 0 for x in w):
                raise ValueError("compose.weights: all zero (the composition would be the bare base)")
        if self.method == "gates" and not self.data:
            raise ValueError("compose.data: method gates trains its gates on data; give SFT-shaped rows")

    def needs(self) -> list[str]:
        """The sources that are stages of this run (the graph runs them first and hashes them)."""
        return [s for s in self.sources if is_stage_name(s)]

    def resolved_weights(self) -> list[float]:
        if self.weights:
            return [float(x) for x in self.weights]
        n = len(self.sources)
        return [1.0] * n if self.method == "ties" else [1.0 / n] * n


def resolve(cfg: Config, upstream: dict[str, Path]) -> list[composable.Source]:
    """Each source as a folder, inspected (everything that cannot compose is refused here, before any work)."""
    out = []
    for i, s in enumerate(cfg.sources):
        key = f"compose.sources[{i}] ({s})"
        if is_stage_name(s):
            if s not in upstream:
                raise ValueError(f"compose.sources[{i}]: stage {s!r} has no finished output in this run "
                                 f"(finished: {', '.join(upstream) or 'none'}); a folder needs a '/' (./{s})")
            path = Path(upstream[s])
            key = f"compose.sources[{i}] ({s}: {path})"
        else:
            path = Path(s)
        out.append(composable.inspect_source(path, key))
    return out


def check_rank(cfg: Config, backbone, names: list[str], sources: list[composable.Source]) -> int:
    """The rank ties/svd will produce (``rank``, or the largest source rank), refused if above the smallest
    dimension of an adapted matrix."""
    from peft.tuners.lora import LoraLayer

    dims = [min(m.in_features, m.out_features) for _, m in backbone.causal_lm.named_modules()
            if isinstance(m, LoraLayer) and any(n in m.lora_A for n in names)]
    rank = cfg.rank or max(s.rank for s in sources)
    if dims and rank > min(dims):
        raise ValueError(f"compose.rank: {rank} is above the smallest dimension of an adapted matrix ({min(dims)})")
    return rank


def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    out_dir, upstream = Path(out_dir), upstream or {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("compose runs in one process (it trains at most a few hundred numbers); launch it "
                         "without accelerate / DeepSpeed")

    # 1. the sources: refused before loading anything if they cannot compose
    sources = resolve(cfg, upstream)
    composable.check_base(sources, model_cfg.path)
    weights = cfg.resolved_weights()

    # 2. one backbone, the sources frozen on it
    backbone = Backbone.load(model_cfg)
    names = composable.load_sources(backbone, [s.path for s in sources], [s.key for s in sources])
    metrics: dict = {"method": cfg.method, "sources": [str(s.path) for s in sources], "weights": weights}

    # 3. compose into one peft adapter named NAME
    if cfg.method == "gates":
        metrics |= train_gates(cfg, backbone, names, sources, weights, out_dir, model_cfg)
    else:
        rank = check_rank(cfg, backbone, names, sources) if cfg.method != "cat" else None
        backbone.model.add_weighted_adapter(
            names, weights, NAME, combination_type=PEFT_METHOD[cfg.method], svd_rank=rank,
            density=cfg.density if cfg.method == "ties" else None, majority_sign_method=cfg.ties_sign,
            svd_full_matrices=False)
    backbone.activate(NAME)
    metrics["rank"] = int(backbone.model.peft_config[NAME].r)

    # 4. save: the composed delta as a plain adapter, and the recipe
    backbone.save_adapter(NAME, out_dir)
    recipe = {"method": cfg.method, "weights": weights, "rank": metrics["rank"],
              "sources": [{"source": src, **s.record()} for src, s in zip(cfg.sources, sources)],
              "base_model_name_or_path": model_cfg.path,
              "settings": {k: getattr(cfg, k) for k in ("density", "ties_sign") if cfg.method == "ties"}
              | ({"gate": cfg.gate} if cfg.method == "gates" else {})
              | ({"rank": cfg.rank} if cfg.method in ("ties", "svd") else {})}
    if cfg.method == "gates":  # ``weights`` were the gates' starting values; these are the learned ones
        recipe["gates"] = {"weights": metrics["gates"]["weights"], "file": fusion.GATES_FILE}
    atomic.write_json(out_dir / "compose.json", recipe)

    # 5. held-out: each source alone and the composition
    metrics["eval"] = evaluate(cfg, backbone, {**{lab: n for lab, n in zip(cfg.sources, names)}, NAME: NAME})
    atomic.write_json(out_dir / "eval.json", metrics)
    return metrics


def train_gates(cfg: Config, backbone, names: list[str], sources: list[composable.Source], weights: list[float],
                out_dir: Path, model_cfg: ModelConfig) -> dict:
    """Train per-layer gates over the frozen sources with the SFT loss, then bake them into adapter NAME."""
    engine = Engine(cfg, out_dir)
    if engine.deepspeed:
        raise ValueError("compose.method gates: runs without DeepSpeed (the gates are a few hundred numbers)")
    try:
        gates = fusion.Fusion(backbone, names, cfg.gate, weights)
    except ValueError as e:
        raise ValueError(f"compose.method gates: {e}") from None
    fusion.attach(backbone, GATES, gates, trainable=True)
    tok = backbone.tokenizer
    data = cfg.read(cfg.data, cfg.split, "sft", tok)
    train = data.items
    batches = epoch_batches([len(x["input_ids"]) for x in train], cfg)
    n_steps = engine.total_steps(len(batches(0)))
    model = engine.prepare(backbone, n_steps)
    engine.log({"train_examples": len(train), "skipped": data.counts["skipped"], "dropped": data.counts["dropped"],
                "trainable_params": backbone.trainable_numel(), "steps": n_steps, "sources": len(names)},
               kind="setup")
    train_mode(model, disable_dropout=True)
    pads, share = PadCounter(), cfg.shares_prefixes(backbone)
    engine.register_state("pads", pads.state_dict, pads.load_state_dict)
    for step, micro in engine.steps(batches):
        loss = train_step(engine, backbone, model, train, micro, pads, share)  # SFT's step: only the gates train
        w = gates.gates.weights()
        engine.step({"loss": loss, "pad_share": pads.share}
                    | {f"gate_mean/{i}": float(w[:, i].mean()) for i in range(len(names))})
    backbone.eval()
    fusion.bake(backbone, gates, NAME)
    fusion.save_gates(gates, out_dir, sources, model_cfg.path)
    engine.finish()
    w = gates.gates.weights()
    return {"trainable_params": int(gates.gates.logits.numel()), "steps": n_steps, "train_examples": len(train),
            "gate": cfg.gate, "gates": {"weights": w.tolist(), "mean": w.mean(0).tolist()}}


def evaluate(cfg: Config, backbone, policies: dict[str, str]) -> dict:
    """Held-out loss and checker score of each labelled adapter (eval_data '' skips)."""
    if not cfg.eval_data:
        return {}
    tok = backbone.tokenizer
    held = cfg.read(cfg.eval_data, "test", "sft", tok)
    device = next(backbone.parameters()).device
    examples = held.examples[: cfg.eval_limit or None]
    report = {}
    for label, name in policies.items():
        with backbone.using(name):
            row = {"heldout_loss": heldout_loss(backbone, backbone, held.items, cfg.eval_batch_size, device,
                                                cfg.shares_prefixes(backbone)) if held.items else None}
        if cfg.eval_checker and examples:
            row |= checker_row(backbone, examples, cfg.generation, name)
        report[label] = row
    return report


def gate_table(metrics: dict, labels: list[str]) -> str:
    """The learned gates as a markdown table (layer x source)."""
    w = metrics["gates"]["weights"]
    lines = ["| layer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {i} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for i, row in enumerate(w)]
    return "\n".join(lines)
