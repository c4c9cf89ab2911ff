"""The docs state what the code does: generated figure blocks are current, and every default they state is the
default the code (with configs/default.yaml, what `make` uses) really has."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from deltalign.core import settings as configs
from deltalign.pipeline.graph import sections

DOCS = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
# A stated default is an inline code span `section.key: value`; a non-default example is written `section.key=value`.
STATED = re.compile(r"`((?:run|model|sft|rm|dpo|ppo|grpo|export|eval)\.[\w.]+): ([^`]+)`")


def _prose(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)  # fenced blocks are examples, not statements


def test_generated_blocks_are_current():
    p = subprocess.run([sys.executable, "docs/refresh.py", "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_documented_defaults_are_the_code_defaults():
    defaults = configs.load(sections(), "configs/default.yaml")
    stated = [(doc, m) for doc in DOCS for m in STATED.finditer(_prose(doc.read_text()))]
    assert len(stated) >= 3  # the convention is in use
    for doc, m in stated:
        section, *path = m.group(1).split(".")
        value = defaults[section]
        for part in path:
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        assert configs.to_dict(value) == yaml.safe_load(m.group(2)), f"{doc}: `{m.group(0)}` is not the default"


def test_the_convention_catches_a_wrong_default(tmp_path):
    wrong = STATED.search("with `dpo.beta: 0.5` by default").group(2)
    assert yaml.safe_load(wrong) != configs.load(sections(), "configs/default.yaml")["dpo"].beta


def test_a_recorded_demo_carries_each_stage_wall_time_and_peak_memory(tmp_path, monkeypatch):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("refresh", "docs/refresh.py")
    refresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    monkeypatch.setattr(refresh, "RESULTS", tmp_path / "results")
    run = tmp_path / "run"
    for stage, (wall, peak) in {"sft": (120.0, 2.25), "dpo": (100.0, 2.5)}.items():
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps({"wall_time_s": wall,
                                                                "peak_memory": {"host_gib": peak}}))
    row = {"checker_score": 0.5, "kl_to_reference": 0.1, "mean_response_tokens": 10.0, "n": 4}
    (run / "eval_table.json").write_text(json.dumps({"base": row, "sft": row}))
    (run / "plots").mkdir()
    (run / "plots" / "sft.png").write_bytes(b"png")
    refresh.record_demo(run, 300.0, "x")
    assert not (tmp_path / "results").exists()  # `make demo` changes no tracked file: the record stays in the run
    recorded = json.loads((run / "x.json").read_text())
    assert recorded["stage_peak_gib"] == {"sft": 2.25, "dpo": 2.5}
    refresh.publish(run, "x")  # `make docs DEMO=<run>`: a maintainer's step
    assert json.loads((tmp_path / "results" / "x.json").read_text()) == recorded
    assert (tmp_path / "results" / "x-sft.png").read_bytes() == b"png"
    block = refresh.demo("x")
    assert "Stage wall times: sft 2.0 min, dpo 1.7 min" in block
    assert "peak memory per stage (host): sft 2.25 GiB, dpo 2.50 GiB" in block
