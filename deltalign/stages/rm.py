"""RM: a Bradley-Terry reward model as adapter ``rm`` + scalar head ``rm`` on the frozen base.

The adapter starts from the SFT adapter (a trainable COPY loaded from the sft run folder, which is only read) or
fresh on the base; the head is new. A response's score is the head value at the last non-pad token of
prompt + response. Sections: 1. load; 2. data; 3. evaluation before training; 4. the training loop;
5. evaluation, reward statistics and save. Outputs in ``out_dir``: the adapter in PEFT format, ``head.safetensors``,
``reward_stats.json`` (mean/std of training-response scores, for PPO's normalisation), ``metrics.jsonl``,
``eval.json``. Load the result with :class:`deltalign.rewards.model.RewardModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.model.labelled import shared_of
from deltalign.model.modes import eval_mode, train_mode
from deltalign.data.batching import PadCounter, length_grouped_batches, pair_batch, to_device
from deltalign.data.sharing import with_prefix_tree
from deltalign.data.splits import RowRules
from deltalign.training.engine import Engine
from deltalign.stages.skeleton import epoch_batches, evaluate_and_save, measured_once
from deltalign.training.train_config import TrainConfig
from deltalign.losses import bradley_terry_loss
from deltalign.core.settings import setting
from deltalign.rewards.model import HEAD_FILE, STATS_FILE, last_token_values

NAME = "rm"
READS = {"data": "pref", "eval_data": "pref"}  # setting -> row shape (checked before the run)


@dataclass
class Config(RowRules, TrainConfig):
    lr: float = setting(1e-4, gt=0)
    """Peak learning rate (AdamW). 1e-4 is the usual LoRA reward-model rate (1e-5 for full fine-tuning), 1 epoch."""
    delta: AdapterConfig = setting(factory=AdapterConfig, formerly="adapter")
    """The delta this stage trains (``rm``), when ``init: fresh``; with ``init: sft`` it is a copy of the SFT
    adapter and keeps the SFT adapter's own settings (these are then unused)."""
    init: Literal["sft", "fresh"] = "sft"
    """``sft``: start from a trainable copy of the SFT adapter (the sft folder is only read); ``fresh``: a new one."""
    margin: bool = True
    """Subtract a ``margin`` column (when the data has one) inside the loss: -logsigmoid(r_c - r_r - m)."""
    magnitude_coef: float = setting(0.0, ge=0)
    """Penalty c * (r_c + r_r)^2 that keeps rewards centred near 0 (0: off; 0.01 is TRL's usual value)."""
    eval_batch_size: int = setting(16, ge=1)
    """Pairs per batch for held-out evaluation and the reward statistics."""
    stats_pairs: int = setting(200, ge=0)
    """Training pairs scored after training for the reward mean/std that PPO normalises with (0: all)."""
    disable_dropout: bool = True
    """Switch every dropout off while training (adapter dropout included), as TRL does for preference stages:
    the score trained on is then the same function as the score used later."""


def batch_of(items: list[dict], idx: list[int], pad_id: int, device, share: bool = False) -> dict:
    b = pair_batch([items[i] for i in idx], pad_id)
    return to_device(with_prefix_tree(b, share), device)


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores [B] from one forward over the 2B rows (head value at the last non-pad token)."""
    values = model(batch["input_ids"], batch["attention_mask"], head=NAME, **shared_of(batch))
    r = last_token_values(values, batch["attention_mask"])
    b = r.shape[0] // 2
    return r[:b], r[b:]


@torch.no_grad()
def score_all(model, items: list[dict], batch_size: int, pad_id: int, device,
              share: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores of every pair (in a length-sorted order; both sides stay aligned)."""
    rc, rr = [], []
    lengths = [len(x["prompt_ids"]) + max(len(x["chosen_ids"]), len(x["rejected_ids"])) for x in items]
    with eval_mode(model):
        for idx in length_grouped_batches(lengths, batch_size, 0, 0, shuffle=False):
            c, r = pair_scores(model, batch_of(items, idx, pad_id, device, share))
            rc.append(c.float().cpu())
            rr.append(r.float().cpu())
    return torch.cat(rc), torch.cat(rr)


def summary(rc: torch.Tensor, rr: torch.Tensor) -> dict:
    """Held-out accuracy, mean chosen/rejected reward, mean reward gap and plain Bradley-Terry loss."""
    loss, m = bradley_terry_loss(rc, rr)
    return {"accuracy": float(m["accuracy"]), "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean()),
            "margin": float(m["margin"]), "loss": float(loss.mean())}


def heldout(model, items, cfg: Config, pad_id: int, device, share: bool = False) -> dict | None:
    return summary(*score_all(model, items, cfg.eval_batch_size, pad_id, device, share)) if items else None


def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    out_dir = Path(out_dir)
    sft_dir = Path((upstream or {}).get("sft", "")) if cfg.init == "sft" else None
    if sft_dir is not None and not (sft_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"rm.init is 'sft' but no finished sft adapter was found in {str(sft_dir)!r}")
    engine = Engine(cfg, out_dir)

    # 1. load: the frozen base once; a trainable adapter (a copy of SFT's, or fresh) and a trainable head,
    #    both before engine.prepare (DeepSpeed builds its optimizer groups there)
    backbone = Backbone.load(model_cfg)
    torch.manual_seed(cfg.seed)
    if sft_dir is not None:
        backbone.load_adapter(NAME, sft_dir, trainable=True)
    else:
        backbone.add_adapter(NAME, cfg.delta, trainable=True)
    backbone.add_head(NAME, trainable=True)
    pad, share = backbone.tokenizer.pad_token_id, cfg.shares_prefixes(backbone)

    # 2. data: held-out rows follow the same max_length / truncation / bad_rows rules as training rows
    data = cfg.read(cfg.data, cfg.split, "pref", backbone.tokenizer)
    held_split = cfg.read(cfg.eval_data, "test", "pref", backbone.tokenizer)
    train, held = data.items, held_split.items
    if not cfg.margin:
        for x in train:
            x["margin"] = None
    batches = epoch_batches([len(x["prompt_ids"]) + max(len(x["chosen_ids"]), len(x["rejected_ids"]))
                             for x in train], cfg)
    n_steps = engine.total_steps(len(batches(0)))
    model = engine.prepare(backbone, n_steps)
    engine.log({"train_pairs": len(train), "skipped": data.counts["skipped"], "dropped": data.counts["dropped"],
                "heldout_pairs": len(held), "heldout_skipped": held_split.counts["skipped"], "init": cfg.init,
                "trainable_params": backbone.trainable_numel(), "steps": n_steps},
               kind="setup")

    # 3. before training: the initial adapter (SFT copy or base) with the fresh head; kept across a resume
    def measure(kind: str) -> dict | None:
        row = heldout(model, held, cfg, pad, engine.device, share)
        engine.log(row or {}, kind=kind)
        return row

    evals: dict = {"init": cfg.init, "data": {"train": data.counts, "eval": held_split.counts},
                   "before": measured_once(engine, out_dir / "eval_before.json", lambda: measure("eval_before"),
                                           bool(held))}

    # 4. loop: chosen and rejected in one forward; per-pair loss summed, normalised over the step's pairs
    train_mode(model, disable_dropout=cfg.disable_dropout)
    pads = PadCounter()
    engine.register_state("pads", pads.state_dict, pads.load_state_dict)
    for step, micro in engine.steps(batches):
        micro = [batch_of(train, idx, pad, engine.device, share) for idx in micro]
        total = engine.global_sum(sum(mb["input_ids"].shape[0] // 2 for mb in micro))
        sums = dict.fromkeys(("loss", "accuracy", "chosen_reward", "rejected_reward", "margin"), 0.0)
        n = 0
        for mb in micro:
            pads.add(mb["n_tokens"], mb["n_pad"])
            r_c, r_r = pair_scores(model, mb)
            loss, _ = bradley_terry_loss(r_c, r_r, mb.get("margin"), cfg.magnitude_coef)
            engine.backward(loss.sum(), total)
            d = (r_c - r_r).detach()
            for k, v in (("loss", loss.detach()), ("accuracy", (d > 0).float()), ("chosen_reward", r_c.detach()),
                         ("rejected_reward", r_r.detach()), ("margin", d)):
                sums[k] += float(v.sum())
            n += d.numel()
        engine.step({k: v / max(n, 1) for k, v in sums.items()} | {"pad_share": pads.share})

    # 5. evaluate, measure the reward scale on the training responses, save
    def evaluate() -> None:
        evals["after"] = measure("eval")
        rc, rr = score_all(model, train[: cfg.stats_pairs or None], cfg.eval_batch_size, pad, engine.device, share)
        scores = torch.cat([rc, rr])
        evals["reward_stats"] = {"mean": float(scores.mean()), "std": float(scores.std(correction=0)),
                                 "n": scores.numel()}
        engine.log(evals["reward_stats"], kind="reward_stats")

    return evaluate_and_save(engine, out_dir, evals, evaluate, deltas=[(NAME, out_dir, out_dir / HEAD_FILE)],
                             files={STATS_FILE: "reward_stats"})
