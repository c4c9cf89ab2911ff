"""The bench's batch plan (bench/plan.py) and its workloads (issue 31): every side trains the same rows in the same
batches in the same order, and ``--workload`` picks the data, the model, the stages and the result file's name."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import plan  # noqa: E402

TINY = "models/tiny-llama"


@pytest.fixture()
def plans(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "PLANS", tmp_path)
    return tmp_path


def settings(workload: str, **kw) -> common.Settings:
    wl = {k: v for k, v in common.WORKLOADS[workload].items() if k != "model"}
    return common.Settings(**{**wl, "model": TINY, "workload": workload, "steps": 3, "batch_size": 2,
                              "ppo_steps": 2, **kw})


@pytest.mark.parametrize("workload,stage", [("hh", "sft"), ("hh", "dpo"), ("hh", "ppo"), ("embedded", "rm")])
def test_plan_is_our_own_length_grouped_batches_of_rows_that_fit(plans, workload, stage):
    from deltalign.data.batching import length_grouped_batches
    from deltalign.data.tokenize import load_tokenizer

    s = settings(workload)
    tok = load_tokenizer(ROOT / TINY)
    path = plan.build(stage, s, tok)
    meta = plan.read_meta(path)
    rows = plan.conversational_rows(stage, plan.source_of(stage, s), tok)
    fit = [r for r in rows if r[2] <= meta["limit"]]
    want = [[fit[i][0] for i in b] for b in length_grouped_batches([r[2] for r in fit], 2, s.seed, 0)][:meta["steps"]]
    assert plan.step_rows(path) == want
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * meta["steps"] == len(meta["lengths"])
    assert max(meta["lengths"]) <= meta["limit"]
    first = path.read_bytes()
    path.unlink()
    assert plan.build(stage, s, tok).read_bytes() == first  # the same plan every time it is made


def test_our_stage_and_trl_read_the_plan_in_file_order(plans, monkeypatch):
    """Our loader over the plan file gives back the plan's lengths in file order, and with ``follow`` our stage's
    shuffle becomes consecutive batches of that file: step k = lines k*B..k*B+B-1, the rows TRL's sequential
    sampler gives it; the unshuffled calls (statistics, evaluation) are left as they were."""
    import deltalign.stages.sft as sft
    from deltalign.data.formats import load_rows, sft_examples
    from deltalign.data.tokenize import load_tokenizer, tokenize_sft

    tok = load_tokenizer(ROOT / TINY)
    path = plan.build("sft", settings("hh"), tok)
    ours = [len(tokenize_sft(ex, tok, 10 ** 9, "error")["input_ids"]) for ex in sft_examples(load_rows(str(path)), "p")]
    assert ours == plan.read_meta(path)["lengths"]
    theirs = common.sft_rows_for_trl(str(path))
    assert [r["prompt"] + r["completion"] for r in theirs] == [
        __import__("json").loads(x)["messages"] for x in path.read_text().splitlines()]

    monkeypatch.setattr(sft, "length_grouped_batches", sft.length_grouped_batches)
    unshuffled = sft.length_grouped_batches([5, 1, 3, 2], 2, 0, 0, shuffle=False)
    plan.follow("sft")
    assert sft.length_grouped_batches([5, 1, 3, 2, 4, 6], 2, 7, 1) == [[0, 1], [2, 3], [4, 5]]
    assert sft.length_grouped_batches([5, 1, 3, 2], 2, 0, 0, shuffle=False) == unshuffled


def test_every_side_reads_the_plan_when_there_is_one():
    import ours

    s = settings("hh")
    assert f"sft.data={common.HH}" in ours.overrides("sft", s)
    assert "model.gradient_checkpointing=false" in ours.overrides("dpo", s)
    big = common.Settings(**{k: v for k, v in common.WORKLOADS["0.5b"].items() if k != "model"})
    assert "model.gradient_checkpointing=true" in ours.overrides("dpo", big)  # TRL's: common_args, the same flag
    assert (s.max_length, s.max_new_tokens, big.batch_size) == (512, 128, 4)
    s.extra["plans"] = {"sft": "bench/.cache/plans/x.jsonl"}
    assert "sft.data=bench/.cache/plans/x.jsonl" in ours.overrides("sft", s)
    assert common.data_for("sft", s) == "bench/.cache/plans/x.jsonl"
    assert common.data_for("grpo", s) == common.HH  # GRPO: no plan, the workload's source


def test_workload_names_the_result_file_and_picks_data_model_stages():
    import run

    assert run.result_tag("embedded", "cpu", run.DEFAULT_MODEL) == ""  # the main table's names, as before
    assert run.result_tag("hh", "cpu", run.DEFAULT_MODEL) == "hh-"
    assert run.result_tag("0.5b", "cpu", "random:0.5b") == "0.5b-"
    assert run.result_tag("0.5b", "cuda", "random:0.5b") == "0.5b-cuda-random-0.5b-"
    assert run.result_tag("embedded", "cuda", "random:0.5b") == "cuda-random-0.5b-"
    assert common.WORKLOADS["hh"]["pref_data"] == common.WORKLOADS["0.5b"]["sft_data"] == "data/hh/train.jsonl"
    assert common.WORKLOADS["0.5b"]["model"] == "random:0.5b"
    assert "grpo" in common.WORKLOAD_STAGES["embedded"] and "grpo" not in common.WORKLOAD_STAGES["hh"]


def test_make_bench_passes_the_workload():
    out = subprocess.run(["make", "-n", "bench", "WORKLOAD=hh", "STAMP=", "MODEL=", "BENCH_STAMP="], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "bench/run.py --workload hh" in out
    plain = subprocess.run(["make", "-n", "bench", "STAMP=", "MODEL=", "BENCH_STAMP="], cwd=ROOT,
                           capture_output=True, text=True).stdout
    assert "bench/run.py --workload embedded" in plain
