"""Held-out comparison of policies that live as adapters on one backbone, every score with its 95% interval.

Each policy generates for the held-out prompts (greedy by default). Per policy the report gives:

- ``mean_response_tokens``, ``kl_to_reference`` and ``rm_score`` (the run's reward model), each a mean over the
  prompts with its bootstrap interval (``<name>_ci``: ``[low, high]``, :mod:`deltalign.reports.stats`). The KL to
  the reference (the SFT delta) is the k3 estimate on the policy's own responses: per token
  ``exp(r) - 1 - r`` with ``r = log pi_ref - log pi`` of the generated token, summed over the response, which is
  never negative (the plain log-ratio can be, on greedy responses).
- ``checker_score`` (the embedded checker's pass rate, Wilson interval) where prompts state a checkable
  constraint, else None (your own data).
- with a judge (another run's finished ``rm`` folder, trained on rows the policy's reward model never saw):
  ``judge_score``, and against the baseline policy ``win_rate`` (both answers to the same prompt scored by the
  judge, ties half; paired bootstrap interval) and ``lc_win_rate`` (length-controlled: the win read at equal
  response length).
- with preference rows held out (``pairs``): ``implicit_reward_accuracy``, how often the policy's implicit reward
  ``log pi - log pi_ref`` ranks chosen above rejected (Wilson interval). :func:`reward_model_report` gives each
  reward model's pairwise accuracy on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from deltalign.model.labelled import labelled_hidden
from deltalign.model.modes import eval_mode
from deltalign.data.batching import pad_batch
from deltalign.data.formats import PrefExample
from deltalign.data.tokenize import tokenize_pair, tokenize_prompt
from deltalign.sampling.generation import GenerationConfig, checker_eval
from deltalign.core.settings import setting
from deltalign.reports import stats

UNLIMITED = 1 << 62


@dataclass
class EvalConfig:
    """The ``eval:`` section: ``python -m deltalign eval`` / ``make eval`` (not a stage: nothing is trained)."""

    data: str = "embedded:pref_eval"
    """Held-out prompts (any supported shape; responses are ignored) on which base and every finished policy
    generate. Preference rows also give reward-model and implicit-reward accuracies."""
    limit: int = setting(0, ge=0)
    """Use at most this many held-out prompts (0: all; ``--limit`` on the command line overrides it)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for the comparison (greedy by default)."""
    bad_rows: Literal["error", "skip"] = "error"
    """A held-out row with a problem of its own: ``error`` stops naming file/row/field; ``skip`` leaves it out
    (one log line each)."""
    judge: str = ""
    """A finished ``rm`` stage folder of another run (e.g. ``runs/hh-judge/rm``, trained on rows this run's reward
    model never saw) that scores both answers for the win rates; '' (default): no win-rate columns."""
    baseline: str = "sft"
    """The policy every other one is judged against (``base`` or a finished policy stage of the run)."""


@torch.no_grad()
def token_logprobs(backbone, prompt_ids: list[list[int]], response_ids: list[list[int]], adapter: str | None,
                   batch_size: int = 16) -> list[torch.Tensor]:
    """Log-prob of each response token given the prompt and the tokens before it, under ``adapter`` (None:
    adapters off): one 1-D tensor per response."""
    out: list[torch.Tensor] = []
    with backbone.using(adapter):
        for i in range(0, len(prompt_ids), batch_size):
            ps, rs = prompt_ids[i:i + batch_size], response_ids[i:i + batch_size]
            batch = pad_batch([p + r for p, r in zip(ps, rs)], backbone.tokenizer.pad_token_id,
                              labels=[[-100] * len(p) + r for p, r in zip(ps, rs)])
            hidden, targets, rows = labelled_hidden(backbone, batch)
            lp = backbone.lm_logprobs(hidden, targets).float().cpu()
            rows = rows.cpu()
            out += [lp[rows == j] for j in range(len(ps))]  # rows come in order, tokens in order within a row
    return out


def sequence_logprobs(backbone, prompt_ids, response_ids, adapter: str | None, batch_size: int = 16) -> torch.Tensor:
    """Summed log-prob of each response given its prompt, under ``adapter`` (None: adapters off)."""
    return torch.stack([t.sum() for t in token_logprobs(backbone, prompt_ids, response_ids, adapter, batch_size)])


def k3_kl(policy_lp: list[torch.Tensor], reference_lp: list[torch.Tensor]) -> list[float]:
    """Per response, ``sum_t exp(r_t) - 1 - r_t`` with ``r_t = ref_lp - pol_lp``: an estimate of KL(pi || ref) on
    the policy's own tokens that is never negative (each term is >= 0)."""
    out = []
    for p, q in zip(policy_lp, reference_lp):
        r = (q - p).double()
        out.append(float((torch.expm1(r) - r).sum()))
    return out


def _with_ci(row: dict, name: str, values) -> None:
    mean, ci = stats.mean_interval(values)
    row[name], row[f"{name}_ci"] = mean, list(ci)


def _rate(row: dict, name: str, outcomes: list[float]) -> None:
    k, n = sum(outcomes), len(outcomes)
    row[name], row[f"{name}_ci"] = k / n, list(stats.wilson(k, n))


def _pair_ids(backbone, examples: list[PrefExample]) -> tuple[list, list, list]:
    items = [tokenize_pair(ex, backbone.tokenizer, UNLIMITED) for ex in examples]
    return [x["prompt_ids"] for x in items], [x["chosen_ids"] for x in items], [x["rejected_ids"] for x in items]


def _ranked(better: torch.Tensor, worse: torch.Tensor) -> list[float]:
    return stats.wins(better.tolist(), worse.tolist())


def policy_report(backbone, examples: list, gen_cfg: GenerationConfig, policies: dict[str, str | None],
                  reference: str | None, rm_dir: str | Path | None = None, checker: bool = True,
                  reward_model=None, judge=None, baseline: str | None = None, pairs: bool = False) -> dict:
    """``policies`` maps a label (e.g. ``sft``, ``dpo``) to its adapter name (None: the base with adapters off).

    The reward-model score comes from ``reward_model`` (already on this backbone) or is loaded from ``rm_dir``;
    ``judge`` (a :class:`RewardModel` on this backbone) and ``baseline`` (a label of ``policies``) add the win
    rates; ``pairs`` the implicit-reward accuracy on preference ``examples`` (module docstring).
    """
    if not examples or not checker:
        return {}
    with eval_mode(backbone):
        rm = reward_model
        if rm is None and rm_dir is not None and Path(rm_dir, "manifest.json").exists():
            from deltalign.rewards.model import RewardModel

            rm = RewardModel.load(backbone, rm_dir)
        tok = backbone.tokenizer
        prompt_ids = [tokenize_prompt(ex.prompt, tok, ex.conversational) for ex in examples]
        prompts = [ex.prompt for ex in examples]
        pair_ids = _pair_ids(backbone, examples) if pairs and all(isinstance(e, PrefExample) for e in examples) \
            else None
        report, judged, lengths, ref_pairs = {}, {}, {}, None
        for label, adapter in policies.items():
            res = checker_eval(backbone, examples, gen_cfg, adapter)
            row = {"n": res["n"], "checker_n": res["checker_n"], "samples": res["samples"][:3]}
            lengths[label] = [len(r) for r in res["response_ids"]]
            _with_ci(row, "mean_response_tokens", lengths[label])
            scored = [s for s in res["scores"] if s is not None]
            row["checker_score"] = None
            if scored:
                _rate(row, "checker_score", scored)
            if adapter != reference:
                lp = token_logprobs(backbone, prompt_ids, res["response_ids"], adapter)
                ref = token_logprobs(backbone, prompt_ids, res["response_ids"], reference)
                _with_ci(row, "kl_to_reference", k3_kl(lp, ref))
                if pair_ids is not None:  # the reference's log-probs of the pairs, once
                    ref_pairs = ref_pairs or [sequence_logprobs(backbone, pair_ids[0], ids, reference)
                                              for ids in pair_ids[1:]]
                    margin = [sequence_logprobs(backbone, pair_ids[0], ids, adapter) - r
                              for ids, r in zip(pair_ids[1:], ref_pairs)]
                    _rate(row, "implicit_reward_accuracy", _ranked(*margin))
            else:
                row["kl_to_reference"], row["kl_to_reference_ci"] = 0.0, [0.0, 0.0]
            responses = tok.batch_decode(res["response_ids"], skip_special_tokens=True)
            if rm is not None:
                _with_ci(row, "rm_score", rm.score(prompts, responses).tolist())
            if judge is not None:
                judged[label] = judge.score(prompts, responses).tolist()
                _with_ci(row, "judge_score", judged[label])
            report[label] = row
        if judge is not None and baseline in judged:
            for label, row in report.items():
                if label == baseline:
                    continue
                outcomes = stats.wins(judged[label], judged[baseline])
                row["win_rate_vs"] = baseline
                row["win_rate"], ci = stats.win_rate(judged[label], judged[baseline])
                row["win_rate_ci"] = list(ci)
                diff = [a - b for a, b in zip(lengths[label], lengths[baseline])]
                row["lc_win_rate"], ci = stats.lc_win_rate(outcomes, diff)
                row["lc_win_rate_ci"] = list(ci)
    return report


def reward_model_report(backbone, examples: list, reward_models: dict) -> dict:
    """``{label: {"pairwise_accuracy", "pairwise_accuracy_ci", "n"}}``: how often each reward model scores the
    chosen response above the rejected one (ties half, Wilson interval); {} without preference examples."""
    if not examples or not all(isinstance(e, PrefExample) for e in examples):
        return {}
    prompts = [ex.prompt for ex in examples]
    out = {}
    for label, rm in reward_models.items():
        row = {"n": len(examples)}
        _rate(row, "pairwise_accuracy", _ranked(rm.score(prompts, [e.chosen for e in examples]),
                                                rm.score(prompts, [e.rejected for e in examples])))
        out[label] = row
    return out


def report_scalars(report: dict) -> dict[str, float]:
    """``{"<label>/<metric>": value}`` of a :func:`policy_report`'s numbers: what a stage logs as its eval row."""
    return {f"{label}/{k}": v for label, row in report.items() if isinstance(row, dict) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


POLICY_STAGES = ("sft", "dpo", "kto", "ppo", "grpo", "compose")
RM_TABLE = "eval_reward_models.json"


def finished_rm(path: str | Path) -> str:
    """Why ``path`` is not a finished ``rm`` stage folder ('' if it is one)."""
    import json

    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    try:
        stage = json.loads((path / "manifest.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return f"{path} has no readable manifest.json (not a finished stage)"
    if stage != "rm":
        return f"{path} is a finished {stage!r} stage, not rm"
    missing = [f for f in ("head.safetensors", "adapter_model.safetensors") if not (path / f).is_file()]
    return f"{path} lacks {', '.join(missing)}" if missing else ""


def compare_run(run_dir: str | Path, model_cfg, eval_data: str, gen_cfg: GenerationConfig, limit: int = 0,
                bad_rows: str = "error", judge: str = "", baseline: str = "sft") -> dict:
    """The base and every finished policy stage of a run, on one backbone, against the SFT reference; writes
    ``eval_table.json`` (the policies) and, with preference rows, :data:`RM_TABLE` (the reward models)."""
    from deltalign.core import atomic
    from deltalign.model.backbone import Backbone
    from deltalign.data.formats import load_rows, prompt_examples
    from deltalign.rewards.model import RewardModel

    run_dir = Path(run_dir)
    backbone = Backbone.load(model_cfg)
    policies: dict[str, str | None] = {"base": None}
    for stage in POLICY_STAGES:
        if (run_dir / stage / "manifest.json").exists():
            backbone.load_adapter(stage, run_dir / stage, trainable=False)
            policies[stage] = stage
    reference = "sft" if "sft" in policies else None
    examples = prompt_examples(load_rows(eval_data, "test"), eval_data, bad_rows)[: limit or None]
    rms = {}
    if (run_dir / "rm" / "manifest.json").exists():
        rms["rm"] = RewardModel.load(backbone, run_dir / "rm")
    if judge:
        rms["judge"] = RewardModel.load(backbone, judge, name="judge")
    report = policy_report(backbone, examples, gen_cfg, policies, reference, reward_model=rms.get("rm"),
                           judge=rms.get("judge"), baseline=baseline, pairs=True)
    atomic.write_json(run_dir / "eval_table.json", report)
    with eval_mode(backbone):
        rm_report = reward_model_report(backbone, examples, rms)
    if rm_report:
        atomic.write_json(run_dir / RM_TABLE, rm_report)
    elif (run_dir / RM_TABLE).exists():  # an earlier eval's, on other rows
        (run_dir / RM_TABLE).unlink()
    return report


def _cell(row: dict, name: str, fmt: str) -> str:
    if row.get(name) is None:
        return "—"
    lo, hi = row.get(f"{name}_ci") or (None, None)
    text = format(row[name], fmt)
    return text if lo is None else f"{text} [{format(lo, fmt)}, {format(hi, fmt)}]"


def markdown_table(report: dict, reward_models: dict | None = None) -> str:
    """The policies (and, when given, the reward models' accuracies), each score with its 95% interval."""
    rows = list(report.items())
    cols = [("win rate vs " + str(next((r["win_rate_vs"] for _, r in rows if "win_rate_vs" in r), "")), "win_rate", ".2f"),
            ("length-controlled win rate", "lc_win_rate", ".2f"), ("judge score", "judge_score", ".3f"),
            ("checker score", "checker_score", ".2f"), ("reward-model score", "rm_score", ".3f"),
            ("KL to SFT", "kl_to_reference", ".3f"), ("mean response tokens", "mean_response_tokens", ".1f"),
            ("implicit-reward accuracy", "implicit_reward_accuracy", ".2f")]
    cols = [c for c in cols if any(r.get(c[1]) is not None for _, r in rows)
            or c[1] in ("kl_to_reference", "mean_response_tokens")]
    lines = ["| policy | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_cell(row, c[1], c[2]) for c in cols) + " |" for label, row in rows]
    if reward_models:
        lines += ["", "| reward model | pairwise accuracy | held-out pairs |", "|---|---|---|"]
        lines += [f"| {label} | {_cell(row, 'pairwise_accuracy', '.2f')} | {row['n']} |"
                  for label, row in reward_models.items()]
    n = next((r["n"] for _, r in rows), None)
    if n is not None:
        paired = ", paired for win rates" if any(c[1] == "win_rate" for c in cols) else ""
        lines += ["", f"{n} held-out prompts; [low, high]: 95% intervals (bootstrap over prompts{paired}; Wilson "
                      "for rates and accuracies)."]
    return "\n".join(lines)
