"""Batched generation from the backbone with whichever delta is active, and the checker evaluation.

:func:`generate` takes prompt token ids and returns response token ids: left-padded batches (prompts sorted by
length to waste less padding, results returned in the input order), KV cache on, ``torch.no_grad()``, the backbone
in eval mode for the call (each module's train/eval flag is restored afterwards). Each distinct prompt of a batch
is prefilled once through :meth:`deltalign.model.backbone.Backbone.encode` (a GRPO group's G samples share it), then
every row decodes one token a step from the cache of :mod:`deltalign.sampling.decoding` (the prompt's keys and values held
once for its rows), and a row that finished leaves the batch. Every delta method generates, prompt learning
included (a prefix or soft prompt goes in front of the left padding), and greedy tokens equal a step-by-step
argmax over full ``Backbone.forward`` passes and transformers' ``generate``. A response ends right after
its first stop token (the tokenizer's eos and, if different, the chat template's end-of-turn token, e.g.
``<|im_end|>``) and contains no padding. The pad token is never generated (it is suppressed), so a pad id in a
batch is always padding. ``temperature == 0`` is greedy. Sampling draws from the plain temperature/top-p
distribution (no top-k) by the inverse CDF, with one random stream per prompt (``row_seeds``, by default
``seed`` and the prompt's index; :class:`RowSampler`): a prompt's response depends on its seed alone, not on
which other prompts share its batch or process -- so a rollout is the same in one process and in two. The
caller's RNG state is untouched.

Deltas are chosen by the caller: ``with backbone.using(name): generate(...)``.

Under DeepSpeed ZeRO-3 with the weights left sharded (``zero3_generation: lockstep``), every forward is collective:
inside :func:`in_lockstep` (the engine's ``generating()``) the processes agree on the number of batches and each
decoding loop runs until every process's rows are done; a process with fewer rows decodes a one-token dummy row
meanwhile. The tokens are the same as without it.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch

from deltalign.sampling import decoding
from deltalign.model.modes import eval_mode
from deltalign.core.settings import setting
from deltalign.data.tokenize import tokenize_prompt
from deltalign.rewards.checker import score_batch

_MARK = "\u2063deltalign-end-of-turn\u2063"  # unlikely text, used to find what a template appends after a turn
# (all_true(flag) -> bool, max_int(n) -> int) over the processes while generation runs in lockstep; else None
_LOCKSTEP: ContextVar[tuple[Callable[[bool], bool], Callable[[int], int]] | None] = ContextVar("lockstep",
                                                                                                default=None)


@contextlib.contextmanager
def in_lockstep(all_true: Callable[[bool], bool], max_int: Callable[[int], int]):
    """Inside, :func:`generate` keeps every process's decoding in step (see the module docstring): ``all_true``
    and ``max_int`` reduce a flag / a count over the processes (every process calls them together)."""
    token = _LOCKSTEP.set((all_true, max_int))
    try:
        yield
    finally:
        _LOCKSTEP.reset(token)


@dataclass
class GenerationConfig:
    max_new_tokens: int = setting(48, ge=1)
    """Maximum number of tokens generated per response (the stop token counts)."""
    temperature: float = setting(0.0, ge=0)
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = setting(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this total probability (1 = all; sampling only)."""
    batch_size: int = setting(16, ge=1)
    """Prompts per generation batch."""

    def validate(self) -> None:
        """The declared ranges (as the config loader checks them), for configs built in code."""
        from deltalign.core.settings import check

        check(self, "generation")


def stop_token_ids(tokenizer) -> list[int]:
    """The eos id, plus the chat template's end-of-turn token if the template has one and it differs."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}], tokenize=False)
        except Exception:  # templates with unusual role rules: eos alone
            text = ""
        if _MARK in text:
            tail = tokenizer(text.rsplit(_MARK, 1)[1], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
            if tail and tail[0] in special and tail[0] not in stops:
                stops.append(tail[0])
    if not stops:
        raise ValueError("the tokenizer has no eos token and its chat template no end-of-turn token")
    return stops


class RowSampler:
    """Sampling from softmax(logits / T) restricted to the top-p nucleus, each row with its own random stream: row i
    draws ``steps`` uniforms from a generator seeded ``seeds[i]`` up front, and its token at step t is the
    inverse CDF of the distribution at its t-th uniform. One uniform per row and step (the Gumbel-max trick of
    earlier versions drew one per vocabulary entry): a step's draw for the whole batch is one vectorised call, and a
    row's tokens still depend on its seed alone, not on the batch or process it is decoded in."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, steps: int, device=None):
        self.uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s) % (2**63)),
                                                dtype=torch.float64) for s in seeds]).to(device)
        self.temperature, self.top_p = temperature, top_p

    def draw(self, scores: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        """Tokens [B] for ``scores`` [B, V] (-inf: never drawn) of rows ``rows`` (indices into the seeds) at
        ``step``."""
        p = torch.softmax(scores.double() / self.temperature, dim=-1)
        order = None
        if self.top_p < 1:  # keep the most likely tokens until their mass reaches top_p
            p, order = p.sort(dim=-1, descending=True)
            p = p.masked_fill(p.cumsum(-1) - p >= self.top_p, 0.0)
        cdf = p.cumsum(-1)
        u = self.uniforms[rows, step].clamp(min=1e-300)[:, None] * cdf[:, -1:]  # in (0, total]
        pick = torch.searchsorted(cdf, u).clamp(max=p.shape[-1] - 1)  # first entry whose cdf reaches u
        return (pick if order is None else order.gather(-1, pick)).squeeze(-1)


def generate(backbone, prompt_ids: list[list[int]], cfg: GenerationConfig, seed: int = 0,
             row_seeds: list[int] | None = None) -> list[list[int]]:
    """Response ids for each prompt (in input order), ending with the stop token if one was generated.
    Sampling: prompt i draws from its own stream, seeded ``row_seeds[i]`` (default ``seed * 1_000_003 + i``).
    Equal prompts (a GRPO group's) in one batch of ``cfg.batch_size`` rows are prefilled once and share their
    keys and values (:mod:`deltalign.sampling.decoding`)."""
    cfg.validate()
    sync = _LOCKSTEP.get()
    if not prompt_ids and sync is None:
        return []
    if row_seeds is None:
        row_seeds = [seed * 1_000_003 + i for i in range(len(prompt_ids))]
    if len(row_seeds) != len(prompt_ids):
        raise ValueError(f"generate: {len(row_seeds)} row seeds for {len(prompt_ids)} prompts")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: empty prompt (every prompt needs at least one token)")
    tok = backbone.tokenizer
    stops = stop_token_ids(tok)
    device = next(backbone.parameters()).device
    # longest first (an out-of-memory shows early), equal prompts next to each other
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), prompt_ids[i]))
    out: list[list[int] | None] = [None] * len(prompt_ids)
    n_batches = math.ceil(len(order) / cfg.batch_size)
    all_done = None
    if sync is not None:
        all_done, max_int = sync
        n_batches = max_int(n_batches)
    with torch.no_grad(), eval_mode(backbone):
        for start in range(0, n_batches * cfg.batch_size, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if not idx:  # lockstep: the other processes still have rows; a dummy row keeps the forwards in step
                one = torch.full((1, 1), tok.pad_token_id, dtype=torch.long, device=device)
                decode_batch(backbone, one, torch.ones_like(one), torch.zeros(1, dtype=torch.long, device=device),
                             cfg.max_new_tokens, stops, tok.pad_token_id, all_done=all_done)
                continue
            distinct: list[list[int]] = []
            src = []
            for i in idx:
                if not distinct or distinct[-1] != prompt_ids[i]:
                    distinct.append(prompt_ids[i])
                src.append(len(distinct) - 1)
            width = len(distinct[0])
            ids = torch.full((len(distinct), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(distinct), width), dtype=torch.long)
            for row, p in enumerate(distinct):
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            sampler = RowSampler([row_seeds[i] for i in idx], cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                                 device) if cfg.temperature else None
            new = decode_batch(backbone, ids.to(device), mask.to(device), torch.tensor(src, device=device),
                               cfg.max_new_tokens, stops, tok.pad_token_id, sampler, all_done)
            for row, i in enumerate(idx):
                out[i] = _cut(new[row].tolist(), stops)
    return out  # type: ignore[return-value]


LEAVE_SHARE = 1 / 8
"""Finished rows leave the decoding batch once they are at least this share of it (each removal copies the rows'
cache; until then they decode padding)."""


def decode_batch(backbone, ids: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, max_new_tokens: int,
                 stops: list[int], pad: int, sampler: "RowSampler | None" = None,
                 all_done: Callable[[bool], bool] | None = None) -> torch.Tensor:
    """New tokens [B, <= max_new_tokens] of rows continuing the left-padded distinct prompts ``ids`` [U, W] (row b
    continues prompt ``src[b]``): one prefill per prompt, then one token a step (:mod:`deltalign.sampling.decoding`).
    Greedy over the logits with the pad token suppressed, or a draw by ``sampler``; a row that produced a stop
    token gets pads after it and leaves the batch; stops early once every row has (with ``all_done``: every row
    of every process)."""
    lm = backbone.causal_lm
    delta = backbone.deltas[backbone.active] if backbone.active in backbone.deltas else None
    hidden, past = backbone.encode(ids, mask, cache=True)
    logits = backbone.lm_logits(hidden[:, -1]).index_select(0, src)
    del hidden
    state = decoding.start(lm, past, src, max_new_tokens)
    del past
    B = len(src)
    stop = torch.tensor(stops, device=ids.device)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=ids.device)
    alive = torch.arange(B, device=ids.device)  # the batch's rows still decoding, by their index in the output
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)  # of the rows in `alive`
    steps = 0
    for step in range(max_new_tokens):
        logits[:, pad] = float("-inf")  # the pad token is never generated: a pad id is always padding
        token = logits.argmax(-1) if sampler is None else sampler.draw(logits, alive, step)
        token = token.masked_fill(done, pad)
        out[alive, step] = token
        steps = step + 1
        done |= torch.isin(token, stop)
        finished = bool(done.all()) if all_done is None else all_done(bool(done.all()))
        if finished or step == max_new_tokens - 1:
            break
        n_done = int(done.sum())
        if n_done and n_done >= LEAVE_SHARE * len(alive) and n_done < len(alive):  # finished rows leave
            keep = (~done).nonzero().flatten()
            state.keep(keep)
            alive, token, done = alive[keep], token[keep], done[keep]
        logits = backbone.lm_logits(state.step(lm, delta, token)[:, -1])
    return out[:, :steps]


def _cut(ids: list[int], stops: list[int]) -> list[int]:
    """Keep tokens up to and including the first stop token (what follows is padding)."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k + 1]
    return ids


def decode(backbone, ids: list[list[int]]) -> list[str]:
    """Response texts: special tokens skipped, surrounding whitespace stripped."""
    return [s.strip() for s in backbone.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _user_text(prompt) -> str:
    """The last user message of a chat prompt, or the plain prompt string."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _adapter_context(backbone, adapter: str | None):
    if not backbone.adapters:
        if adapter is not None:
            raise ValueError(f"adapter {adapter!r} requested but the backbone has no adapters")
        return contextlib.nullcontext()
    if adapter is not None and adapter not in backbone.adapters:
        raise ValueError(f"unknown adapter {adapter!r}; attached: {backbone.adapters}")
    return backbone.using(adapter)


def checker_eval(backbone, examples: list, cfg: GenerationConfig, adapter: str | None = None,
                 seed: int = 0) -> dict:
    """Generate for each example's prompt with ``adapter`` (``None``: base, adapters off) and score by the checker.

    Returns ``checker_score`` (mean over the prompts that state a constraint the checker knows, None if none
    does: your own data), ``checker_n`` (how many did), ``n``, ``mean_response_tokens``, ``samples`` (first 5 ``{prompt,
    response, score}``) and ``scores`` (per example, in order).
    """
    if not examples:
        raise ValueError("checker_eval: no examples")
    tok = backbone.tokenizer
    prompt_ids = [tokenize_prompt(ex.prompt, tok, ex.conversational) for ex in examples]
    with _adapter_context(backbone, adapter):
        ids = generate(backbone, prompt_ids, cfg, seed=seed)
    responses = decode(backbone, ids)
    users = [_user_text(ex.prompt) for ex in examples]
    scores = score_batch(users, responses, missing="none")  # prompts without a checkable constraint: None
    scored = [s for s in scores if s is not None]
    return {
        "checker_score": sum(scored) / len(scored) if scored else None,
        "checker_n": len(scored),
        "n": len(examples),
        "mean_response_tokens": sum(len(r) for r in ids) / len(ids),
        "samples": [{"prompt": p, "response": r, "score": s} for p, r, s in list(zip(users, responses, scores))[:5]],
        "scores": scores,
        "response_ids": ids,
    }


def checker_row(backbone, examples: list, cfg: GenerationConfig, adapter: str | None = None) -> dict:
    """The checker's part of a held-out row: :func:`checker_eval`'s ``checker_score``, ``mean_response_tokens``
    and first 3 ``samples``."""
    res = checker_eval(backbone, examples, cfg, adapter)
    return {"checker_score": res["checker_score"], "mean_response_tokens": res["mean_response_tokens"],
            "samples": res["samples"][:3]}
