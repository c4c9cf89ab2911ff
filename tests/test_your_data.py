"""docs/your-data.md, run as written: its config and every command, on fixture files of each supported shape (made
here, with a few odd rows and a long prompt) and the tiny model in place of "my-model"."""

import json
import re
import shlex
from pathlib import Path

import pytest

from deltalign.core import tiny
from deltalign.pipeline.cli import main

DOC = Path("docs/your-data.md")
FAST = ["sft.max_steps=2", "sft.batch_size=2", "sft.eval_limit=2", "sft.generation.max_new_tokens=4",
        "dpo.max_steps=2", "dpo.batch_size=2", "dpo.eval_limit=2", "dpo.generation.max_new_tokens=4",
        "eval.limit=2", "eval.generation.max_new_tokens=4", "sft.threads=1", "dpo.threads=1"]


def walkthrough() -> tuple[str, list[list[str]]]:
    text = DOC.read_text()
    config = re.search(r"```yaml\n# my.yaml\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.splitlines() if line.startswith("python -m deltalign ")]
    return config, commands


def sft_rows(shape: str, n: int = 8) -> list[dict]:
    if shape == "messages":
        return [{"messages": [{"role": "user", "content": f"Count to {i}."},
                              {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]} for i in range(n)]
    return [{"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(1, i + 2)))} for i in range(n)]


def pref_rows(shape: str, n: int = 8) -> list[dict]:
    if shape == "hh":
        def hh(q, a, earlier=""):
            return f"{earlier}\n\nHuman: {q}\n\nAssistant: {a}"
        rows = [{"chosen": hh(f"Name a colour ({i}).", "Blue."), "rejected": hh(f"Name a colour ({i}).", "No.")}
                for i in range(n)]
        rows.append({"chosen": hh("And?", "Yes.", hh("Hi", "Hello.")), "rejected": hh("And?", "No.", hh("Hi", "Go."))})
        rows.append({"chosen": hh("long " * 150 + "?", "Yes."), "rejected": hh("long " * 150 + "?", "No.")})
        return rows
    rows = [{"prompt": f"Name a colour ({i}).", "chosen": "Blue.", "rejected": "No."} for i in range(n)]
    rows.append({"prompt": "Empty?", "chosen": "", "rejected": "No."})  # an odd row: empty chosen
    rows.append({"prompt": "long " * 150 + "?", "chosen": "Yes.", "rejected": "No."})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("sft_shape,pref_shape", [("messages", "prompt_chosen_rejected"),
                                                  ("prompt_completion", "hh")])
def test_the_walkthrough_runs_as_written(tmp_path, capsys, sft_shape, pref_shape):
    config, commands = walkthrough()
    assert [c[3] for c in commands] == ["doctor", "run", "eval", "export", "generate"]
    data = tmp_path / "data"
    for name, rows in (("sft.jsonl", sft_rows(sft_shape)), ("sft_heldout.jsonl", sft_rows(sft_shape, 3)),
                       ("prefs.jsonl", pref_rows(pref_shape)), ("prefs_heldout.jsonl", pref_rows(pref_shape, 3))):
        _write(data / name, rows)
    my_yaml = tmp_path / "my.yaml"
    my_yaml.write_text(config.replace("data/", f"{data}/").replace("my-model", str(tiny.ensure().resolve())))
    for cmd in commands:
        args = [str(my_yaml) if a == "my.yaml" else a for a in cmd[3:]]
        args += ["--run-dir", str(tmp_path / "runs" / "mine")] + [x for s in FAST for x in ("--set", s)]
        rc = main(args)
        out = capsys.readouterr()
        assert rc == 0, f"{' '.join(cmd)}\n{out.out[-2000:]}\n{out.err[-2000:]}"
        if cmd[3] == "run":  # one odd row per preference file: skipped, logged and counted
            assert "skipped bad row" in out.err
    report = json.loads((tmp_path / "runs" / "mine" / "dpo" / "eval.json").read_text())
    assert report["data"]["train"]["skipped"] == 1 and report["data"]["train"]["rows"] == 10
    assert (tmp_path / "runs" / "mine" / "export" / "model" / "config.json").exists()
