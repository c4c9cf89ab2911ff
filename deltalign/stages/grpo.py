"""GRPO: critic-free online RL on one frozen backbone -- policy, reference and reward model are deltas, not models.

* ``grpo`` the policy: a trainable copy of the SFT adapter (the sft folder is only read);
* ``sft``  the reference: the SFT adapter itself, frozen -- never the bare base. Loaded only for the KL term
           (``kl_coef > 0``) and for the held-out report's KL to SFT; with ``kl_coef = 0`` no reference forward runs;
* ``rm``   the reward model: the rm adapter + head, frozen, scores normalised with the rm stage's statistics;
           loaded only when ``rm_weight > 0``.
There is no critic: the G responses sampled for a prompt are each other's baseline (Shao et al. 2024).

Each step (one rollout batch of prompts):
 1. rollout: G responses per prompt with the policy (KV cache, temperature/top-p); every response draws from its
    own seeded stream (step, prompt, sample), so rollouts depend neither on the batch nor on the process count;
 2. score: rules, user ``module:function`` rewards and the reward model (:class:`CompositeReward`), minus the
    missing-stop penalty; groups whose rewards are all equal carry no signal: counted, and with
    ``resample_rounds > 0`` replaced by a fresh prompt's group, up to that many rounds (DAPO's dynamic sampling);
 3. advantages per group (``grpo``, ``dr_grpo`` or ``rloo``); a forward for the old log-probs only when a pass
    has several minibatches: with one, the first pass's training forward runs before any update, so its
    detached log-probs are the old ones (ratio 1 by construction) and later passes reuse them; reference
    log-probs only when ``kl_coef > 0``;
 4. ``passes`` passes over (shuffled) minibatches: clipped ratio loss with asymmetric clipping plus
    ``kl_coef`` x k3 KL, aggregated per token (DAPO), per sequence (GRPO) or over a constant (Dr. GRPO) of the
    global minibatch; one optimizer update each;
 5. log, checkpoint.

Dropout is off throughout by default, so old log-probs and the trained forward are one function. With several
processes each generates and scores its own prompts (groups never span processes, so advantages are local); loss
normalisers and the dynamic-sampling rounds are global (``engine.all_sum``), so the losses are those of one
process holding the global batch. Nothing but the step decides a step's prompts, seeds and replacements: there
is no sampler state to checkpoint beyond the engine's. Sections: 1. load; 2. data; 3. loop (steps 1-5);
4. evaluate and save.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from deltalign.model.backbone import Backbone, ModelConfig
from deltalign.model.modes import eval_mode, train_mode
from deltalign.data.batching import length_grouped_batches
from deltalign.training.engine import Engine
from deltalign.stages.skeleton import evaluate_and_save, report_policies
from deltalign.core.memory import release_free_memory
from deltalign.training.train_config import TrainConfig
from deltalign.sampling.generation import GenerationConfig, decode, generate, stop_token_ids
from deltalign.losses import (cispo_policy_loss, clipped_policy_loss, constant_loss_sum, dr_grpo_advantages,
                              grpo_advantages, masked_mean, rloo_advantages, sequence_clipped_policy_loss,
                              sequence_loss_sum, soft_overlong_penalty, token_loss_sum, zero_variance_groups)
from deltalign.core.settings import setting
from deltalign.rewards.composite import CompositeReward
from deltalign.rewards.model import RewardModel
from deltalign.sampling.rollout import (PromptData, length_chunks, load_prompts, policy_logprobs, rollout_batch,
                               rollout_seed)

NAME = "grpo"
READS = {"data": "prompt", "eval_data": "prompt"}  # setting -> row shape (checked before the run)
REFERENCE = "sft"
REWARD = "rm"
ADVANTAGES = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
CLIPS = {"token": (0.2, 0.28), "sequence": (3e-4, 4e-4)}  # (clip_low, clip_high) defaults: DAPO's; GSPO's paper


def _rollout_default() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=48, temperature=1.0, top_p=1.0, batch_size=64)


@dataclass
class Config(PromptData, TrainConfig):
    lr: float = setting(1e-4, gt=0)
    """Peak learning rate of the policy delta. LoRA needs about 10x the full-fine-tuning rate (TRL issue 2872:
    GRPO with LoRA does not learn at 5e-7; TRL's LoRA recipe: 1e-5 at rank 1 vs 1e-6 full); 1e-4 suits the
    embedded default's short CPU budget of a few dozen updates (PPO's default.yaml uses the same)."""
    warmup_ratio: float = setting(0.0, ge=0, le=1)
    """Share of the updates with linear warmup (online RL usually runs without)."""
    batch_size: int = setting(4, ge=1)
    """Prompts per rollout per process (one step); each gets ``num_generations`` responses."""
    num_generations: int = setting(8, ge=2)
    """G, responses sampled per prompt: the group that is its own baseline. 8 (TRL's default; DeepSeekMath uses
    64): fewer makes the group mean and std noisy and more groups all-equal under a 0/1 checker, more costs
    generation, the dominant cost on CPU."""
    rollout: GenerationConfig = field(default_factory=_rollout_default)
    """Sampling for rollouts: temperature 1 and top-p 1 sample the policy itself, so the ratio is exact
    (log-probs are computed at the same temperature; top-p < 1 makes them approximate)."""
    rm_weight: float = setting(0.0, ge=0)
    """Weight of the normalised reward-model score (0: no reward model is loaded). 0 by default: group methods
    are used mostly with verifiable rewards (the checker); set it > 0 to add the rm delta (``make sft rm grpo``)."""
    rules: dict[str, float] = field(default_factory=lambda: {"checker": 1.0})
    """Rule-based rewards and their weights: ``checker`` (the embedded task's checker) or ``module:function``
    (``f(prompts, responses) -> list[float]``). A weight of 0 switches a rule off."""
    missing_eos_penalty: float = setting(0.0, ge=0)
    """Subtracted from the reward of a response that hits ``rollout.max_new_tokens`` without a stop token
    (0: none, as TRL's GRPO and DAPO, which shape overlong responses softly instead). It adds to
    ``overlong_cache``'s penalty (a truncated response then gets both) and applies with ``mask_truncated`` too
    (the group's advantages still see it; the masked response itself does not train)."""
    overlong_cache: int = setting(0, ge=0)
    """DAPO's soft overlong punishment (TRL's ``get_soft_overlong_punishment``): a reward term of 0 up to
    ``rollout.max_new_tokens - overlong_cache`` response tokens, falling linearly to -1 at the budget (a truncated
    response: -1). 0: off. Logged as ``reward_overlong``."""
    mask_truncated: bool = False
    """Leave responses that reached ``rollout.max_new_tokens`` without a stop token out of the loss (DAPO's
    overlong filtering; TRL ``mask_truncated_completions``): their rewards still count in their group's
    advantages, their tokens train nothing. The share masked is logged as ``masked_truncated``."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Advantage estimator per group: ``grpo`` (r - mean) / std; ``dr_grpo`` r - mean (Dr. GRPO, pair it with
    ``loss_aggregation: constant``); ``rloo`` r - mean of the others (leave-one-out)."""
    loss_aggregation: Literal["token", "sequence", "constant"] = "token"
    """How token losses become the minibatch loss: ``token`` every token of the global minibatch weighs the
    same (DAPO; TRL's default, no bias against long responses); ``sequence`` mean per response, then over
    responses (the GRPO paper); ``constant`` token sum / (responses x rollout.max_new_tokens) (Dr. GRPO)."""
    loss: Literal["clip", "cispo"] = "clip"
    """The policy objective: ``clip`` the PPO-style clipped ratio (GRPO, DAPO's clip-higher; per token or, with
    ``importance_sampling: sequence``, per sequence: GSPO); ``cispo`` (MiniMax-M1) clips the importance *weight*
    at ``cispo_max`` (stop-gradient, no lower clip) so every token keeps a gradient: aggregate it per token."""
    importance_sampling: Literal["token", "sequence"] = "token"
    """``token``: one ratio per token (GRPO); ``sequence``: one per response, exp of the mean token log-ratio,
    clipped two-sided per response (GSPO, Zheng et al. 2025; TRL ``importance_sampling_level="sequence"``), with
    the paper's clip range as default (``clip_low`` 3e-4, ``clip_high`` 4e-4) and usually ``kl_coef`` 0. Its ratio is
    1 on a rollout's first pass: it matters from ``passes >= 2`` or several minibatches."""
    cispo_max: float = setting(5.0, gt=0)
    """``loss: cispo``: the absolute cap on the importance weight (TRL's ``epsilon_high`` under cispo; ScaleRL
    recommends 5.0). Not ``clip_high``, which is the clip-loss's 1 + clip_high bound."""
    kl_coef: float = setting(0.0, ge=0, formerly="beta", keep_former=True)
    """Weight of the per-token k3 KL to the SFT reference in the loss (``ppo.kl_coef``'s name; TRL's ``beta`` is
    accepted too). 0 (TRL's default and DAPO/Dr. GRPO practice): no reference forward at all; the clip keeps each update near the rollout policy."""
    clip_low: float | None = setting(None, gt=0, lt=1)
    """Ratio clip below: 1 - clip_low. Unset: 0.2 (PPO's epsilon) per token, 3e-4 per sequence (GSPO)."""
    clip_high: float | None = setting(None, gt=0)
    """Ratio clip above: 1 + clip_high. Unset: 0.28 per token -- above clip_low, DAPO's clip-higher: rare tokens
    with positive advantage can grow further, which keeps entropy from collapsing -- and 4e-4 per sequence
    (GSPO). Matters only when a rollout feeds more than one update."""
    passes: int = setting(2, ge=1, formerly="grpo_epochs")
    """Passes over each rollout batch (the GRPO paper's mu; TRL's num_iterations, default 1). 2: on CPU,
    generation dominates a step, and a second pass learns more from it for one more training forward and
    backward (the first pass's log-probs are the old ones: no extra forward); 1 is purely on-policy."""
    mini_batch_size: int = setting(0, ge=0)
    """Responses per optimizer update within a rollout batch per process (0: all batch_size x num_generations,
    one update per pass)."""
    forward_batch_size: int = setting(16, ge=0)
    """Responses per training forward within a minibatch: the minibatch is sorted by length (with
    ``share_prefixes``: by its tokens, so that a group's responses run together and share their prompt) and each
    forward pads only to its own longest row; their gradients add up to the one update (the same update, less
    padding). 0: the whole minibatch in one forward."""
    resample_rounds: int = setting(0, ge=0)
    """DAPO dynamic sampling: replace each group whose rewards are all equal by a fresh prompt's group, up to this
    many rounds per step (0: off; the share of such groups is logged as ``zero_std`` either way). Groups still
    equal after the cap stay, with advantage 0."""
    disable_dropout: bool = True
    """Switch every dropout off (adapter dropout included): old log-probs and the trained forward are then one
    deterministic function, so the first ratio of a rollout is exactly 1."""
    eval_checker: bool = True
    """After training: generate on held-out prompts (greedy) and report checker, KL to SFT and reward-model scores."""
    eval_limit: int = setting(0, ge=0)
    """Use at most this many held-out prompts (0: all)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for the held-out report."""

    def __post_init__(self):
        if self.grad_accum != 1:
            raise ValueError("grpo.grad_accum must be 1 (a step is one rollout batch; use mini_batch_size)")
        if self.mini_batch_size > self.batch_size * self.num_generations:
            raise ValueError(f"grpo.mini_batch_size ({self.mini_batch_size}) must be <= grpo.batch_size x "
                             f"grpo.num_generations ({self.batch_size * self.num_generations})")
        if self.rollout.temperature <= 0:
            raise ValueError("grpo.rollout.temperature must be > 0 (GRPO samples from the policy)")
        if self.rm_weight == 0 and not any(self.rules.values()):
            raise ValueError("grpo has no reward: grpo.rm_weight is 0 and grpo.rules is empty")
        if self.loss == "cispo" and self.importance_sampling == "sequence":
            raise ValueError("grpo.loss=cispo weighs each token's log-prob: it needs grpo.importance_sampling=token")
        if self.overlong_cache > self.rollout.max_new_tokens:
            raise ValueError(f"grpo.overlong_cache ({self.overlong_cache}) must be <= grpo.rollout.max_new_tokens "
                             f"({self.rollout.max_new_tokens})")
        low, high = CLIPS[self.importance_sampling]
        self.clip_low = low if self.clip_low is None else self.clip_low
        self.clip_high = high if self.clip_high is None else self.clip_high

    @property
    def report(self) -> bool:
        return self.eval_checker and bool(self.eval_data)


def policy_loss(cfg: Config, logprobs, old_logprobs, advantages, mask, ref_logprobs):
    """The configured objective's per-token loss and metrics (``loss``, ``importance_sampling``)."""
    if cfg.loss == "cispo":
        return cispo_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.cispo_max, ref_logprobs, cfg.kl_coef)
    clipped = sequence_clipped_policy_loss if cfg.importance_sampling == "sequence" else clipped_policy_loss
    return clipped(logprobs, old_logprobs, advantages, mask, cfg.clip_low, cfg.clip_high, ref_logprobs, cfg.kl_coef)


def sample_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """The sampling seed of response ``sample`` in the group of ``prompt`` (its index in the data) at ``step``;
    resampling round r uses samples r*G .. r*G + G-1. Independent of batch and process."""
    return rollout_seed(seed, step, prompt) * 1_000_003 + sample


def replacement_prompt(seed: int, step: int, prompt: int, rnd: int, pool: list[int]) -> int:
    """The prompt that replaces ``prompt``'s group in resampling round ``rnd`` of ``step``: a draw from ``pool``
    that depends on these numbers alone (no sampler state; the same in one process and in several)."""
    return pool[random.Random(f"deltalign-grpo:{seed}:{step}:{prompt}:{rnd}").randrange(len(pool))]


def load_roles(cfg: Config, model_cfg: ModelConfig, upstream: dict[str, Path]) -> tuple[Backbone, RewardModel | None]:
    """The one backbone with what the config needs: ``sft`` frozen (KL term or report), ``rm`` frozen
    (``rm_weight > 0``), and ``grpo`` trainable, activated last."""
    backbone = Backbone.load(model_cfg)
    if cfg.kl_coef > 0 or cfg.report:
        backbone.load_adapter(REFERENCE, upstream["sft"], trainable=False)
    rm = None
    if cfg.rm_weight > 0:
        if "rm" not in upstream:
            raise ValueError("grpo.rm_weight > 0 needs a finished rm stage")
        rm = RewardModel.load(backbone, upstream["rm"], name=REWARD)
    backbone.load_adapter(NAME, upstream["sft"], trainable=True)
    return backbone, rm


def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    out_dir, upstream = Path(out_dir), upstream or {}
    engine = Engine(cfg, out_dir)
    G = cfg.num_generations
    if engine.zero_stage == 3 and cfg.zero3_generation == "lockstep" and cfg.resample_rounds and cfg.rm_weight:
        raise ValueError("grpo.resample_rounds > 0 with grpo.rm_weight > 0 needs grpo.zero3_generation=gather under "
                         "ZeRO-3: a process with no group to resample would leave the others' reward-model forwards "
                         "waiting")

    # 1. load: one backbone; reference and reward model frozen (when needed), the policy a trainable copy
    backbone, rm = load_roles(cfg, model_cfg, upstream)
    reward = CompositeReward(rm, cfg.rm_weight, cfg.rules)
    advantages_of = ADVANTAGES[cfg.advantage]
    tok, share_prefixes = backbone.tokenizer, cfg.shares_prefixes(backbone)
    stops = set(stop_token_ids(tok))
    if rm is not None:
        rm.share_prefixes = share_prefixes

    # 2. data: prompts only; full batches (every process holds the same number of groups)
    data = load_prompts(cfg, tok, with_eval=cfg.report)
    examples, prompt_ids, keep, eval_ex = data["examples"], data["prompt_ids"], data["keep"], data["eval_examples"]

    def batches(epoch: int) -> list[list[int]]:
        order = length_grouped_batches([len(prompt_ids[i]) for i in keep], cfg.batch_size, cfg.seed, epoch)
        return [[keep[j] for j in b] for b in order if len(b) == cfg.batch_size]

    n_rows = cfg.batch_size * G
    mb_size = cfg.mini_batch_size or n_rows
    n_mini = math.ceil(n_rows / mb_size)
    fresh_old = n_mini > 1  # else the first pass's training forward (before any update) gives the old log-probs
    aggregate = {"token": token_loss_sum, "sequence": sequence_loss_sum,
                 "constant": lambda x, m: constant_loss_sum(x, m, cfg.rollout.max_new_tokens)}[cfg.loss_aggregation]
    model = engine.prepare(backbone, engine.total_steps(len(batches(0))), updates_per_step=cfg.passes * n_mini)
    engine.log({"prompts": len(keep), "skipped": data["counts"]["train"]["skipped"],
                "dropped": data["counts"]["train"]["dropped"], "steps": engine.n_steps,
                "rollouts_per_step": n_rows, "updates_per_step": cfg.passes * n_mini,
                "old_logprobs": "forward" if fresh_old else "first pass",
                "trainable_params": backbone.trainable_numel()}, kind="setup")

    # 3. loop: one rollout batch per step
    train_mode(backbone, disable_dropout=cfg.disable_dropout)
    for step, micro in engine.steps(batches):
        idx = micro[0]
        t_gen = t_score = 0.0

        # 3.1 rollout (G per prompt) and 3.2 score; slot s holds the group of idx[s], or of its replacement
        def sample_and_score(slots: list[int], prompts: list[int], rnd: int):
            nonlocal t_gen, t_score
            # every process enters, even with nothing to sample (ZeRO-3)
            with engine.generating():
                t = time.time()
                with backbone.using(NAME):
                    resp = generate(backbone, [prompt_ids[p] for p in prompts for _ in range(G)], cfg.rollout,
                                    row_seeds=[sample_seed(cfg.seed, step, idx[s], rnd * G + k) for s in slots
                                               for k in range(G)])
                t_gen += time.time() - t
                if not resp:
                    return [], torch.zeros(0, G), {}, torch.zeros(0, G)
                t = time.time()
                total, parts = reward([examples[p].prompt for p in prompts for _ in range(G)],
                                      decode(backbone, resp))
                ended = torch.tensor([float(bool(r) and r[-1] in stops) for r in resp])
                total = total - cfg.missing_eos_penalty * (1 - ended)
                if cfg.overlong_cache:
                    parts["overlong"] = soft_overlong_penalty(torch.tensor([len(r) for r in resp]),
                                                              cfg.rollout.max_new_tokens, cfg.overlong_cache)
                    total = total + parts["overlong"].to(total)
                t_score += time.time() - t
            groups = [resp[j * G:(j + 1) * G] for j in range(len(slots))]
            return groups, total.view(-1, G), {k: v.view(-1, G) for k, v in parts.items()}, ended.view(-1, G)

        prompts = list(idx)
        groups, score, parts, ended = sample_and_score(list(range(len(idx))), prompts, 0)
        zero = zero_variance_groups(score)
        first = {"score": float(score.mean()), "zero_std": float(zero.float().mean()),
                 "ended": float(ended.mean()), "response_length": sum(len(r) for g in groups for r in g) / n_rows}
        first |= {f"reward_{k}": float(v.mean()) for k, v in parts.items()}
        first |= {f"zero_std_{k}": float(zero_variance_groups(v).float().mean()) for k, v in parts.items()}
        resampled = 0
        for rnd in range(1, cfg.resample_rounds + 1):  # DAPO dynamic sampling, the same rounds on every process
            redo = zero.nonzero().flatten().tolist()
            if engine.global_sum(len(redo)) == 0:
                break
            new = [replacement_prompt(cfg.seed, step, idx[s], rnd, keep) for s in redo]
            new_groups, new_score, _, _ = sample_and_score(redo, new, rnd)
            for j, s in enumerate(redo):
                prompts[s], groups[s], score[s] = new[j], new_groups[j], new_score[j]
            zero = zero_variance_groups(score)
            resampled += len(redo)
        responses = [r for g in groups for r in g]

        # 3.3 advantages per group; old log-probs (only if needed) and reference log-probs (only if kl_coef > 0)
        t = time.time()
        adv = advantages_of(score).flatten()
        t_score += time.time() - t
        t0 = time.time()
        batch = engine.to_device(rollout_batch([prompt_ids[p] for p in prompts for _ in range(G)], responses,
                                               tok.pad_token_id))
        mask = batch["response_mask"]
        if cfg.mask_truncated:  # DAPO's overlong filtering: a response cut at the budget trains nothing
            cut = torch.tensor([not (r and r[-1] in stops) for r in responses], device=mask.device)
            mask = batch["response_mask"] = mask * (~cut).to(mask)[:, None]
            first["masked_truncated"] = float(cut.float().mean())
        adv = adv.to(mask)
        old_lp = ref_lp = None
        with torch.no_grad():
            if fresh_old:
                with backbone.using(NAME):
                    old_lp = policy_logprobs(backbone, model, batch, cfg.rollout.temperature, share_prefixes=share_prefixes)
            if cfg.kl_coef > 0:
                with eval_mode(backbone), backbone.using(REFERENCE):
                    ref_lp = policy_logprobs(backbone, model, batch, cfg.rollout.temperature, share_prefixes=share_prefixes)
        if old_lp is None:  # one minibatch: the first pass's forwards (before any update) fill it
            old_lp = torch.zeros_like(mask)
        release_free_memory()  # what generation and scoring freed, before the updates allocate theirs

        # 3.4 passes over shuffled minibatches, one update each; normalisers over the global minibatch; each
        # minibatch runs as length-sorted forwards (forward_batch_size) whose gradients add up to its update
        stats: dict[str, float] = {}
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        n_updates = 0
        for epoch in range(cfg.passes):
            order = torch.randperm(n_rows, generator=gen) if n_mini > 1 else torch.arange(n_rows)
            for rows in order.split(mb_size):
                m = mask[rows]
                count = aggregate(torch.zeros_like(m), m)[1]
                counts = torch.tensor([float(count), float(m.sum())], dtype=torch.float64, device=engine.device)
                total, tokens = engine.all_sum(counts).tolist()
                for part, sub in length_chunks(batch, rows, cfg.forward_batch_size, share_prefixes):
                    mc = sub["response_mask"]
                    R = mc.shape[1]
                    with backbone.using(NAME):
                        lp, ent = policy_logprobs(backbone, model, sub, cfg.rollout.temperature, entropy=True,
                                                  share_prefixes=share_prefixes)
                        if epoch == 0 and not fresh_old:  # one minibatch, first pass: no update yet
                            old_lp[part, :R] = lp.detach()
                        per_token, pg = policy_loss(cfg, lp, old_lp[part, :R], adv[part], mc,
                                                    None if ref_lp is None else ref_lp[part, :R])
                        loss_sum, _ = aggregate(per_token, mc)
                        engine.backward(loss_sum, max(total, 1.0))  # 0: every response masked
                    weight = float(mc.sum()) * engine.world / max(tokens, 1.0)  # over processes: the global mean
                    for k, v in {**pg, "entropy": masked_mean(ent, mc)}.items():
                        stats[k] = stats.get(k, 0.0) + v.item() * weight
                    stats["policy_loss"] = (stats.get("policy_loss", 0.0)
                                            + loss_sum.item() * engine.world / max(total, 1.0))
                upd = engine.update()
                n_updates += 1
                stats["grad_norm"] = stats.get("grad_norm", 0.0) + upd.get("grad_norm", 0.0)
        release_free_memory()  # and what the updates freed, before the next rollout

        # 3.5 metrics: the first sampling describes the policy; the resampled batch is what trained
        metrics = {k: v / n_updates for k, v in stats.items()} | first | {
            "time_generate": t_gen, "time_score": t_score, "time_optimise": time.time() - t0}
        if cfg.resample_rounds:
            # resampled_groups: over all processes (the engine averages the processes' values)
            metrics |= {"zero_std_after_resample": float(zero.float().mean()),
                        "resampled_groups": float(resampled * engine.world)}
        engine.step(metrics, update=False)

    # 4. evaluate (greedy, held-out prompts) and save the policy
    report, examples = {"data": data["counts"]}, eval_ex[: cfg.eval_limit or None]
    evaluate = report_policies(engine, report, backbone, examples, cfg.generation,
                               {"reference": REFERENCE, NAME: NAME}, REFERENCE, reward_model=rm)
    return evaluate_and_save(engine, out_dir, report, evaluate, bool(examples), deltas=[(NAME, out_dir, None)])
