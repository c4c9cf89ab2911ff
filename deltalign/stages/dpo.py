"""DPO: preference optimisation of a policy adapter ``dpo`` against a frozen reference, on one backbone.

Reference: once an SFT adapter exists it is the reference, loaded frozen (``reference: sft``); the policy starts
as a separate trainable copy of the same weights, so at step 0 policy == reference and the sigmoid loss is ln 2.
Only with ``reference: base`` (no SFT run) is the reference the bare backbone with adapters off. ORPO
(``loss: orpo``) has no reference at all (``reference: none``): nothing is loaded or cached for it, and with
``init: fresh`` the stage needs no SFT stage either (ORPO's point: one stage from the base).

Reference log-probabilities are computed once per example before training and cached in the run directory under
a key that hashes the reference weights and the tokenised data, so a resumed or repeated run reuses them.

Sections: 1. load; 2. data; 3. reference log-probs; 4. loop; 5. evaluate (checker, KL, reward model) and save.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch

from deltalign.core import atomic, verify
from deltalign.model.backbone import AdapterConfig, ModelConfig
from deltalign.model.labelled import response_logprobs
from deltalign.model.modes import eval_mode, train_mode
from deltalign.data.batching import length_grouped_batches, pair_batch, to_device
from deltalign.data.sharing import with_prefix_tree
from deltalign.data.splits import RowRules
from deltalign.training.engine import Engine
from deltalign.stages.skeleton import (REFERENCE, epoch_batches, evaluate_and_save, policy_and_reference,
                                       report_policies)
from deltalign.training.train_config import TrainConfig
from deltalign.sampling.generation import GenerationConfig
from deltalign.losses import dpo_sigmoid_loss, ipo_loss, orpo_odds_loss, simpo_loss
from deltalign.core.settings import setting

NAME = "dpo"
READS = {"data": "pref", "eval_data": "pref"}  # setting -> row shape (checked before the run)


@dataclass
class Config(RowRules, TrainConfig):
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = "sigmoid"
    """``sigmoid`` (DPO, Rafailov et al. 2023), ``ipo`` (Azar et al. 2023), ``simpo`` (Meng et al. 2024,
    reference-free) or ``orpo`` (Hong et al. 2024: the chosen NLL plus ``orpo_lambda`` x the odds-ratio term on
    length-averaged log-probs; no reference model at all)."""
    orpo_lambda: float = setting(0.1, gt=0)
    """ORPO's λ, the weight of its odds-ratio term (the paper's and TRL's default 0.1; TRL calls it ``beta``).
    ``loss: orpo`` only."""
    beta: float = setting(0.1, gt=0)
    """Strength of the implicit KL constraint for ``sigmoid`` and ``ipo`` (0.1 everywhere: TRL, OpenRLHF,
    LLaMA-Factory). SimPO has its own ``simpo_beta``."""
    label_smoothing: float = setting(0.0, ge=0, lt=0.5)
    """Conservative DPO: assumed share of flipped labels (``sigmoid`` only)."""
    ipo_normalize: bool = True
    """IPO on per-token log-ratios (each response's log-ratio divided by its length: the IPO paper's form and
    TRL's); false: on summed log-ratios."""
    simpo_beta: float = setting(2.0, gt=0)
    """SimPO's reward scale (the paper's 2.0; applies to ``loss: simpo`` only)."""
    simpo_gamma: float = setting(0.5, ge=0)
    """SimPO target reward margin (``loss: simpo`` only)."""
    nll_weight: float | None = setting(None, ge=0)
    """Add this times the chosen responses' token NLL, averaged over every chosen token of the step (RPO, Pang et
    al. 2024; TRL's ``rpo_alpha``): keeps the chosen likelihood, end-of-turn token included, from collapsing while
    the margin grows. Unset: 0, and 1 with ``loss: orpo`` (ORPO's own SFT term; ours on the completion tokens
    only, where TRL's ORPO counts the prompt's too)."""
    reference: Literal["sft", "base", "none"] | None = None
    """``sft``: the SFT adapter, frozen (the rule once SFT ran; the default); ``base``: the backbone with adapters
    off, allowed only in a run without an SFT stage; ``none``: no reference (``loss: orpo``, its default and only
    choice, or ``simpo``)."""
    init: Literal["sft", "fresh"] = "sft"
    """Policy start: ``sft`` (a trainable copy of the SFT adapter) or ``fresh`` (a new adapter)."""
    delta: AdapterConfig = setting(factory=AdapterConfig, formerly="adapter")
    """The delta this stage trains (``dpo``), when ``init: fresh``; with ``init: sft`` it is a copy of the SFT
    adapter and keeps the SFT adapter's own settings (these are then unused)."""
    disable_dropout: bool = True
    """Switch every dropout off while training (adapter dropout included), as TRL does: the policy's forward is
    then the same function as the reference's, so the first loss is exactly ln 2."""
    cache_reference: bool = True
    """Compute reference log-probs once and cache them; false: recompute them every step."""
    eval_checker: bool = True
    """After training: generate on held-out prompts and score with the checker (policy vs reference)."""
    eval_limit: int = setting(0, ge=0)
    """Use at most this many held-out prompts for generation (0: all)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for held-out generations."""

    def __post_init__(self):
        if self.loss == "orpo" and self.reference not in (None, "none"):
            raise ValueError(f"dpo.loss=orpo uses no reference: leave dpo.reference unset (or none), got "
                             f"{self.reference!r}")
        if self.reference == "none" and self.loss not in ("orpo", "simpo"):
            raise ValueError(f"dpo.reference=none: dpo.loss={self.loss} compares with a reference (only orpo and "
                             "simpo need none)")
        if self.reference is None:
            self.reference = "none" if self.loss == "orpo" else "sft"
        if self.nll_weight is None:
            self.nll_weight = 1.0 if self.loss == "orpo" else 0.0


def pair_loss(cfg: Config, pol: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
    """Per-pair loss and implicit rewards. ``pol``/``ref``/``lengths`` hold chosen rows then rejected rows."""
    n = pol.shape[0] // 2
    if cfg.loss == "sigmoid":
        return dpo_sigmoid_loss(pol[:n], pol[n:], ref[:n], ref[n:], cfg.beta, cfg.label_smoothing)
    if cfg.loss == "ipo":
        per_token = (lengths[:n], lengths[n:]) if cfg.ipo_normalize else (None, None)
        return ipo_loss(pol[:n], pol[n:], ref[:n], ref[n:], cfg.beta, *per_token)
    if cfg.loss == "orpo":
        mean = pol / lengths.to(pol.dtype)
        loss, _, r_c, r_r = orpo_odds_loss(mean[:n], mean[n:], cfg.orpo_lambda)
        return loss, r_c, r_r
    return simpo_loss(pol[:n], pol[n:], lengths[:n], lengths[n:], cfg.simpo_beta, cfg.simpo_gamma)


def reference_of(backbone) -> str | None:
    return REFERENCE if REFERENCE in backbone.adapters else None


def needs_reference(cfg: Config) -> bool:
    """Whether the loss reads reference log-probs (SimPO and ORPO do not)."""
    return cfg.loss not in ("simpo", "orpo")


@torch.no_grad()
def pair_logprobs(backbone, model, pairs: list[dict], batch_size: int, device, adapter: str | None,
                  share_prefixes: bool = False) -> torch.Tensor:
    """Summed response log-probs under ``adapter`` (None: adapters off) for every pair: [N, 2] (chosen, rejected);
    ``share_prefixes``: batches packed with shared prefixes."""
    out = torch.zeros(len(pairs), 2)
    with eval_mode(model), backbone.using(adapter):
        for idx in length_grouped_batches([len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs],
                                          batch_size, 0, 0, shuffle=False):
            batch = with_prefix_tree(pair_batch([pairs[i] for i in idx], backbone.tokenizer.pad_token_id), share_prefixes)
            lp = response_logprobs(backbone, model, to_device(batch, device))
            out[idx] = lp.view(2, -1).T.cpu()
    return out


def cache_key(backbone, pairs: list[dict]) -> str:
    """Hash of the reference weights and the tokenised pairs."""
    h = hashlib.sha256()
    ref = backbone.adapter_parameters(REFERENCE) if REFERENCE in backbone.adapters else {}
    for name in sorted(ref):
        h.update(name.encode())
        h.update(ref[name].detach().cpu().numpy().tobytes())
    h.update(json.dumps([[p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]] for p in pairs]).encode())
    return h.hexdigest()[:16]


class ReferenceCache:
    """Reference log-probs [N, 2] per training pair, filled on first use and saved atomically after each step.

    Disabled (``cache_reference: false``), every request is recomputed and nothing is stored.
    """

    def __init__(self, path: Path, n: int, enabled: bool):
        self.path, self.enabled, self.dirty = path, enabled, False
        saved = verify.resume_tensors(path, {"logprobs": (n, 2)}) if enabled else None  # unreadable: set aside
        self.values = saved["logprobs"] if saved else torch.full((n, 2), float("nan"))

    def get(self, idx: list[int], compute) -> torch.Tensor:
        todo = [i for i in idx if not self.enabled or torch.isnan(self.values[i, 0])]
        if todo:
            self.values[todo] = compute(todo).to(self.values)
            self.dirty = True
        return self.values[idx]

    def save(self) -> None:
        if self.enabled and self.dirty:
            atomic.write_tensors({"logprobs": self.values}, self.path)
            self.dirty = False


def heldout_pairs(backbone, model, pairs: list[dict], cfg: Config, device) -> dict:
    """Implicit-reward accuracy and margin of the trained policy on held-out (tokenised) preference pairs."""
    share_prefixes = cfg.shares_prefixes(backbone)
    pol = pair_logprobs(backbone, model, pairs, cfg.batch_size * 2, device, NAME, share_prefixes)
    if cfg.reference == "none":  # ORPO / SimPO: the length-averaged log-probs' margin (their implicit reward)
        lengths = torch.tensor([[len(p["chosen_ids"]), len(p["rejected_ids"])] for p in pairs], dtype=pol.dtype)
        mean = pol / lengths
        margin = mean[:, 0] - mean[:, 1]
        return {"reward_accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
                "n": len(pairs)}
    ref = pair_logprobs(backbone, model, pairs, cfg.batch_size * 2, device, reference_of(backbone), share_prefixes)
    margin = cfg.beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    return {"reward_accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()), "n": len(pairs)}


def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    out_dir, upstream = Path(out_dir), upstream or {}
    engine = Engine(cfg, out_dir)

    # 1. load: one backbone; the reference frozen, the policy a separate trainable copy
    backbone = policy_and_reference(model_cfg, NAME, cfg, upstream)
    tok, share_prefixes = backbone.tokenizer, cfg.shares_prefixes(backbone)

    # 2. data: held-out rows follow the same max_length / truncation / bad_rows rules as training rows
    data, held = cfg.read(cfg.data, cfg.split, "pref", tok), cfg.read(cfg.eval_data, "test", "pref", tok)
    train, eval_ex = data.items, held.examples
    batches = epoch_batches([len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                             for p in train], cfg)
    model = engine.prepare(backbone, engine.total_steps(len(batches(0))))
    engine.log({"train_pairs": len(train), "skipped": data.counts["skipped"], "dropped": data.counts["dropped"],
                "heldout_skipped": held.counts["skipped"], "steps": engine.n_steps,
                "reference": cfg.reference, "init": cfg.init}, kind="setup")

    # 3. reference log-probs: computed once per example on first use, kept in the run dir by content key
    cache = ReferenceCache(out_dir / f"ref_logprobs-{cache_key(backbone, train)}.safetensors", len(train),
                           enabled=(cfg.cache_reference and engine.is_main and engine.zero_stage != 3
                                    and needs_reference(cfg)))

    def reference(idx: list[int]) -> torch.Tensor:
        if not needs_reference(cfg):
            return torch.zeros(len(idx), 2)
        return cache.get(idx, lambda todo: pair_logprobs(backbone, model, [train[i] for i in todo], len(todo),
                                                          engine.device, reference_of(backbone), share_prefixes))

    # 4. loop: the pair loss is a mean over the step's pairs; RPO's NLL a mean over the step's chosen tokens
    train_mode(model, disable_dropout=cfg.disable_dropout)
    for step, micro in engine.steps(batches):
        total = engine.global_sum(sum(len(idx) for idx in micro))
        chosen_tokens = engine.global_sum(sum(len(train[i]["chosen_ids"]) for idx in micro for i in idx))
        sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "accuracy": 0.0}
        nll_sum = 0.0
        for idx in micro:
            mb = to_device(with_prefix_tree(pair_batch([train[i] for i in idx], tok.pad_token_id), share_prefixes), engine.device)
            ref = reference(idx)
            policy = response_logprobs(backbone, model, mb)
            ref = torch.cat([ref[:, 0], ref[:, 1]]).to(policy)
            loss, r_c, r_r = pair_loss(cfg, policy, ref, mb["response_lengths"].to(policy))
            nll = -policy[: len(idx)].sum()  # summed over this micro-batch's chosen tokens
            # backward(x, total) divides by the step's pairs: the NLL is rescaled to a mean over its tokens
            engine.backward(loss.sum() + cfg.nll_weight * nll * (total / chosen_tokens), total)
            nll_sum += nll.item()
            sums["loss"] += loss.sum().item()
            sums["chosen_reward"] += r_c.sum().item()
            sums["rejected_reward"] += r_r.sum().item()
            sums["accuracy"] += (r_c > r_r).float().sum().item()
        local = total / engine.world
        metrics = {k: v / local for k, v in sums.items()} | {"nll_chosen": nll_sum / (chosen_tokens / engine.world)}
        if cfg.loss == "orpo":
            metrics["odds_ratio_loss"] = metrics["loss"]
        metrics["loss"] += cfg.nll_weight * metrics["nll_chosen"]
        cache.save()
        engine.step(metrics | {"margin": metrics["chosen_reward"] - metrics["rejected_reward"]})

    # 5. evaluate the policy against its reference on held-out prompts, then save
    report: dict = {"data": {"train": data.counts, "eval": held.counts}}
    examples, reference = eval_ex[: cfg.eval_limit or None], REFERENCE if cfg.reference == "sft" else None
    policies = {NAME: NAME} if cfg.reference == "none" else {"reference": reference, NAME: NAME}
    evaluate = report_policies(engine, report, backbone, examples, cfg.generation, policies, reference,
                               more=lambda: {"heldout_pairs": heldout_pairs(backbone, model, held.items, cfg,
                                                                            engine.device)} if held.items else {},
                               rm_dir=upstream.get("rm"), checker=cfg.eval_checker)
    return evaluate_and_save(engine, out_dir, report, evaluate, bool(examples) or bool(held.items),
                             deltas=[(NAME, out_dir, None)])
