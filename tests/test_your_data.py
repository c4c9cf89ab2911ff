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


# --- HH-style rows as SFT data: the chosen dialogue, the loss on its last assistant turn (or on all of them) ------

HH_ROW = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: And?\n\nAssistant: Yes.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: And?\n\nAssistant: No."}


def test_an_hh_row_is_an_sft_row_of_its_chosen_dialogue():
    from deltalign.data.formats import sft_examples

    (ex,) = sft_examples([HH_ROW], "hh.jsonl")
    assert ex.conversational and ex.completion == "Yes." and ex.prompt_field == "chosen"
    assert ex.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "And?"}]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    (ex2,) = sft_examples([{"chosen": msgs, "rejected": msgs[:1] + [{"role": "assistant", "content": "Go."}]}], "m")
    assert ex2.prompt == msgs[:1] and ex2.completion == "Hello."  # message-list preference rows too


def test_loss_on_all_labels_every_assistant_turn():
    from deltalign.core.tiny import build_tokenizer
    from deltalign.data.formats import sft_examples
    from deltalign.data.tokenize import tokenize_sft

    tok = build_tokenizer()
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    (ex,) = sft_examples([HH_ROW], "hh.jsonl")
    last, every = tokenize_sft(ex, tok, 256), tokenize_sft(ex, tok, 256, loss_on="all")
    assert every["input_ids"] == last["input_ids"]

    def labelled(item):
        return tok.decode([t for t in item["labels"] if t != -100])

    assert labelled(last) == "Yes.<|im_end|>\n"
    assert labelled(every) == "Hello.<|im_end|>\nYes.<|im_end|>\n"
    n = len(every["input_ids"])
    cut = tokenize_sft(ex, tok, n - 3, truncation="keep_end", loss_on="all")  # the prompt cut from the left
    assert len(cut["input_ids"]) == n - 3 and cut["labels"][-3:] == every["labels"][-3:]
    assert [t for t in cut["labels"] if t != -100] == [t for t in every["labels"][3:] if t != -100]


def test_an_hh_row_whose_final_answer_is_empty_names_its_row():
    from deltalign.data.formats import sft_examples
    from deltalign.data.rows import DataError

    bad = {"chosen": "\n\nHuman: Hi\n\nAssistant:  ", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}
    with pytest.raises(DataError, match=r"hh.jsonl: row 1: field 'chosen': the final assistant answer is empty"):
        sft_examples([HH_ROW, bad], "hh.jsonl")
    assert len(sft_examples([HH_ROW, bad], "hh.jsonl", bad_rows="skip", log=lambda line: None)) == 1


# --- docs/recipes/hh.md, run as written on a few rows of each data/hh file ------------------------------------------

RECIPE = Path("docs/recipes/hh.md")
RECIPE_FAST = ["sft.max_steps=2", "sft.batch_size=2", "rm.max_steps=2", "rm.batch_size=2", "dpo.max_steps=2",
               "dpo.batch_size=2", "dpo.eval_limit=2", "dpo.generation.max_new_tokens=4", "ppo.max_steps=1",
               "ppo.batch_size=2", "ppo.mini_batch_size=2", "ppo.eval_limit=2", "ppo.rollout.max_new_tokens=4",
               "ppo.generation.max_new_tokens=4", "eval.limit=3", "eval.generation.max_new_tokens=4",
               "sft.threads=1", "rm.threads=1", "dpo.threads=1", "ppo.threads=1", "sft.delta.r=2", "dpo.delta.r=2"]


def _short_rows(path: Path, n: int) -> list[str]:
    """The ``n`` shortest rows of a data/hh file (the tiny model's tokenizer spends a token per byte)."""
    return sorted(path.read_text().splitlines(), key=len)[:n]


def test_the_hh_recipe_runs_as_written(tmp_path, capsys):
    text = RECIPE.read_text()
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.splitlines() if line.startswith("python -m deltalign ")]
    assert [c[3] for c in commands] == ["doctor", "run", "run", "eval"]
    assert "Figures: not yet measured" in text and "[docs/recipes/hh.md](docs/recipes/hh.md)" in Path("README.md").read_text()
    data = tmp_path / "data" / "hh"
    data.mkdir(parents=True)
    for name, n in (("train", 8), ("judge", 6), ("heldout", 4)):
        rows = _short_rows(Path("data/hh") / f"{name}.jsonl", n)
        assert set(rows) <= set((Path("data/hh") / f"{name}.jsonl").read_text().splitlines())
        (data / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    parts = [set((Path("data/hh") / f"{n}.jsonl").read_text().splitlines()) for n in ("train", "judge", "heldout")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # three disjoint parts
    config = tmp_path / "hh.yaml"
    config.write_text(Path("configs/hh.yaml").read_text().replace("data/hh/", f"{data}/")
                      .replace("models/SmolLM2-135M-Instruct", str(tiny.ensure().resolve())))
    runs = tmp_path / "runs"
    where = ["run.root=" + str(runs), f"eval.judge={runs / 'hh-judge' / 'rm'}"]
    for cmd in commands:
        args = [str(config) if a == "configs/hh.yaml" else a.replace("data/hh/", f"{data}/") for a in cmd[3:]]
        rc = main(args + [x for s in RECIPE_FAST + where for x in ("--set", s)])
        out = capsys.readouterr()
        assert rc == 0, f"{' '.join(cmd)}\n{out.out[-2000:]}\n{out.err[-2000:]}"
    assert json.loads((runs / "hh-judge" / "rm" / "manifest.json").read_text())["stage"] == "rm"
    assert not (runs / "hh-judge" / "sft").exists()  # the judge shares nothing with the policy side
    table = json.loads((runs / "hh" / "eval_table.json").read_text())
    assert set(table) == {"base", "sft", "dpo", "ppo"}
    for label in ("base", "dpo", "ppo"):
        assert table[label]["win_rate_vs"] == "sft" and "lc_win_rate_ci" in table[label]
        assert table[label]["kl_to_reference"] >= 0 and table[label]["checker_score"] is None
    assert set(json.loads((runs / "hh" / "eval_reward_models.json").read_text())) == {"rm", "judge"}
