"""Training-curve plots: panels for the metric groups present, one PNG per finished stage, written by `eval`."""

import json

import pytest

from deltalign.reports import plots
from deltalign.pipeline.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def write_stage(run, stage, rows, finished=True):
    d = run / stage
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (d / "manifest.json").write_text(json.dumps({"stage": stage, "hash": "x", "metrics": {}}))
    return d


DPO_ROWS = [{"kind": "setup", "step": 0, "train_pairs": 8}] + [
    {"kind": "train", "step": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.01 * s, "margin": 0.1 * s,
     "grad_norm": 1.0, "lr": 1e-4} for s in (1, 2, 3)] + [
    {"kind": "eval", "step": 3, "dpo/kl_to_reference": 0.4, "dpo/checker_score": 0.8, "dpo/n": 8,
     "samples": [{"prompt": "p"}]}]


def test_series_groups_keys_into_panels():
    panels = plots.series(DPO_ROWS)
    assert list(panels) == ["loss", "reward / margin", "accuracy / score", "KL"]
    assert panels["loss"] == {"train:loss": ([1, 2, 3], [pytest.approx(0.7 - 0.01 * s) for s in (1, 2, 3)])}
    assert set(panels["accuracy / score"]) == {"train:accuracy", "eval:dpo/checker_score"}
    assert panels["KL"] == {"eval:dpo/kl_to_reference": ([3], [0.4])}
    assert all("grad_norm" not in k and "lr" not in k for p in panels.values() for k in p)
    assert list(plots.series([{"kind": "train", "step": 1, "loss": 1.0}])) == ["loss"]


def test_plot_run_writes_a_png_per_finished_stage(tmp_path):
    run = tmp_path / "run"
    write_stage(run, "dpo", DPO_ROWS)
    write_stage(run, "sft", [{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "train", "step": 2, "loss": 1.5},
                             {"kind": "eval", "step": 2, "heldout_loss": 1.6}])
    write_stage(run, "rm", [{"kind": "train", "step": 1, "loss": 0.6}], finished=False)  # unfinished: skipped
    write_stage(run, "empty", [{"kind": "setup", "step": 0}])  # nothing to plot: skipped
    written = plots.plot_run(run)
    assert sorted(p.name for p in written) == ["dpo.png", "sft.png"]
    for p in written:
        assert p.parent == run / "plots" and p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    assert not (run / "plots" / "rm.png").exists() and not list((run / "plots").glob(".*"))
    bad = write_stage(run, "bad", [])
    (bad / "metrics.jsonl").write_text('{"kind": "train"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        plots.plot_stage(bad, tmp_path / "bad.png")


def test_eval_command_writes_plots(tmp_path, monkeypatch, capsys):
    import deltalign.reports.evaluation as evaluation

    run = tmp_path / "run"
    write_stage(run, "sft", [{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "train", "step": 2, "loss": 1.0}])
    calls = []
    monkeypatch.setattr(evaluation, "compare_run", lambda *a, **k: calls.append(a) or {})  # the slow part
    assert main(["eval", "--config", "configs/tiny.yaml", "--run-dir", str(run)]) == 0
    assert calls and (run / "plots" / "sft.png").read_bytes()[:8] == PNG
    assert str(run / "plots" / "sft.png") in capsys.readouterr().out


def test_online_rl_metrics_have_panels():
    from deltalign.reports.plots import panel_of

    assert {k: panel_of(k) for k in ("clip_low", "clip_high", "clipfrac", "entropy", "zero_std", "approx_kl")} == {
        "clip_low": "clipping / entropy", "clip_high": "clipping / entropy", "clipfrac": "clipping / entropy",
        "entropy": "clipping / entropy", "zero_std": "clipping / entropy", "approx_kl": "KL"}
