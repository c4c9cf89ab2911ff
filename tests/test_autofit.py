"""``model.gradient_checkpointing: auto`` (the default): each training stage's checkpointing picked before its
model loads, from the peak-memory estimate and a memory budget; an explicit setting wins; the choice never changes
a loss or a content hash; the bench pins its own."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from deltalign.core import memory
from deltalign.core import settings as configs
from deltalign.pipeline import autofit
from deltalign.pipeline.cli import main
from deltalign.pipeline.graph import Pipeline, sections

ESTIMATES = {False: 9.1, "selective": 6.2, True: 4.0}


def tiny(*overrides):
    return configs.load(sections(), "configs/tiny.yaml", list(overrides))


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)


# --- the choice: estimates + budget -> mode + reason (a pure function) -------------------------------------------

@pytest.mark.parametrize("budget, mode", [(10.0, False), (9.1, False), (7.5, "selective"), (5.0, True)])
def test_the_fastest_mode_that_fits_the_budget(budget, mode):
    got, reason = autofit.choose(ESTIMATES, budget)
    assert got == mode
    word = {False: "false", "selective": "selective", True: "true"}[mode]
    assert reason.startswith(f"model.gradient_checkpointing=auto -> {word}: ")
    assert f"estimated 9.1 GiB without, 6.2 selective, 4.0 full, budget {budget:.1f} GiB" in reason


def test_over_budget_even_at_full_it_takes_full_and_says_what_else_to_lower():
    mode, reason = autofit.choose(ESTIMATES, 3.0)
    assert mode is True and "over the budget even so" in reason


def test_an_unknown_budget_keeps_checkpointing_off():
    mode, reason = autofit.choose(ESTIMATES, None)
    assert mode is False and "budget unknown" in reason


# --- the budget --------------------------------------------------------------------------------------------------

def test_the_budget_setting_wins_over_the_machine(monkeypatch):
    from deltalign.model.backbone import ModelConfig

    monkeypatch.setattr(memory, "available", lambda: 100.0)
    gib, why = autofit.budget(ModelConfig(memory_budget_gib=7.5))
    assert gib == 7.5 and "model.memory_budget_gib" in why


def test_one_process_budget_is_the_memory_available_now_less_a_margin(monkeypatch):
    from deltalign.model.backbone import ModelConfig

    monkeypatch.setattr(memory, "available", lambda: 10.0)
    monkeypatch.setattr(memory, "resident", lambda: 1.0)
    monkeypatch.setattr(memory, "on_device", lambda: False)
    gib, why = autofit.budget(ModelConfig())
    assert gib == pytest.approx(1.0 + 10.0 * (1 - autofit.MARGIN)) and "available" in why
    monkeypatch.setattr(memory, "available", lambda: None)
    assert autofit.budget(ModelConfig())[0] is None


def test_several_processes_budget_from_total_memory_the_same_on_every_rank(monkeypatch):
    """Under accelerate/ZeRO no process group exists before a stage's model loads, so every process computes the
    same budget from what is the same on each: the settings and the machine's total memory (never what is free now,
    which the other processes are changing)."""
    from deltalign.model.backbone import ModelConfig

    monkeypatch.setattr(memory, "on_device", lambda: False)
    monkeypatch.setattr(memory, "total", lambda: 24.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    seen = set()
    for free in (3.0, 9.0):  # whatever is free when each rank looks
        monkeypatch.setattr(memory, "available", lambda: free)
        seen.add(autofit.budget(ModelConfig()))
    (gib, why), = seen
    assert gib == pytest.approx(24.0 / 2 * (1 - autofit.MARGIN)) and "total" in why
    monkeypatch.setattr(memory, "resident", lambda: 3.3)  # nor what each process holds now
    assert autofit.runtime() == autofit.RUNTIME_GIB
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert autofit.runtime() == 3.3


# --- resolution of a stage's model config -------------------------------------------------------------------------

def test_an_explicit_setting_always_wins():
    cfgs = tiny("model.gradient_checkpointing=false", "model.memory_budget_gib=0.0001")
    model, line = autofit.resolve_stage(cfgs, "sft")
    assert model.gradient_checkpointing is False and line is None
    cfgs = tiny("model.memory_budget_gib=0.0001")  # auto, a budget nothing fits in
    model, line = autofit.resolve_stage(cfgs, "sft")
    assert model.gradient_checkpointing is True and line.startswith("sft: model.gradient_checkpointing=auto -> true")
    assert cfgs["model"].gradient_checkpointing == "auto"  # the loaded config itself is left as it was
    model, line = autofit.resolve_stage(tiny("model.memory_budget_gib=1000"), "sft")
    assert model.gradient_checkpointing is False and "-> false" in line


def test_auto_is_the_default_and_unresolved_loads_without_checkpointing():
    from deltalign.model.backbone import Backbone, ModelConfig

    assert ModelConfig().gradient_checkpointing == "auto"
    bb = Backbone.load(ModelConfig(path="tiny"))  # eval, export, generate: no training, nothing to resolve
    assert not getattr(bb.causal_lm, "is_gradient_checkpointing", False)


def test_memory_budget_is_not_hashed():
    assert Pipeline(tiny("model.memory_budget_gib=3")).hash("sft") == Pipeline(tiny()).hash("sft")


# --- the choice never changes a loss or a hash -------------------------------------------------------------------

QUICK = ["--set", "sft.eval_data=", "--set", "dpo.eval_data=", "--set", "sft.eval_checker=false",
         "--set", "dpo.eval_checker=false"]


def losses(run: Path, stage: str) -> list[float]:
    rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_the_choice_never_changes_the_losses_and_a_run_stays_up_to_date_under_auto(tmp_path, capsys):
    """sft then dpo on the tiny model, seed fixed, with each choice (auto forced to full by a budget nothing fits
    in): the same losses to 1e-6. A run directory made with an explicit false is up to date under auto."""
    runs = {}
    for name, sets in {"false": ["model.gradient_checkpointing=false"],
                       "selective": ["model.gradient_checkpointing=selective"],
                       "true": ["model.gradient_checkpointing=true"],
                       "auto": ["model.memory_budget_gib=0.0001"]}.items():
        run = tmp_path / name
        args = ["run", "sft", "dpo", "--config", "configs/tiny.yaml", *QUICK, "--run-dir", str(run)]
        assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
        out = capsys.readouterr().out
        runs[name] = {s: losses(run, s) for s in ("sft", "dpo")}
        recorded = yaml.safe_load((run / "sft" / "config.yaml").read_text())["model"]["gradient_checkpointing"]
        assert recorded == {"false": False, "selective": "selective"}.get(name, True)  # what the stage ran with
        if name == "auto":
            assert "sft: model.gradient_checkpointing=auto -> true: estimated" in out
            assert "dpo: model.gradient_checkpointing=auto -> true: estimated" in out
        else:
            assert "gradient_checkpointing=auto" not in out
    assert len(runs["false"]["sft"]) == 6 and len(runs["false"]["dpo"]) == 4
    for name, got in runs.items():
        for stage in ("sft", "dpo"):
            assert got[stage] == pytest.approx(runs["false"][stage], abs=1e-6, rel=1e-6), (name, stage)
    # made with explicit false, up to date under auto (and any budget): the choice is not part of the hash
    assert main(["run", "sft", "dpo", "--config", "configs/tiny.yaml", *QUICK,
                 "--set", "model.memory_budget_gib=0.0001", "--run-dir", str(tmp_path / "false")]) == 0
    out = capsys.readouterr().out
    assert "sft: up to date" in out and "dpo: up to date" in out and "running" not in out


# --- doctor shows the choice -------------------------------------------------------------------------------------

def test_doctor_shows_what_auto_picks_and_what_an_explicit_setting_is(capsys):
    assert main(["doctor", "sft", "--config", "configs/tiny.yaml", "--set", "model.memory_budget_gib=0.0001"]) == 0
    out = capsys.readouterr().out
    assert "note  sft: model.gradient_checkpointing=auto -> true: estimated" in out, out
    assert main(["doctor", "sft", "--config", "configs/tiny.yaml",
                 "--set", "model.gradient_checkpointing=selective"]) == 0
    out = capsys.readouterr().out
    assert "sft: model.gradient_checkpointing=selective (set explicitly)" in out and "auto ->" not in out


# --- the bench pins its own --------------------------------------------------------------------------------------

def test_the_bench_pins_checkpointing_for_every_stage():
    """bench numbers must not move with the machine's free memory: every stage the bench runs sets
    model.gradient_checkpointing to a concrete value, never auto."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "bench")]
    import common
    import methods
    import ours

    for workload in common.WORKLOADS:
        s = common.Settings(**{k: v for k, v in common.WORKLOADS[workload].items() if k != "model"})
        for stage in ("sft", "rm", "dpo", "ppo", "grpo"):
            pins = [o for o in ours.overrides(stage, s) if o.startswith("model.gradient_checkpointing=")]
            assert len(pins) == 1 and pins[0].split("=")[1] in ("false", "true", "selective"), (workload, stage)
    cfgs = methods.load_configs("configs/default.yaml")
    sets = methods.overrides("lora", methods.Budget(1, 1, 0, 0), cfgs, 2, "", "")
    assert "model.gradient_checkpointing=false" in sets
