"""bench/run.py on a stock machine (issue 17): ``--device`` / ``--model random:<size>`` and a run with only what a
lent GPU machine has. The whole orchestrator runs here on CPU with ``random:tiny`` (a few M parameters) and one
stage, 2 steps, while ``datasets``, ``deepspeed``, ``bitsandbytes``, ``pyarrow`` and ``trl`` look not installed
(a ``sitecustomize`` on PYTHONPATH hides them from the import system; the bench's children inherit it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = "datasets,deepspeed,bitsandbytes,pyarrow,trl"

# Packages listed in BLOCK_IMPORTS are not found (find_spec -> None, import -> ModuleNotFoundError), as when they
# are not installed: transformers' / accelerate's availability checks then say "not available" too.
BLOCKER = '''
import os
from importlib.machinery import PathFinder

_blocked = {x for x in os.environ.get("BLOCK_IMPORTS", "").split(",") if x}
_orig = PathFinder.find_spec.__func__


def _find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] in _blocked:
        return None
    return _orig(cls, name, path, target)


PathFinder.find_spec = classmethod(_find_spec)
'''


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    mod = sys.modules["bench_common"] = importlib.util.module_from_spec(spec)  # registered: its dataclasses need it
    spec.loader.exec_module(mod)
    return mod


def test_random_shapes_follow_the_documented_rule():
    common = _load_common()
    for size, target in (("0.1b", 1e8), ("0.5b", 5e8), ("1b", 1e9)):
        shape = common.random_shape(size)
        assert shape["hidden_size"] % 192 == 0  # head_dim 64, heads a multiple of 3
        assert shape["num_attention_heads"] == 3 * shape["num_key_value_heads"]
        n = common.llama_params(shape)
        assert abs(n - target) / target < 0.25, (size, n)
    assert common.llama_params(common.random_shape("tiny")) < 5e6
    with pytest.raises(ValueError):
        common.random_shape("big")


def test_quick_run_on_a_stock_machine_random_model_trl_not_run(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}", BLOCK_IMPORTS=BLOCKED,
               BENCH_TRL_PY=sys.executable)  # an interpreter without trl / datasets: TRL's side must be skipped
    check = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('datasets'))"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "None", check  # the blocker works
    p = subprocess.run([sys.executable, "bench/run.py", "--device", "cpu", "--model", "random:tiny", "--quick",
                        "--stages", "sft", "--steps", "2", "--threads", "1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    mds, jsons = sorted(out.glob("*.md")), sorted(out.glob("*.json"))
    assert len(mds) == len(jsons) == 1
    # not a file docs/refresh.py takes for the main bench table (it reads bench/results/[0-9]*.json)
    assert not mds[0].name[0].isdigit() and "cpu" in mds[0].name and "random-tiny" in mds[0].name
    text = mds[0].read_text()
    assert "random:tiny" in text and "cpu" in text and "float32" in text
    d = json.loads(jsons[0].read_text())
    assert d["device"] == "cpu" and d["model"] == "random:tiny" and d["dtype"] == "float32"
    assert 1e6 < d["model_params"] < 5e6
    ours = d["medians"]["sft"]["ours"]
    assert "error" not in ours and ours["tokens_per_s"] > 0
    assert "not run" in d["medians"]["sft"]["trl"]["error"]
    row = next(line for line in text.splitlines() if line.startswith("| SFT | tokens/s"))
    assert row.split("|")[4].strip() == "not run"  # the TRL column
    assert "TRL" in text and "not run" in text.split("Note:", 1)[1]  # with the reason in the notes
