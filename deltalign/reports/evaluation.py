"""Held-out comparison of policies that live as adapters on one backbone: checker score, KL, reward-model score.

Each policy generates for the held-out prompts (greedy by default). For every policy the report gives the
embedded checker's score, the mean response length, the KL to the reference estimated on the policy's own
responses (mean over prompts of log pi(y|x) - log pi_ref(y|x), summed over response tokens; exact in
expectation under sampling, a diagnostic under greedy decoding), and, when a reward-model run is given, the
reward model's mean raw score of those responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from deltalign.model.labelled import response_logprobs
from deltalign.model.modes import eval_mode
from deltalign.data.batching import pad_batch
from deltalign.data.tokenize import tokenize_prompt
from deltalign.sampling.generation import GenerationConfig, checker_eval
from deltalign.core.settings import setting


@dataclass
class EvalConfig:
    """The ``eval:`` section: ``python -m deltalign eval`` / ``make eval`` (not a stage: nothing is trained)."""

    data: str = "embedded:pref_eval"
    """Held-out prompts (any supported shape; responses are ignored) on which base and every finished policy
    generate."""
    limit: int = setting(0, ge=0)
    """Use at most this many held-out prompts (0: all; ``--limit`` on the command line overrides it)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for the comparison (greedy by default)."""
    bad_rows: Literal["error", "skip"] = "error"
    """A held-out row with a problem of its own: ``error`` stops naming file/row/field; ``skip`` leaves it out
    (one log line each)."""


@torch.no_grad()
def sequence_logprobs(backbone, prompt_ids: list[list[int]], response_ids: list[list[int]], adapter: str | None,
                      batch_size: int = 16) -> torch.Tensor:
    """Summed log-prob of each response given its prompt, under ``adapter`` (None: adapters off)."""
    out = []
    with backbone.using(adapter):
        for i in range(0, len(prompt_ids), batch_size):
            ps, rs = prompt_ids[i:i + batch_size], response_ids[i:i + batch_size]
            batch = pad_batch([p + r for p, r in zip(ps, rs)], backbone.tokenizer.pad_token_id,
                              labels=[[-100] * len(p) + r for p, r in zip(ps, rs)])
            out.append(response_logprobs(backbone, backbone, batch))
    return torch.cat(out)


def policy_report(backbone, examples: list, gen_cfg: GenerationConfig, policies: dict[str, str | None],
                  reference: str | None, rm_dir: str | Path | None = None, checker: bool = True,
                  reward_model=None) -> dict:
    """``policies`` maps a label (e.g. ``sft``, ``dpo``) to its adapter name (None: the base with adapters off).

    The reward-model score comes from ``reward_model`` (already on this backbone) or is loaded from ``rm_dir``.
    """
    if not examples or not checker:
        return {}
    with eval_mode(backbone):
        rm = reward_model
        if rm is None and rm_dir is not None and Path(rm_dir, "manifest.json").exists():
            from deltalign.rewards.model import RewardModel

            rm = RewardModel.load(backbone, rm_dir)
        prompt_ids = [tokenize_prompt(ex.prompt, backbone.tokenizer, ex.conversational) for ex in examples]
        report = {}
        for label, adapter in policies.items():
            res = checker_eval(backbone, examples, gen_cfg, adapter)
            row = {"checker_score": res["checker_score"], "n": res["n"],
                   "mean_response_tokens": res["mean_response_tokens"], "samples": res["samples"][:3]}
            if adapter != reference:
                lp = sequence_logprobs(backbone, prompt_ids, res["response_ids"], adapter)
                ref = sequence_logprobs(backbone, prompt_ids, res["response_ids"], reference)
                row["kl_to_reference"] = float((lp - ref).mean())
            else:
                row["kl_to_reference"] = 0.0
            if rm is not None:
                responses = [s for s in backbone.tokenizer.batch_decode(res["response_ids"], skip_special_tokens=True)]
                row["rm_score"] = float(rm.score([ex.prompt for ex in examples], responses).mean())
            report[label] = row
    return report


def report_scalars(report: dict) -> dict[str, float]:
    """``{"<label>/<metric>": value}`` of a :func:`policy_report`'s numbers: what a stage logs as its eval row."""
    return {f"{label}/{k}": v for label, row in report.items() if isinstance(row, dict) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


POLICY_STAGES = ("sft", "dpo", "kto", "ppo", "grpo", "compose")


def compare_run(run_dir: str | Path, model_cfg, eval_data: str, gen_cfg: GenerationConfig, limit: int = 0,
                bad_rows: str = "error") -> dict:
    """The base and every finished policy stage of a run, on one backbone, against the SFT reference."""
    from deltalign.core import atomic
    from deltalign.model.backbone import Backbone
    from deltalign.data.formats import load_rows, prompt_examples

    run_dir = Path(run_dir)
    backbone = Backbone.load(model_cfg)
    policies: dict[str, str | None] = {"base": None}
    for stage in POLICY_STAGES:
        if (run_dir / stage / "manifest.json").exists():
            backbone.load_adapter(stage, run_dir / stage, trainable=False)
            policies[stage] = stage
    reference = "sft" if "sft" in policies else None
    examples = prompt_examples(load_rows(eval_data, "test"), eval_data, bad_rows)[: limit or None]
    report = policy_report(backbone, examples, gen_cfg, policies, reference, rm_dir=run_dir / "rm")
    atomic.write_json(run_dir / "eval_table.json", report)
    return report


def markdown_table(report: dict) -> str:
    lines = ["| policy | checker score | reward-model score | KL to SFT | mean response tokens |",
             "|---|---|---|---|---|"]
    for label, row in report.items():
        rm = f"{row['rm_score']:.3f}" if "rm_score" in row else "—"
        checker = "—" if row["checker_score"] is None else f"{row['checker_score']:.2f}"
        lines.append(f"| {label} | {checker} | {rm} | {row['kl_to_reference']:.3f} | "
                     f"{row['mean_response_tokens']:.1f} |")
    return "\n".join(lines)
