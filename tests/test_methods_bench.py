"""bench/methods.py (`make methods`), piece by piece: the overrides every method's stage processes get, the time
budget, the step window, reading a real (tiny) run directory, the base row, the table and results files, and the
docs generators. The whole script end to end: `python bench/methods.py --model tiny` (about a minute)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from deltalign.deltas import METHODS
from deltalign.core import settings as configs
from deltalign.pipeline.graph import sections

spec = importlib.util.spec_from_file_location("bench_methods", Path("bench/methods.py"))
mb = sys.modules["bench_methods"] = importlib.util.module_from_spec(spec)  # registered: its dataclasses need it
spec.loader.exec_module(mb)


def _cfgs(extra=()):
    return configs.load(sections(), "configs/default.yaml", list(extra))


def test_every_method_has_a_learning_rate_and_its_overrides_load():
    assert set(mb.SFT_LR) == set(METHODS) == set(mb.FACTOR)
    cfgs = _cfgs()
    for m in METHODS:
        sets = mb.overrides(m, mb.QUICK, cfgs, 2, "embedded:sft_eval", "embedded:pref_eval")
        c = _cfgs(sets)
        assert c["sft"].delta.method == m and c["sft"].lr == mb.SFT_LR[m]
        assert c["dpo"].lr == pytest.approx(mb.SFT_LR[m] * cfgs["dpo"].lr / cfgs["sft"].lr, rel=1e-3)
        assert (c["sft"].max_steps, c["dpo"].max_steps) == (mb.QUICK.sft_steps, mb.QUICK.dpo_steps)
        assert c["sft"].checkpoint_every == c["dpo"].checkpoint_every == 0  # nothing written inside the window
        assert c["sft"].log_every == c["dpo"].log_every == 1  # a timestamp per step
        assert not c["sft"].eval_checker and c["dpo"].eval_checker and c["dpo"].eval_limit == mb.QUICK.heldout_pairs
        assert (c["dpo"].reference, c["dpo"].init) == ("sft", "sft")
    # the LoRA row is the shipped pipeline's own learning rates
    assert mb.lrs("lora", cfgs) == (cfgs["sft"].lr, cfgs["dpo"].lr)


def test_the_budgets_fit_the_time_limits():
    every = list(METHODS)
    assert mb.estimate_seconds(mb.FULL, every)["total"] < 150 * 60
    assert mb.estimate_seconds(mb.QUICK, every)["total"] < 20 * 60
    # FULL is the shipped budget: one SFT epoch, dpo.epochs of DPO, batches of configs/default.yaml
    c = _cfgs()
    sft_steps = math.ceil(600 / c["sft"].batch_size * c["sft"].epochs)
    assert mb.FULL.sft_steps == sft_steps
    assert mb.FULL.dpo_steps == math.ceil(math.ceil(600 / c["dpo"].batch_size) * c["dpo"].epochs)


def test_step_window_skips_the_warm_up_and_needs_enough_steps():
    rows = [{"kind": "setup", "step": 0, "time": 5.0}, {"kind": "eval_base", "step": 0, "time": 9.0}]
    rows += [{"kind": "train", "step": i, "time": 10.0 + 4 * i} for i in range(1, 6)]
    rows += [{"kind": "eval", "step": 5, "time": 99.0}]
    w = mb.step_window(rows)
    assert w["timed_steps"] == 5 - mb.WARMUP_STEPS
    assert w["s_per_step"] == pytest.approx(4.0)
    assert mb.step_window(rows[:3]) is None  # only the warm-up step ran


def test_collect_a_tiny_run_and_the_base_row(tmp_path, capsys):
    """A real prompt-tuning SFT -> DPO on the tiny model (in this process), read as the script reads it."""
    from deltalign.pipeline.cli import main as cli

    cfgs = configs.load(sections(), mb.TINY_CONFIG)
    budget = mb.Budget(sft_steps=3, dpo_steps=2, heldout_rows=4, heldout_pairs=4)
    sft_eval = mb.heldout_file(cfgs["sft"].eval_data, 4, "sft_eval", tmp_path / "data")
    pref_eval = mb.heldout_file(cfgs["dpo"].eval_data, 4, "pref_eval", tmp_path / "data")
    assert len(Path(sft_eval).read_text().splitlines()) == 4
    sets = mb.overrides("prompt", budget, cfgs, 1, sft_eval, pref_eval)
    run = tmp_path / "prompt"
    assert cli(["run", "sft", "dpo", "--config", mb.TINY_CONFIG, "--run-dir", str(run),
                *[a for s in sets for a in ("--set", s)]]) == 0

    n_base = mb.base_parameters(mb.model_dir("tiny"))
    from deltalign.model.backbone import Backbone, ModelConfig
    assert n_base == sum(p.numel() for p in Backbone.load(ModelConfig(path="tiny")).causal_lm.parameters())
    r = mb.collect(run, n_base)
    prompt_length = cfgs["sft"].delta.prompt_length
    assert r["trainable_params"] == prompt_length * 32  # tiny hidden size
    assert r["trainable_pct"] == pytest.approx(100 * r["trainable_params"] / n_base)
    assert r["adapter_bytes"] > r["trainable_params"] * 4  # float32 values + header + config
    assert r["sft"]["heldout_loss"] > 0 and r["sft"]["base_heldout_loss"] > 0
    assert r["sft"]["window"]["timed_steps"] == 2 and r["dpo"]["window"]["timed_steps"] == 1
    d = r["dpo"]
    assert d["n_prompts"] == 4 and d["heldout_pairs"] == 4
    assert 0 <= d["checker_after_sft"] <= 1 and 0 <= d["checker_after_dpo"] <= 1
    assert 0 <= d["heldout_pair_accuracy"] <= 1

    capsys.readouterr()
    assert mb.base_eval_child(mb.TINY_CONFIG, sets) == 0
    res = mb.parse_result(capsys.readouterr().out)
    assert res["n"] == 4 and 0 <= res["checker_score"] <= 1 and res["peak_rss_mb"] > 0


def _fake_results(quick=False, tiny=False):
    ok = {"trainable_params": 4_884_480, "trainable_pct": 3.63, "adapter_bytes": 19_600_000,
          "lr": {"sft": 3e-4, "dpo": 5e-5},
          "sft": {"heldout_loss": 1.234, "window": {"s_per_step": 3.91, "timed_steps": 74}, "peak_rss_mb": 3560.0},
          "dpo": {"checker_after_sft": 0.41, "checker_after_dpo": 0.57, "heldout_pair_accuracy": 0.8,
                  "window": {"s_per_step": 11.4, "timed_steps": 37}, "peak_rss_mb": 5900.0}}
    small = {**ok, "trainable_params": 9216, "trainable_pct": 0.0068, "adapter_bytes": 37_000,
             "lr": {"sft": 1e-2, "dpo": 1.667e-3}}
    return {
        "methods": {"lora": ok, "prompt": small, "dora": {"error": "sft: exit 1", "sft": {}, "dpo": {}}},
        "base": {"heldout_loss": 1.9, "checker_score": 0.12, "n": 100},
        "started": "2026-11-28T10:00:00+00:00", "finished": "2026-11-28T12:10:00+00:00", "wall_s": 7800.0,
        "quick": quick, "tiny": tiny, "commit": "abc1234",
        "machine": {"cpu": "AMD EPYC", "logical_cpus": 2, "usable_cpus": 2, "ram_gb": 23.5, "python": "3.11.7",
                    "kernel": "6", "versions": {"torch": "2.13.0"}},
        "load_before": [0.1, 0, 0], "load_after": [2.0, 0, 0], "load_after_each_method": [2.0], "contended": False,
        "budget": {"sft_steps": 75, "dpo_steps": 38, "heldout_rows": 0, "heldout_pairs": 0},
        "estimate_s": {"total": 7800.0}, "work_dir": "runs/methods/x",
        "settings": {"model": "models/SmolLM2-135M-Instruct", "config": "configs/default.yaml", "dtype": "float32",
                     "threads": 2, "seed": 0, "sft_data": "embedded:sft_train", "dpo_data": "embedded:pref_train",
                     "sft_eval": "embedded:sft_eval", "dpo_eval": "embedded:pref_eval", "sft_batch_size": 8,
                     "dpo_batch_size": 8, "max_length": 256, "dpo_loss": "sigmoid", "dpo_beta": 0.1,
                     "dpo_nll_weight": 1.0, "max_new_tokens": 48, "dpo_lr_ratio": 1 / 6},
    }


def test_table_and_results_files(tmp_path):
    res = _fake_results()
    res["table_markdown"] = mb.table(res)
    lines = res["table_markdown"].splitlines()
    assert lines[0].startswith("| method | trainable params | % of base | adapter on disk")
    assert len(lines) == 2 + 1 + 3  # header, rule, base, three methods
    assert all(line.count("|") == len(mb.HEADER) + 1 for line in lines)
    base, lora, prompt, dora = lines[2:]
    assert base.startswith("| base (no delta) | 0 | 0% |") and "| 1.900 | 0.12 |" in base
    assert ("| 4.88M | 3.63% | 18.7 MiB | 0.0003 / 5e-05 | 1.234 | 0.41 | 0.57 | 0.80 | 3.91 | 11.40 | 3.48 GB | "
            "5.76 GB |") in lora
    assert "| 9.22K | 0.0068% | 36.1 KiB | 0.01 / 0.001667 |" in prompt
    assert dora.startswith("| dora | failed: sft: exit 1 |")

    mb.write(res, tmp_path, "methods-2026-11-28-1000")
    md = (tmp_path / "methods-2026-11-28-1000.md").read_text()
    assert res["table_markdown"] in md and "Commit abc1234" in md and "- dora: sft: exit 1" in md
    saved = json.loads((tmp_path / "methods-2026-11-28-1000.json").read_text())
    assert {"machine", "commit", "settings", "budget", "methods", "base", "table_markdown"} <= set(saved)

    block = mb.results_block(tmp_path)
    assert block.startswith(res["table_markdown"]) and "`bench/results/methods-2026-11-28-1000.json`" in block
    # newer QUICK and tiny results never replace a full one in the docs
    for stamp, kw in (("methods-2026-11-29-1000-quick", {"quick": True}), ("methods-2026-11-30-1000-quick-tiny",
                                                                            {"quick": True, "tiny": True})):
        r = _fake_results(**kw)
        r["table_markdown"] = "QUICK TABLE"
        mb.write(r, tmp_path, stamp)
    assert mb.newest_full(tmp_path).name == "methods-2026-11-28-1000.json"
    assert mb.results_block(tmp_path).startswith(res["table_markdown"])
    assert mb.results_block(tmp_path / "none").startswith("_No `make methods` result yet._")
    # until a full run exists, the newest QUICK one (not tiny) is shown, labelled
    (tmp_path / "methods-2026-11-28-1000.json").unlink()
    quick = mb.results_block(tmp_path)
    assert quick.startswith("**QUICK=1 budget") and "QUICK TABLE" in quick and "quick-tiny" not in quick


def test_capability_table_lists_every_method():
    rows = mb.capability_table().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == [f"`{m}`" for m in METHODS]
    for row, m in zip(rows, METHODS.values()):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[3].startswith("yes" if m.mergeable else "no")
        assert cells[5] == ("yes" if m.prompt_learning else "no")
        assert cells[6] == ("yes" if m.name == "lora" else "no")  # only LoRA composes
