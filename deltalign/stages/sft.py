"""SFT: supervised fine-tuning of a fresh LoRA/QLoRA (or DoRA/IA3) adapter named ``sft`` on the frozen base.

Sections: 1. load the backbone and attach the adapter; 2. data; 3. baseline evaluation; 4. the training loop;
5. final evaluation and save. Outputs in ``out_dir``: the adapter in PEFT format, ``metrics.jsonl``, ``eval.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.model.labelled import labelled_hidden
from deltalign.model.modes import eval_mode, train_mode
from deltalign.data.batching import PadCounter, length_grouped_batches, pad_batch, to_device
from deltalign.data.sharing import with_prefix_tree
from deltalign.data.splits import RowRules
from deltalign.training.engine import Engine
from deltalign.stages.skeleton import epoch_batches, evaluate_and_save, measured_once
from deltalign.training.train_config import TrainConfig
from deltalign.sampling.generation import GenerationConfig, checker_row
from deltalign.core.settings import setting

NAME = "sft"
READS = {"data": "sft", "eval_data": "sft"}  # setting -> row shape (checked before the run)


@dataclass
class Config(RowRules, TrainConfig):
    data: str = "embedded:sft_train"  # (settings declared in data.splits.Sources; SFT's own defaults)
    eval_data: str = "embedded:sft_eval"
    loss_on: Literal["last", "all"] = "last"
    """Which turns of a conversation carry the loss: ``last`` (the final assistant answer) or ``all`` (every
    assistant turn; e.g. HH-style dialogues)."""
    delta: AdapterConfig = setting(factory=AdapterConfig, formerly="adapter")
    """The delta this stage trains (a fresh ``sft`` adapter)."""
    disable_dropout: bool = False
    """Switch every dropout off while training (adapter dropout included). Off for SFT, where dropout is a
    regulariser; the preference and RL stages default to on, where a forward must match its reference's."""
    eval_batch_size: int = setting(16, ge=1)
    """Rows per batch for held-out loss."""
    eval_checker: bool = True
    """Generate on held-out prompts and score them with the embedded checker (base and after training)."""
    eval_limit: int = setting(0, ge=0)
    """Use at most this many held-out examples for generation (0: all)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for held-out generations."""


def batch_of(items: list[dict], idx: list[int], pad_id: int, device, share: bool = False) -> dict:
    b = pad_batch([items[i]["input_ids"] for i in idx], pad_id, labels=[items[i]["labels"] for i in idx])
    return to_device(with_prefix_tree(b, share), device)


def token_loss(backbone, model, batch: dict) -> tuple[torch.Tensor, int]:
    """``(loss_sum, n_tokens)``: the summed cross-entropy of the labelled tokens (``sft_loss_sum`` of their logits)
    through :meth:`Backbone.lm_logprobs`: the logits of the labelled tokens at once (a chunked head would
    recompute them in its backward), under ZeRO-3 from each rank's rows."""
    hidden, targets, _ = labelled_hidden(model, batch)
    return -backbone.lm_logprobs(hidden, targets, chunked=False).sum(), targets.numel()


def train_step(engine, backbone, model, items: list[dict], micro: list[list[int]], pads: PadCounter,
               share: bool = False) -> float:
    """One optimizer step's forward/backward passes of token cross-entropy over the completions (normalised over
    the step's tokens on every process); returns the step's mean token loss as this process saw it. ``share``:
    batches run packed with shared prefixes (:mod:`deltalign.data.sharing`)."""
    batches = [batch_of(items, idx, backbone.tokenizer.pad_token_id, engine.device, share) for idx in micro]
    total = engine.global_sum(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in batches))
    loss_total = 0.0
    for mb in batches:
        pads.add(mb["n_tokens"], mb["n_pad"])
        loss_sum = token_loss(backbone, model, mb)[0]
        engine.backward(loss_sum, total)
        loss_total += loss_sum.item()
    return loss_total / max(total / engine.world, 1)


@torch.no_grad()
def heldout_loss(backbone, model, items: list[dict], batch_size: int, device, share: bool = False) -> float:
    """Mean token cross-entropy on held-out completions."""
    total, count = 0.0, 0
    pad = backbone.tokenizer.pad_token_id
    with eval_mode(model):
        for idx in length_grouped_batches([len(x["input_ids"]) for x in items], batch_size, 0, 0, shuffle=False):
            loss_sum, n = token_loss(backbone, model, batch_of(items, idx, pad, device, share))
            total, count = total + float(loss_sum), count + int(n)
    return total / max(count, 1)


def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    out_dir = Path(out_dir)
    engine = Engine(cfg, out_dir)

    # 1. load: the frozen base once, one fresh trainable adapter
    backbone = Backbone.load(model_cfg)
    torch.manual_seed(cfg.seed)
    backbone.add_adapter(NAME, cfg.delta, trainable=True)
    tok = backbone.tokenizer
    share = cfg.shares_prefixes(backbone)

    # 2. data: held-out rows follow the same max_length / truncation / bad_rows rules as training rows
    kind = "sft" if cfg.loss_on == "last" else "sft_all"
    data, held = cfg.read(cfg.data, cfg.split, kind, tok), cfg.read(cfg.eval_data, "test", kind, tok)
    train, heldout, eval_ex = data.items, held.items, held.examples
    batches = epoch_batches([len(x["input_ids"]) for x in train], cfg)
    n_steps = engine.total_steps(len(batches(0)))
    model = engine.prepare(backbone, n_steps)
    engine.log({"train_examples": len(train), "skipped": data.counts["skipped"], "dropped": data.counts["dropped"],
                "heldout_examples": len(heldout), "heldout_skipped": held.counts["skipped"],
                "trainable_params": backbone.trainable_numel(), "steps": n_steps},
               kind="setup")

    # 3. baseline: the base model (adapters off) on held-out data, measured once (kept across a resume)
    gen_examples = eval_ex[: cfg.eval_limit or None]
    forwards = bool(heldout) or (cfg.eval_checker and bool(gen_examples))

    def measure(adapter: str | None, kind: str, **extra) -> dict:
        """Held-out loss and checker row of ``adapter`` (None: the base), logged as ``kind``."""
        with backbone.using(adapter):
            row = {"heldout_loss": heldout_loss(backbone, model, heldout, cfg.eval_batch_size, engine.device,
                                                share) if heldout else None} | extra
            if cfg.eval_checker and gen_examples:
                row |= checker_row(backbone, gen_examples, cfg.generation, adapter)
        engine.log(row, kind=kind)
        return row

    evals: dict = {"data": {"train": data.counts, "eval": held.counts},
                   "base": measured_once(engine, out_dir / "eval_base.json", lambda: measure(None, "eval_base"),
                                         forwards)}

    # 4. loop
    train_mode(model, disable_dropout=cfg.disable_dropout)
    pads = PadCounter()
    engine.register_state("pads", pads.state_dict, pads.load_state_dict)
    for step, micro in engine.steps(batches):
        engine.step({"loss": train_step(engine, backbone, model, train, micro, pads, share), "pad_share": pads.share})

    # 5. evaluate and save
    def evaluate() -> None:
        evals[NAME] = measure(NAME, "eval", pad_share=pads.share)

    return evaluate_and_save(engine, out_dir, evals, evaluate, forwards, deltas=[(NAME, out_dir, None)])
