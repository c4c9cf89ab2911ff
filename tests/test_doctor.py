"""`python -m deltalign doctor`: a short report before a long run; a problem found exits 2."""

import json

from deltalign.pipeline.cli import main


def test_doctor_on_the_tiny_config_is_ready(capsys):
    assert main(["doctor", "sft", "dpo", "--config", "configs/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "chat template is prefix-stable" in out and "differs from EOS" in out
    assert "sft.data: embedded:sft_train (600 rows" in out and "p99" in out
    assert "dpo: ~4 steps of 4 rows" in out and out.strip().endswith("ready to run")


def test_doctor_fails_on_rows_too_long_for_truncation_error(tmp_path, capsys):
    rows = [{"prompt": "word " * 100, "chosen": "yes", "rejected": "no"}, {"prompt": "hi", "chosen": "a", "rejected": "b"}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["doctor", "dpo", "--config", "configs/tiny.yaml", "--set", f"dpo.data={f}", "--set", "dpo.max_length=64",
               "--set", "dpo.truncation=error", "--set", "dpo.reference=base", "--set", "dpo.init=fresh"])
    out = capsys.readouterr().out
    assert rc == 2
    assert any(ln.startswith("FAIL") and "1 of 2 longer ('error' applies)" in ln for ln in out.splitlines()), out


def test_doctor_names_a_missing_model_directory(capsys):
    assert main(["doctor", "sft", "--config", "configs/tiny.yaml", "--set", "model.path=/nope/model"]) == 2
    assert "FAIL  model.path '/nope/model'" in capsys.readouterr().out


def _seconds(name: str, prompt_share: float = 0.0, common: int = 0, checkpointing=False, what: str = "s/step",
             longest: int | None = None, **changes) -> float:
    """The doctor's s/step (or ``what="GiB"``: peak memory) estimate for stage ``name`` of the default config, with
    ``changes`` to its section."""
    import dataclasses
    import re

    from deltalign.model.backbone import ModelConfig
    from deltalign.core import settings as configs
    from deltalign.pipeline.estimate import estimate
    from deltalign.pipeline.graph import sections

    cfg = configs.load(sections(), "configs/default.yaml")[name]
    cfg = dataclasses.replace(cfg, **changes)
    facts = {"params": 134_515_008, "hidden": 576, "layers": 30, "vocab": 49152}  # SmolLM2-135M
    model = ModelConfig(gradient_checkpointing=checkpointing)
    line = estimate(name, cfg, facts, 600, 48.0, 200.0, model, 1, prompt_share=prompt_share, common=common,
                    longest=longest)
    return float(re.search(r"~([\d.]+) " + what, line).group(1))


def test_doctor_time_of_an_online_rl_step_counts_every_pass():
    from deltalign.sampling.generation import GenerationConfig

    # PPO: the rollout (longer responses cost more), the scoring forwards, and each epoch's policy + critic training
    ppo = _seconds("ppo")
    assert _seconds("ppo", passes=4) > 1.5 * ppo
    assert _seconds("ppo", rollout=GenerationConfig(max_new_tokens=96, temperature=1.0)) > 1.3 * ppo
    # a PPO step does more than an SFT step over the same number of rows and tokens (generation, scoring, 2 epochs)
    assert ppo > 3 * _seconds("sft", batch_size=12)
    # GRPO: each prompt has num_generations rows; passes over the rollout
    grpo = _seconds("grpo")
    assert _seconds("grpo", passes=4) > 1.5 * grpo


def test_doctor_time_of_a_pair_counts_its_shared_prompt_once():
    # packed with shared prefixes, a pair's prompt runs once: 3/4 of each sequence shared -> 1.25 sequences' work
    for name in ("rm", "dpo"):
        apart = _seconds(name, prompt_share=0.75, share_prefixes=False)
        assert apart == _seconds(name, prompt_share=0.0)
        assert abs(_seconds(name, prompt_share=0.75) / apart - 1.25 / 2) < 0.05


def test_doctor_measures_the_prompt_share_of_preference_pairs():
    from deltalign.model.backbone import resolve_path
    from deltalign.data.tokenize import load_tokenizer
    from deltalign.core import settings as configs
    from deltalign.pipeline.doctor import Report, check_stage_data
    from deltalign.pipeline.graph import sections, stage_module

    cfgs = configs.load(sections(), "configs/tiny.yaml")
    tok = load_tokenizer(resolve_path(cfgs["model"].path))
    rows, length, share, common, longest = check_stage_data("dpo", cfgs["dpo"], stage_module("dpo"), tok,
                                                            Report(print))
    assert rows > 0 and length > 0 and 0.2 < share < 1
    assert length < longest <= cfgs["dpo"].max_length
    assert 2 <= common < length  # every prompt starts with the chat template's user turn
    assert check_stage_data("sft", cfgs["sft"], stage_module("sft"), tok, Report(print))[2] == 0.0


def test_doctor_time_counts_a_prefix_every_row_shares_once():
    # packed with shared prefixes, the prefix all rows share (a system prompt) runs once per forward
    for name in ("sft", "rm", "dpo", "ppo", "grpo"):
        assert _seconds(name, common=24, share_prefixes=False) == _seconds(name, common=0, share_prefixes=False)
        assert _seconds(name, common=24) < _seconds(name, common=0), name


def test_doctor_time_counts_the_recompute_of_full_checkpointing_only():
    # full checkpointing runs every training forward twice; selective keeps the base's matmuls (no FLOPs again)
    for name in ("sft", "dpo", "ppo"):
        plain = _seconds(name)
        assert _seconds(name, checkpointing=True) > 1.1 * plain, name
        assert _seconds(name, checkpointing="selective") == plain, name


def test_doctor_memory_counts_what_checkpointing_keeps():
    # none: every layer's activations; full: each layer's input, plus one layer's activations in its replay;
    # selective: each layer's input and its base matmuls' outputs, plus the replay's
    for name in ("sft", "dpo"):
        none, full = _seconds(name, what="GiB"), _seconds(name, checkpointing=True, what="GiB")
        selective = _seconds(name, checkpointing="selective", what="GiB")
        assert full < selective < none, (name, full, selective, none)


def test_doctor_memory_is_at_the_longest_row_of_the_data():
    # the peak comes with the batch of the longest rows: max_length only when the data reaches it
    for name in ("sft", "dpo"):
        assert _seconds(name, what="GiB", longest=64) < _seconds(name, what="GiB") == _seconds(
            name, what="GiB", longest=10_000)


def _memory(name: str, checkpointing=False, longest: int = 100, prompt_share: float = 0.0, **changes) -> dict:
    """The doctor's peak-memory estimate for stage ``name`` of the default config, by part (GiB)."""
    import dataclasses

    from deltalign.model.backbone import ModelConfig
    from deltalign.core import settings as configs
    from deltalign.pipeline.estimate import peak_memory
    from deltalign.pipeline.graph import sections

    cfg = dataclasses.replace(configs.load(sections(), "configs/default.yaml")[name], **changes)
    facts = {"params": 134_515_008, "hidden": 576, "layers": 30, "vocab": 49152}  # SmolLM2-135M
    return peak_memory(name, cfg, facts, ModelConfig(gradient_checkpointing=checkpointing), longest, runtime=0.4,
                       prompt_share=prompt_share)


def test_doctor_memory_follows_the_graphs_each_stage_keeps_at_once():
    # SFT: one batch's graph; the logits are chunked, so they stop growing past one chunk of tokens
    sft, sft2 = _memory("sft", batch_size=8), _memory("sft", batch_size=16)
    assert sft2["activations"] == 2 * sft["activations"] and sft2["logits"] == sft["logits"] > 0
    assert _memory("rm")["logits"] == 0  # a scalar head: no vocabulary
    # a pair's prompt runs once when prefixes are shared: at half the length prompt, 1.5 rows' tokens per pair
    for name in ("rm", "dpo"):
        assert _memory(name, prompt_share=0.5)["activations"] == 0.75 * _memory(name)["activations"]
        assert _memory(name, prompt_share=0.5, share_prefixes=False) == _memory(name, share_prefixes=False)
    # PPO: one graph of mini_batch_size rows at a time, whatever the rollout's size; with full checkpointing the
    # first minibatch's policy and critic graphs are alive together (its old log-probs and values come from them,
    # before the advantages), unless dropout is on (then every row gets separate no-grad forwards)
    ppo = _memory("ppo", batch_size=12, mini_batch_size=12)
    assert ppo["activations"] == _memory("sft", batch_size=12)["activations"]
    assert _memory("ppo", batch_size=24, mini_batch_size=12) == ppo
    full = _memory("ppo", True, batch_size=12, mini_batch_size=12)
    assert full["activations"] == 2 * _memory("sft", True, batch_size=12)["activations"]
    assert _memory("ppo", True, batch_size=12, mini_batch_size=12, disable_dropout=False)["activations"] == \
        full["activations"] / 2
    assert _memory("ppo", "selective", mini_batch_size=12)["activations"] == \
        _memory("sft", "selective", batch_size=12)["activations"]
    # GRPO: one forward of forward_batch_size rows at a time, however many rows the rollout has
    grpo = _memory("grpo", batch_size=4, forward_batch_size=16)
    assert _memory("grpo", batch_size=8, forward_batch_size=16) == grpo
    assert grpo["activations"] == _memory("sft", batch_size=16)["activations"]
    assert _memory("grpo", batch_size=1, num_generations=8, forward_batch_size=16)["activations"] == \
        _memory("sft", batch_size=8)["activations"]  # fewer rows than a forward takes
    # every part counts: runtime and weights too
    assert sft["total"] == sum(v for k, v in sft.items() if k != "total") and sft["runtime"] == 0.4


def test_doctor_warns_when_a_stage_would_not_fit_and_says_what_would(capsys, monkeypatch):
    """A stage whose estimated peak exceeds the memory available now gets a warning with the settings that lower
    it and what each would need; with enough memory, none. It stays a warning (the estimate is to ~1.5x)."""
    from deltalign.core import memory

    monkeypatch.setattr(memory, "available", lambda: 1e-3)
    assert main(["doctor", "sft", "ppo", "--config", "configs/tiny.yaml",
                 "--set", "model.gradient_checkpointing=false"]) == 0
    warns = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warn")]
    assert [ln.split()[1] for ln in warns] == ["sft:", "rm:", "ppo:"], warns  # the plan: ppo needs rm
    sft, _, ppo = warns
    assert "more than the 0.0 GiB available" in sft
    assert "model.gradient_checkpointing=true (~" in sft and "model.gradient_checkpointing=selective (~" in sft
    assert "smaller sft.batch_size" in sft and "ppo.mini_batch_size" in ppo
    # under auto (the default) the stage already takes full checkpointing: only the batch is left to suggest
    assert main(["doctor", "sft", "--config", "configs/tiny.yaml"]) == 0
    warn, = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warn")]
    assert "gradient_checkpointing" not in warn and "smaller sft.batch_size" in warn
    monkeypatch.setattr(memory, "available", lambda: 1e3)
    assert main(["doctor", "sft", "ppo", "--config", "configs/tiny.yaml"]) == 0
    assert "warn" not in capsys.readouterr().out


def test_doctor_suggests_only_the_checkpointing_that_lowers_memory():
    """Already at full checkpointing there is nothing lower to suggest but the batch."""
    import dataclasses

    from deltalign.model.backbone import ModelConfig
    from deltalign.core import settings as configs
    from deltalign.pipeline.estimate import memory_advice
    from deltalign.pipeline.graph import sections

    cfg = configs.load(sections(), "configs/default.yaml")["dpo"]
    facts = {"params": 134_515_008, "hidden": 576, "layers": 30, "vocab": 49152}
    off = ModelConfig(gradient_checkpointing=False)
    plain = memory_advice("dpo", cfg, facts, off, 128, 0.4, 0.0, available=1.0)
    assert "=selective" in plain and "=true" in plain and "smaller dpo.batch_size" in plain
    full = memory_advice("dpo", cfg, facts, ModelConfig(gradient_checkpointing=True), 128, 0.4, 0.0, available=1.0)
    assert "gradient_checkpointing" not in full and "smaller dpo.batch_size" in full
    assert memory_advice("dpo", dataclasses.replace(cfg), facts, off, 128, 0.4, 0.0, available=64.0) is None


# --- the memory estimate held to recorded measurements ------------------------------------------------------------

RECORDED_WITHIN = 1.3  # issue 32 goal 2: the estimate within 1.3x of the measured peak


def _newest(pattern: str):
    from pathlib import Path

    files = sorted(f for f in Path("bench/results").glob(pattern) if "quick" not in f.name)
    return files[-1] if files else None


def _recorded_cases():
    """``(what, configs, stage, mode, measured GiB)`` from the result files the code wrote: the demo's stages
    (docs/results/demo.json; the process's peak, evaluation included; checkpointing off, the default then), the
    methods bench's LoRA row (bench/results/methods-*.json; the same, per stage process) and the PPO profile's
    optimise phase per checkpointing mode (bench/results/ppo-profile-*.json)."""
    import dataclasses
    import sys
    from pathlib import Path

    from deltalign.core import settings as configs
    from deltalign.pipeline.graph import sections

    if not Path("models/SmolLM2-135M-Instruct/config.json").exists():
        return []
    cases = []
    demo = json.loads(Path("docs/results/demo.json").read_text())
    default = configs.load(sections(), "configs/default.yaml")
    for stage in ("sft", "rm", "dpo"):
        cases.append((f"demo {stage}", default, stage, False, demo["stage_peak_gib"][stage]))
    if (f := _newest("methods-*.json")) is not None:
        lora = json.loads(f.read_text())["methods"]["lora"]
        cfgs = configs.load(sections(), "configs/default.yaml", lora["overrides"])
        for stage in ("sft", "dpo"):
            cases.append((f"{f.name} lora {stage}", cfgs, stage, False, lora[stage]["peak_rss_mb"] / 1024))
    if (f := _newest("ppo-profile-*.json")) is not None:
        sys.path[:0] = [str(Path("bench").resolve())]
        import common
        import ours

        record = json.loads(f.read_text())
        known = {x.name for x in dataclasses.fields(common.Settings)}
        s = common.Settings(**{k: v for k, v in record["settings"].items() if k in known and k != "extra"})
        for variant, mode in (("default", True), ("no-checkpointing", False), ("selective", "selective")):
            cfgs, _ = ours.build_configs("ppo", dataclasses.replace(s, ppo_gradient_checkpointing=mode))
            peak = record["variants"][variant]["phases"]["optimise"]["peak_rss_mb"] / 1024
            cases.append((f"{f.name} {variant}", cfgs, "ppo", mode, peak))
    return cases


def test_the_memory_estimate_stays_within_the_recorded_peaks():
    """The estimate ``model.gradient_checkpointing: auto`` picks from (deltalign/pipeline/autofit.py, with its
    runtime allowance for a stage process) within 1.3x of each peak a result file recorded for SmolLM2-135M, so
    it cannot drift unnoticed. What it does not hold: the HH workload (no recorded manifest in the repository),
    the other delta methods (the estimator's widths are LoRA's), time per step."""
    import dataclasses

    import pytest

    from deltalign.pipeline import autofit

    cases = _recorded_cases()
    if not cases:
        pytest.skip("models/SmolLM2-135M-Instruct not built (make model)")
    off = []
    for what, cfgs, stage, mode, measured in cases:
        model = dataclasses.replace(cfgs["model"], gradient_checkpointing=mode)
        est = autofit.estimates(stage, cfgs[stage], model, *autofit.measure(cfgs, stage), autofit.RUNTIME_GIB)[mode]
        if not 1 / RECORDED_WITHIN <= measured / est <= RECORDED_WITHIN:
            off.append(f"{what}: estimated {est:.2f} GiB, measured {measured:.2f}")
    assert len(cases) >= 6 and not off, off
