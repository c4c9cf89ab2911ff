"""`deltalign eval`: each policy against a baseline judged by another run's reward model, every score with its
interval, a KL that cannot go negative, reward-model and implicit-reward accuracies on held-out pairs."""

import json
import math

import pytest
import torch

from deltalign.core import settings as configs
from deltalign.pipeline.cli import main
from deltalign.pipeline.graph import Pipeline, sections
from deltalign.reports.evaluation import k3_kl, markdown_table

TINY = ["--config", "configs/tiny.yaml"]


def tiny(*overrides):
    return configs.load(sections(), "configs/tiny.yaml", list(overrides))


def test_k3_is_the_hand_computed_value_and_never_negative():
    # r = ref - pol = [ln 0.5, ln 2]: (0.5 - 1 + ln 2) + (2 - 1 - ln 2) = 0.5
    pol = [torch.tensor([math.log(0.5), math.log(0.25)])]
    ref = [torch.tensor([math.log(0.25), math.log(0.5)])]
    assert k3_kl(pol, ref) == [pytest.approx(0.5)]
    g = torch.Generator().manual_seed(0)
    refs = [-torch.rand(7, generator=g) * 5 for _ in range(50)]
    pols = [r - torch.rand(7, generator=g) for r in refs]  # greedy tokens the reference likes more
    kls = k3_kl(pols, refs)
    assert min(kls) > 0 > sum(float((p - r).sum()) for p, r in zip(pols, refs))  # the log-ratio would be negative
    assert k3_kl([torch.zeros(0)], [torch.zeros(0)]) == [0.0]  # an empty response


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run with sft, rm and dpo, and a judge: another run's rm trained on other rows (the held-out pairs' seed)."""
    root = tmp_path_factory.mktemp("eval")
    Pipeline(tiny("dpo.max_steps=2", "dpo.eval_checker=false"), root / "run").run(["sft", "rm", "dpo"])
    Pipeline(tiny("rm.init=fresh", "rm.seed=7"), root / "judge").run(["rm"])
    return root


def test_eval_judges_each_policy_against_sft_with_intervals(runs, capsys):
    run = runs / "run"
    args = ["eval", *TINY, "--run-dir", str(run), "--limit", "6", "--set", f"eval.judge={runs / 'judge' / 'rm'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    table = json.loads((run / "eval_table.json").read_text())
    assert set(table) == {"base", "sft", "dpo"}
    for label, row in table.items():
        assert row["kl_to_reference"] >= 0, label  # k3: never negative
        for key, value in row.items():  # every score carries its interval, and sits inside it
            if isinstance(value, float) and key not in ("n", "checker_n"):
                lo, hi = row[f"{key}_ci"]
                assert lo - 1e-9 <= value <= hi + 1e-9, (label, key)
    assert "win_rate" not in table["sft"]  # the baseline is not judged against itself
    for label in ("base", "dpo"):
        row = table[label]
        assert row["win_rate_vs"] == "sft" and 0 <= row["win_rate"] <= 1 and 0 <= row["lc_win_rate"] <= 1
        assert {"judge_score", "rm_score", "implicit_reward_accuracy", "mean_response_tokens"} <= set(row)
    rms = json.loads((run / "eval_reward_models.json").read_text())
    assert set(rms) == {"rm", "judge"} and all(0 <= r["pairwise_accuracy"] <= 1 and r["n"] == 6 for r in rms.values())
    assert "| dpo |" in out and "win rate vs sft" in out and "| judge |" in out and "pairwise accuracy" in out
    first = (run / "eval_table.json").read_text()
    assert main(args) == 0  # the same answers, the same bootstrap: the same table
    assert (run / "eval_table.json").read_text() == first


def test_without_a_judge_there_is_no_win_rate_column(runs, capsys):
    run = runs / "run"
    assert main(["eval", *TINY, "--run-dir", str(run), "--limit", "3", "--set", "eval.data=embedded:sft_eval"]) == 0
    out = capsys.readouterr().out
    table = json.loads((run / "eval_table.json").read_text())
    assert all("win_rate" not in r and "implicit_reward_accuracy" not in r for r in table.values())
    assert "win rate" not in out and not (run / "eval_reward_models.json").exists()  # no pairs: no RM table


def test_markdown_table_shows_each_interval():
    row = {"n": 4, "checker_score": 0.5, "checker_score_ci": [0.15, 0.85], "kl_to_reference": 0.1,
           "kl_to_reference_ci": [0.05, 0.2], "mean_response_tokens": 10.0, "mean_response_tokens_ci": [8.0, 12.0]}
    text = markdown_table({"sft": row}, {"rm": {"n": 4, "pairwise_accuracy": 0.75,
                                                "pairwise_accuracy_ci": [0.3, 0.95]}})
    assert "| sft | 0.50 [0.15, 0.85] | 0.100 [0.050, 0.200] | 10.0 [8.0, 12.0] |" in text
    assert "| rm | 0.75 [0.30, 0.95] | 4 |" in text
    no_checker = dict(row, checker_score=None)
    assert "checker" not in markdown_table({"sft": no_checker})  # your own data: no checker column
