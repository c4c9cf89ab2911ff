"""KTO: alignment from unpaired thumbs-up / thumbs-down rows (Ethayarajh et al. 2024), a policy delta ``kto``
against the frozen SFT delta as reference, on one backbone.

Rows: ``{"prompt", "completion", "label": true|false}`` (conversational prompts too), or preference pairs, each
split into a desirable and an undesirable row (:mod:`deltalign.data.unpaired`). The policy starts as a trainable
copy of the SFT delta (``init: sft``), so at step 0 policy == reference, every implied reward is 0 and each row's
loss is its weight x 1/2.

Each step:
 1. the reference point ``z0``: for every row of the step, the completion of the nearest other row with a
    *different* prompt (:func:`deltalign.losses.kto_mismatched_rows`), scored no-grad by policy and reference;
    z0 = max(0, mean of policy - reference) over every such pair of every process (one number per step, no
    gradient: two processes give the value of one);
 2. per row: policy (with gradient) and reference (no-grad) log-probs of its own completion, and
    ``w_D (1 - sigmoid(beta (r - z0)))`` if desirable, ``w_U (1 - sigmoid(beta (z0 - r)))`` if not, with
    ``r = policy - reference``; the loss is the mean over the step's rows;
 3. log (loss, z0 as ``kl``, rewards of the desirable and undesirable rows), checkpoint.

Sections: 1. load; 2. data; 3. loop (steps 1-3); 4. evaluate (checker, KL, reward model) and save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from deltalign.model.backbone import AdapterConfig, ModelConfig
from deltalign.data.batching import pad_batch, to_device
from deltalign.data.sharing import with_prefix_tree
from deltalign.data.splits import RowRules
from deltalign.training.engine import Engine
from deltalign.stages.skeleton import (REFERENCE, epoch_batches, evaluate_and_save, policy_and_reference,
                                       report_policies)
from deltalign.sampling.generation import GenerationConfig
from deltalign.model.labelled import response_logprobs
from deltalign.losses import kto_kl_sum, kto_loss, kto_mismatched_rows, kto_reference_point
from deltalign.model.modes import eval_mode, train_mode
from deltalign.core.settings import setting
from deltalign.training.train_config import TrainConfig

NAME = "kto"
READS = {"data": "kto", "eval_data": "prompt"}  # setting -> row shape (checked before the run)


@dataclass
class Config(RowRules, TrainConfig):
    lr: float = setting(5e-5, gt=0)
    """Peak learning rate of the policy delta (DPO's default: the same kind of update)."""
    batch_size: int = setting(8, ge=1)
    """Rows per micro-batch per process; at least 2, with two different prompts among them: each row's
    reference-point pair is another row's completion."""
    beta: float = setting(0.1, gt=0)
    """Scale of the implied reward (KTO's and TRL's 0.1)."""
    desirable_weight: float = setting(1.0, gt=0)
    """w_D, the weight of a desirable row's loss. With unbalanced data, KTO's paper keeps
    w_D n_D / (w_U n_U) in [1, 4/3]."""
    undesirable_weight: float = setting(1.0, gt=0)
    """w_U, the weight of an undesirable row's loss."""
    reference: Literal["sft", "base"] = "sft"
    """``sft``: the SFT delta, frozen (the rule once SFT ran); ``base``: the backbone with deltas off, only in a
    run without an SFT stage."""
    init: Literal["sft", "fresh"] = "sft"
    """Policy start: ``sft`` (a trainable copy of the SFT delta) or ``fresh`` (a new delta: ``adapter``)."""
    delta: AdapterConfig = setting(factory=AdapterConfig, formerly="adapter")
    """The delta this stage trains when ``init: fresh`` (with ``init: sft`` it copies the SFT delta's settings)."""
    disable_dropout: bool = True
    """Switch every dropout off while training, as TRL does: policy and reference are then one function at step
    0 and the implied rewards start at exactly 0."""
    eval_checker: bool = True
    """After training: generate on held-out prompts (greedy) and report checker, KL to SFT and reward-model
    scores."""
    eval_limit: int = setting(0, ge=0)
    """Use at most this many held-out prompts (0: all)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for the held-out report."""

    def __post_init__(self):
        if self.batch_size < 2:
            raise ValueError(f"kto.batch_size must be >= 2 (got {self.batch_size}): KTO's reference point pairs "
                             "each row with another row's completion")


def labelled_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, max_length: int) -> dict:
    """Right-padded ``prompt + completion`` rows, labels on the completion only (cut to ``max_length``)."""
    seqs, labels = [], []
    for p, c in zip(prompts, completions):
        c = c[: max(1, max_length - len(p))]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    return pad_batch(seqs, pad_id, labels=labels)


def mismatched(items: list[dict], idx: list[int]) -> tuple[list[int], float]:
    """The rows of ``idx`` whose completions pair with them for the reference point, and the weight of their
    pairs: 0 when the micro-batch holds a single prompt (it then adds nothing to the step's estimate; its
    forwards still run, so every process runs the same ones)."""
    keys = [tuple(items[i]["prompt_ids"]) for i in idx]
    if len(set(keys)) < 2:
        return list(idx), 0.0
    return [idx[j] for j in kto_mismatched_rows(keys)], 1.0


def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    out_dir, upstream = Path(out_dir), upstream or {}
    engine = Engine(cfg, out_dir)

    # 1. load: one backbone; the reference frozen, the policy a separate trainable copy
    backbone = policy_and_reference(model_cfg, NAME, cfg, upstream)
    tok, share_prefixes = backbone.tokenizer, cfg.shares_prefixes(backbone)
    ref_name = REFERENCE if cfg.reference == "sft" else None

    # 2. data: unpaired rows (pairs split in two); held-out prompts follow the same rules
    data, held = cfg.read(cfg.data, cfg.split, "kto", tok), cfg.read(cfg.eval_data, "test", "prompt", tok)
    train, eval_ex = data.items, held.examples
    batches = epoch_batches([len(x["input_ids"]) for x in train], cfg)
    model = engine.prepare(backbone, engine.total_steps(len(batches(0))))
    engine.log({"train_rows": len(train), "desirable": sum(x["desirable"] for x in train),
                "skipped": data.counts["skipped"], "dropped": data.counts["dropped"], "steps": engine.n_steps,
                "reference": cfg.reference, "init": cfg.init}, kind="setup")

    def logprobs(idx: list[int], completions_of: list[int], adapter: str | None) -> torch.Tensor:
        batch = labelled_batch([train[i]["prompt_ids"] for i in idx],
                               [train[j]["completion_ids"] for j in completions_of], tok.pad_token_id, cfg.max_length)
        with backbone.using(adapter):
            return response_logprobs(backbone, model, to_device(with_prefix_tree(batch, share_prefixes), engine.device))

    # 3. loop
    train_mode(model, disable_dropout=cfg.disable_dropout)
    for step, micro in engine.steps(batches):
        # 3.1 the reference point over the whole step, every process: mismatched pairs, no gradient
        kl = torch.zeros(2, dtype=torch.float64, device=engine.device)
        with torch.no_grad():
            for idx in micro:
                pairs, weight = mismatched(train, idx)
                s, n = kto_kl_sum(logprobs(idx, pairs, NAME), logprobs(idx, pairs, ref_name))
                kl += weight * torch.stack([s, n]).to(kl)
        kl_sum, kl_n = engine.all_sum(kl).tolist()
        z0 = kto_reference_point(torch.tensor(kl_sum), torch.tensor(max(kl_n, 1.0)))

        # 3.2 the rows' own completions: loss per row, a mean over the step's rows
        total = engine.global_sum(sum(len(idx) for idx in micro))
        sums = {"loss": 0.0, "reward_desirable": 0.0, "reward_undesirable": 0.0}
        n_good = 0
        for idx in micro:
            with torch.no_grad(), eval_mode(model):
                ref = logprobs(idx, idx, ref_name)
            policy = logprobs(idx, idx, NAME)
            good = torch.tensor([train[i]["desirable"] for i in idx], device=policy.device)
            loss, reward = kto_loss(policy, ref.to(policy), good, z0.to(policy), cfg.beta, cfg.desirable_weight,
                                    cfg.undesirable_weight)
            engine.backward(loss.sum(), total)
            sums["loss"] += loss.sum().item()
            sums["reward_desirable"] += reward[good].sum().item()
            sums["reward_undesirable"] += reward[~good].sum().item()
            n_good += int(good.sum())
        local = total / engine.world
        n_bad = sum(len(idx) for idx in micro) - n_good
        engine.step({"loss": sums["loss"] / local, "kl": float(z0),
                     "reward_desirable": sums["reward_desirable"] / max(n_good, 1),
                     "reward_undesirable": sums["reward_undesirable"] / max(n_bad, 1)})

    # 4. evaluate the policy against its reference on held-out prompts, then save
    report: dict = {"data": {"train": data.counts, "eval": held.counts}}
    examples = eval_ex[: cfg.eval_limit or None]
    evaluate = report_policies(engine, report, backbone, examples, cfg.generation, {"reference": ref_name, NAME: NAME},
                               ref_name, rm_dir=upstream.get("rm"), checker=cfg.eval_checker)
    return evaluate_and_save(engine, out_dir, report, evaluate, bool(examples) and cfg.eval_checker,
                             deltas=[(NAME, out_dir, None)])
