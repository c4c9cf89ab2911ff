"""PPO: four roles on one frozen backbone — policy, reference, reward model and critic are deltas, not models.

* ``ppo``    the policy: a trainable copy of the SFT adapter (the sft folder is only read);
* ``sft``    the reference: the SFT adapter itself, frozen;
* ``rm``     the reward model: the rm adapter + head, frozen (scores normalised with the rm stage's statistics);
* ``critic`` the value model: an adapter + scalar head, by default a trainable copy of the reward model's, with
             the head rescaled so its initial values are the normalised reward.

Each step (one rollout batch of prompts), as in "The N Implementation Details of RLHF with PPO" (Huang et al.):
 1. rollout: generate with the policy (KV cache, sampling); responses end at the first stop token;
 2. score: reward model + rules (:class:`deltalign.rewards.composite.CompositeReward`), minus a penalty for
    responses that never end;
 3. reference log-probs (sft) without gradients; old log-probs (policy) without gradients for every row except
    the first minibatch's, whose come from the first update's own policy forward, run before the advantages
    are computed (nothing has been updated yet, dropout is off: the same function, so the ratio is exactly 1
    there; with ``disable_dropout: false`` every row gets separate forwards); old values (critic) likewise from
    the critic's first training forward when full activation checkpointing keeps both graphs small, otherwise
    without gradients for every row (a second graph kept whole would cost as much memory as the first);
 4. per-token rewards: -kl_coef * (logp - ref_logp) on every response token, the score added on the last one;
    GAE advantages and returns; advantages whitened;
 5. ``passes`` passes over shuffled minibatches: clipped policy loss, clipped value loss, entropy bonus;
    one optimizer update per minibatch;
 6. update the KL coefficient (adaptive controller), log, checkpoint.

Dropout is off throughout (as TRL), so the first minibatch's probability ratio is exactly 1; the model stays in
training mode otherwise, so gradient checkpointing works. With several processes, each generates for its own
prompts; advantages are whitened, losses averaged and the KL controller updated over the global batch.
Sections: 1. load; 2. data; 3. loop (steps 1-6); 4. evaluate and save.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.model.modes import train_mode
from deltalign.data.batching import length_grouped_batches
from deltalign.training.engine import Engine
from deltalign.stages.skeleton import evaluate_and_save, report_policies
from deltalign.core.memory import release_free_memory
from deltalign.training.train_config import TrainConfig
from deltalign.sampling.generation import GenerationConfig, decode, generate, stop_token_ids
from deltalign.losses import (AdaptiveKLController, FixedKLController, gae_advantages, kl_penalty_rewards,
                              masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss)
from deltalign.core.settings import setting
from deltalign.rewards.composite import CompositeReward
from deltalign.rewards.model import HEAD_FILE, RewardModel
from deltalign.sampling.rollout import (PromptData, at_positions, forward, load_prompts, policy_logprobs, rollout_batch,
                               rollout_seed, rows_of)

NAME = "ppo"
READS = {"data": "prompt", "eval_data": "prompt"}  # setting -> row shape (checked before the run)
REFERENCE = "sft"
REWARD = "rm"
CRITIC = "critic"


def _rollout_default() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=48, temperature=1.0, top_p=1.0, batch_size=16)


@dataclass
class Config(PromptData, TrainConfig):
    lr: float = setting(3e-5, gt=0)
    """Peak learning rate for policy and critic deltas (LoRA PPO: 1e-5 to 5e-5; TRL's example uses 3e-6 for
    full fine-tuning, LoRA needs larger steps)."""
    warmup_ratio: float = setting(0.0, ge=0, le=1)
    """Share of the updates with linear warmup (PPO usually runs without)."""
    batch_size: int = setting(16, ge=1)
    """Prompts per rollout per process (one PPO step)."""
    rollout: GenerationConfig = field(default_factory=_rollout_default)
    """Sampling for rollouts: temperature 1 and top-p 1 sample the policy itself, so the PPO ratio is exact
    (log-probs are computed at the same temperature; top-p < 1 makes them approximate)."""
    missing_eos_penalty: float = setting(1.0, ge=0)
    """Subtracted from the score of a response that hits max_new_tokens without a stop token (TRL: 1.0)."""
    rm_weight: float = setting(1.0, ge=0)
    """Weight of the normalised reward-model score (0: no reward model; then ``critic_init`` must be fresh)."""
    rules: dict[str, float] = field(default_factory=dict)
    """Rule-based rewards and their weights: ``checker`` (the embedded task's checker) or ``module:function``
    (``f(prompts, responses) -> list[float]``)."""
    kl_coef: float = setting(0.05, ge=0)
    """Per-token KL penalty coefficient against the SFT reference (TRL 0.05; OpenRLHF's init_kl_coef 0.01)."""
    kl_target: float = setting(0.0, ge=0)
    """> 0: adapt kl_coef towards this KL per response (Ziegler et al. 2019: 6 with horizon 10000); 0: fixed."""
    kl_horizon: float = setting(10000.0, gt=0)
    """Adaptive KL controller horizon (in responses)."""
    gamma: float = setting(1.0, ge=0, le=1)
    """Discount (1.0: TRL, OpenRLHF; the reward comes once, at the end)."""
    lam: float = setting(0.95, ge=0, le=1)
    """GAE lambda (0.95: TRL, OpenRLHF, cleanrl)."""
    clip: float = setting(0.2, gt=0)
    """Policy ratio clip epsilon (0.2: Schulman et al. 2017 and every RLHF PPO since)."""
    value_clip: float = setting(0.2, gt=0)
    """Value clip around the old values (0.2: TRL's cliprange_value, OpenRLHF's value_clip)."""
    vf_coef: float = setting(0.1, ge=0)
    """Weight of the value loss (0.1: TRL)."""
    ent_coef: float = setting(0.0, ge=0)
    """Entropy bonus weight (0: TRL and OpenRLHF default; entropy is always logged)."""
    passes: int = setting(4, ge=1, formerly="ppo_epochs")
    """Passes over each rollout batch (4: TRL's num_ppo_epochs)."""
    mini_batch_size: int = setting(8, ge=2)
    """Responses per optimizer update within a rollout batch."""
    whiten_advantages: bool = True
    """Normalise advantages over the rollout batch (TRL, OpenRLHF)."""
    critic_init: Literal["rm", "fresh"] = "rm"
    """``rm``: the critic starts as a copy of the reward adapter + head; ``fresh``: a new adapter and head."""
    critic_delta: AdapterConfig = setting(factory=AdapterConfig, formerly="critic_adapter")
    """The critic's delta (``critic``), when ``critic_init: fresh``; with ``critic_init: rm`` it is a copy of the
    rm adapter and keeps that adapter's settings (these are then unused). The policy (``ppo``) is always a copy
    of the SFT adapter."""
    disable_dropout: bool = True
    """Switch every dropout off (adapter dropout included), as TRL does: old log-probs, reference log-probs,
    values and the trained forward are then one deterministic function, so the first PPO ratio is exactly 1."""
    eval_checker: bool = True
    """After training: generate on held-out prompts (greedy) and report checker, KL and reward-model scores."""
    eval_limit: int = setting(0, ge=0)
    """Use at most this many held-out prompts (0: all)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for the held-out report."""

    def __post_init__(self):
        if self.grad_accum != 1:
            raise ValueError("ppo.grad_accum must be 1 (a step is one rollout batch; use mini_batch_size)")
        if self.batch_size < self.mini_batch_size:
            raise ValueError(f"ppo.mini_batch_size ({self.mini_batch_size}) must be <= ppo.batch_size "
                             f"({self.batch_size})")
        if self.rollout.temperature <= 0:
            raise ValueError("ppo.rollout.temperature must be > 0 (PPO samples from the policy)")
        if self.rm_weight == 0 and self.critic_init == "rm":
            raise ValueError("ppo.critic_init 'rm' needs a reward model, but ppo.rm_weight is 0: "
                             "set ppo.critic_init=fresh")
        if self.rm_weight == 0 and not self.rules:
            raise ValueError("ppo has no reward: ppo.rm_weight is 0 and ppo.rules is empty")


def critic_values(model, batch: dict, share_prefixes: bool = False) -> torch.Tensor:
    """Critic values [B, R] at the positions that predict each response token (``share_prefixes``: rollout.forward)."""
    return at_positions(forward(model, batch, share_prefixes, head=CRITIC), batch["positions"])


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: perfect, 0: no better than a mean)."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    res = returns - values
    var_res = masked_mean((res - masked_mean(res, mask)) ** 2, mask)
    return float(1 - var_res / var) if var > 0 else float("nan")


def load_roles(cfg: Config, model_cfg: ModelConfig, upstream: dict[str, Path]) -> tuple[Backbone, RewardModel | None]:
    """The one backbone with its four roles: ``sft`` and ``rm`` frozen, ``ppo`` and ``critic`` trainable.
    The policy is activated last, so it is the active adapter on return."""
    backbone = Backbone.load(model_cfg)
    backbone.load_adapter(REFERENCE, upstream["sft"], trainable=False)
    rm = RewardModel.load(backbone, upstream["rm"], name=REWARD) if "rm" in upstream else None
    if cfg.critic_init == "rm":
        backbone.load_adapter(CRITIC, upstream["rm"], trainable=True)
        head = backbone.load_head(CRITIC, Path(upstream["rm"]) / HEAD_FILE, trainable=True)
        if rm is not None and rm.stats:  # values start as the normalised reward: (w.h + b - mean) / std
            mean, std = rm.mean_std()
            with torch.no_grad():
                head.proj.weight.div_(std)
                head.proj.bias.sub_(mean).div_(std)
    else:
        torch.manual_seed(cfg.seed)
        backbone.add_adapter(CRITIC, cfg.critic_delta, trainable=True)
        backbone.add_head(CRITIC, trainable=True)
    backbone.load_adapter(NAME, upstream["sft"], trainable=True)
    return backbone, rm


def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    out_dir, upstream = Path(out_dir), upstream or {}
    engine = Engine(cfg, out_dir)

    # 1. load: one backbone; reference and reward model frozen, policy and critic trainable copies
    backbone, rm = load_roles(cfg, model_cfg, upstream)
    reward = CompositeReward(rm, cfg.rm_weight, cfg.rules)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(cfg.kl_coef))
    engine.register_state("kl_controller", kl_ctl.state_dict, kl_ctl.load_state_dict)
    tok, share_prefixes = backbone.tokenizer, cfg.shares_prefixes(backbone)
    stops = set(stop_token_ids(tok))
    if rm is not None:
        rm.share_prefixes = share_prefixes

    # 2. data: prompts only
    data = load_prompts(cfg, tok)
    examples, prompt_ids, keep, eval_ex = data["examples"], data["prompt_ids"], data["keep"], data["eval_examples"]

    def batches(epoch: int) -> list[list[int]]:
        order = length_grouped_batches([len(prompt_ids[i]) for i in keep], cfg.batch_size, cfg.seed, epoch)
        return [[keep[j] for j in b] for b in order if len(b) >= cfg.mini_batch_size]

    n_mini = math.ceil(cfg.batch_size / cfg.mini_batch_size)
    model = engine.prepare(backbone, engine.total_steps(len(batches(0))), updates_per_step=cfg.passes * n_mini)
    engine.log({"prompts": len(keep), "skipped": data["counts"]["train"]["skipped"],
                "dropped": data["counts"]["train"]["dropped"], "steps": engine.n_steps,
                "critic_init": cfg.critic_init, "trainable_params": backbone.trainable_numel()}, kind="setup")

    # 3. loop: one rollout batch per step
    # disable_dropout (default): old and new log-probs come from the same function; checkpointing stays on
    train_mode(backbone, disable_dropout=cfg.disable_dropout)
    for step, micro in engine.steps(batches):
        idx = micro[0]
        # 3.1 rollout with the policy
        t0 = time.time()
        with engine.generating(), backbone.using(NAME):  # ZeRO-3: every rank enters
            responses = generate(backbone, [prompt_ids[i] for i in idx], cfg.rollout,
                                 row_seeds=[rollout_seed(cfg.seed, step, i) for i in idx])
        t_gen = time.time() - t0

        # 3.2 score: reward model + rules, minus the penalty for responses without a stop token
        texts = decode(backbone, responses)
        score, parts = reward([examples[i].prompt for i in idx], texts)
        ended = torch.tensor([float(bool(r) and r[-1] in stops) for r in responses])
        score = score - cfg.missing_eos_penalty * (1 - ended)

        # 3.3 reference log-probs (no gradients); old log-probs of every row but the first minibatch's without
        # gradients; the first minibatch's come from the first update's own policy forward, run now (no update yet,
        # dropout off: the same function; ratio 1 there); its old values from the critic's, with full checkpointing
        batch = engine.to_device(rollout_batch([prompt_ids[i] for i in idx], responses, tok.pad_token_id))
        mask = batch["response_mask"]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        minibatches = [mb for _ in range(cfg.passes)
                       for mb in torch.randperm(len(idx), generator=gen).split(cfg.mini_batch_size)]
        first = minibatches[0] if cfg.disable_dropout else minibatches[0][:0]  # with dropout: all separately
        rest = torch.ones(len(idx), dtype=torch.bool)
        rest[first] = False
        critic_first = len(first) > 0 and model_cfg.gradient_checkpointing is True  # two graphs only when small
        critic_rest = rest if critic_first else torch.ones_like(rest)
        with torch.no_grad():
            with backbone.using(REFERENCE):
                ref_lp = policy_logprobs(backbone, model, batch, cfg.rollout.temperature, share_prefixes=share_prefixes)
            old_lp, old_v = torch.zeros_like(ref_lp), torch.zeros_like(ref_lp)
            if rest.any():
                with backbone.using(NAME):
                    old_lp[rest] = policy_logprobs(backbone, model, rows_of(batch, rest), cfg.rollout.temperature,
                                                   share_prefixes=share_prefixes)
            if critic_rest.any():
                with backbone.using(CRITIC):
                    old_v[critic_rest] = critic_values(model, rows_of(batch, critic_rest), share_prefixes).to(old_v)
        release_free_memory()  # what generation and scoring freed, before the updates allocate theirs
        first_out = first_v = None
        if len(first):  # the graphs are kept; each backward runs under its own adapter (checkpointing recomputes)
            with backbone.using(NAME):
                first_out = policy_logprobs(backbone, model, rows_of(batch, first), cfg.rollout.temperature,
                                            entropy="grad" if cfg.ent_coef else True, share_prefixes=share_prefixes)
            old_lp[first] = first_out[0].detach()
            if critic_first:
                with backbone.using(CRITIC):
                    first_v = critic_values(model, rows_of(batch, first), share_prefixes)
                old_v[first] = first_v.detach().to(old_v)
            # each checkpointed layer keeps its small input alive in the middle of the heap where its larger
            # temporaries were freed, so the next layer's temporaries go further up: a forward over the rollout
            # leaves a few hundred MB of free heap that glibc keeps resident; handed back after every pass
            release_free_memory()

        # 3.4 per-token rewards with the KL penalty, GAE, whitened advantages
        rewards, kl = kl_penalty_rewards(score.to(old_lp), old_lp, ref_lp, mask, kl_ctl.value)
        adv, returns = gae_advantages(rewards, old_v, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over the global batch (every process's rollouts)
            adv = masked_whiten(adv, mask, all_sum=engine.all_sum)
        t_score = time.time() - t0 - t_gen

        # 3.5 PPO epochs over shuffled minibatches, one update each
        stats: dict[str, float] = {}
        for n_updates, mb in enumerate(minibatches, start=1):
            sub, m = rows_of(batch, mb), mask[mb]
            # token means over the global minibatch: each process weighs its mean by its share of the tokens
            n_tokens = float(m.sum())
            total = engine.global_sum(n_tokens)
            # two backward passes, each under its own adapter: checkpointing recomputes with the active one
            with backbone.using(NAME):
                lp, ent = first_out if first_out is not None else policy_logprobs(
                    backbone, model, sub, cfg.rollout.temperature, entropy="grad" if cfg.ent_coef else True, share_prefixes=share_prefixes)
                pg_loss, pg = ppo_policy_loss(lp, old_lp[mb], adv[mb], m, cfg.clip)
                entropy = masked_mean(ent, m)
                engine.backward((pg_loss - cfg.ent_coef * entropy) * n_tokens, total)
            release_free_memory()  # after every training pass (see 3.3)
            with backbone.using(CRITIC):
                v = first_v if first_v is not None else critic_values(model, sub, share_prefixes)
                vf_loss, vf = ppo_value_loss(v, old_v[mb], returns[mb], m, cfg.value_clip)
                engine.backward(cfg.vf_coef * vf_loss * n_tokens, total)
            release_free_memory()
            first_out = first_v = None
            upd = engine.update()
            weight = n_tokens * engine.world / max(total, 1.0)  # mean over processes == global token mean
            for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy,
                         "clipfrac": pg["clipfrac"], "approx_kl": pg["approx_kl"],
                         "value_clipfrac": vf["clipfrac"]}.items():
                stats[k] = stats.get(k, 0.0) + v.item() * weight
            stats["grad_norm"] = stats.get("grad_norm", 0.0) + upd.get("grad_norm", 0.0)

        release_free_memory()  # and what the updates freed, before the next rollout

        # 3.6 KL controller, metrics
        counts = torch.tensor([len(idx), float(kl.sum(1).sum())], dtype=torch.float64, device=engine.device)
        n_global, kl_sum = engine.all_sum(counts).tolist()
        mean_kl = kl_sum / n_global  # the same value on every process
        kl_ctl.update(mean_kl, int(n_global))
        metrics = {k: v / n_updates for k, v in stats.items()} | {
            "score": float(score.mean()), "kl": mean_kl, "kl_coef": kl_ctl.value,
            "explained_variance": explained_variance(old_v, returns, mask),
            "response_length": float(mask.sum(1).mean()), "ended": float(ended.mean()),
            "time_generate": t_gen, "time_score": t_score, "time_optimise": time.time() - t0 - t_gen - t_score}
        metrics |= {f"reward_{k}": float(v.mean()) for k, v in parts.items()}
        engine.step(metrics, update=False)

    # 4. evaluate (greedy, held-out prompts) and save policy, critic adapter and head
    report, examples = {"data": data["counts"]}, eval_ex[: cfg.eval_limit or None]
    evaluate = report_policies(engine, report, backbone, examples, cfg.generation,
                               {"reference": REFERENCE, NAME: NAME}, REFERENCE, reward_model=rm)
    return evaluate_and_save(engine, out_dir, report, evaluate, bool(examples),
                             deltas=[(NAME, out_dir, None), (CRITIC, out_dir / CRITIC, out_dir / CRITIC / HEAD_FILE)])
