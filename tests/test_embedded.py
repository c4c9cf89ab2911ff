"""Tests for deltalign.data.embedded: determinism, split hygiene, row shapes, and that every row checks out."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from deltalign.data import embedded as E
from deltalign.rewards import checker as C


@pytest.fixture(scope="module")
def data():
    return E.generate()


def _prompt(split, row):
    return row["messages"][0]["content"] if split.startswith("sft") else row["prompt"][0]["content"]


def _chosen(split, row):
    return row["messages"][1]["content"] if split.startswith("sft") else row["chosen"][0]["content"]


def _question(prompt):
    return prompt[: prompt.index("?") + 1]  # every question ends at its first "?"


def test_splits_and_sizes(data):
    assert E.SPLITS == ("sft_train", "sft_eval", "pref_train", "pref_eval")
    assert tuple(data) == E.SPLITS
    assert [len(data[s]) for s in E.SPLITS] == [600, 100, 600, 100]
    small = E.generate(seed=3, n_train=25, n_eval=7)
    assert [len(small[s]) for s in E.SPLITS] == [25, 7, 25, 7]


def test_deterministic(data):
    again = E.generate()
    assert again == data
    assert json.dumps(again) == json.dumps(data)  # same key order, same text
    assert E.generate(seed=1) != data


def test_deterministic_across_hash_seeds():
    code = "import json,hashlib;from deltalign.data import embedded as E;" \
           "print(hashlib.sha256(json.dumps(E.generate(seed=5,n_train=60,n_eval=20)).encode()).hexdigest())"
    root = Path(__file__).resolve().parents[1]
    digests = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(digests) == 1


def test_eval_questions_unseen(data):
    train_q = {_question(_prompt(s, r)) for s in ("sft_train", "pref_train") for r in data[s]}
    eval_q = {_question(_prompt(s, r)) for s in ("sft_eval", "pref_eval") for r in data[s]}
    assert train_q and eval_q and not (train_q & eval_q)
    all_q = {f.question for f in E.facts()}
    assert len(all_q) == len(E.facts()) >= 150  # the bank: distinct questions
    assert (train_q | eval_q) <= all_q


def test_every_kind_in_every_split(data):
    for split in E.SPLITS:
        assert {r["constraint"]["kind"] for r in data[split]} == set(C.KINDS), split
    assert len(C.KINDS) >= 7


def test_prompts_unique_within_split(data):
    for split in E.SPLITS:
        prompts = [_prompt(split, r) for r in data[split]]
        assert len(set(prompts)) == len(prompts), split


def test_row_shapes(data):
    for split in E.SPLITS:
        for r in data[split]:
            if split.startswith("sft"):
                assert set(r) == {"messages", "constraint"}
                assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            else:
                assert set(r) == {"prompt", "chosen", "rejected", "constraint"}
                assert [m["role"] for m in r["prompt"] + r["chosen"] + r["rejected"]] == ["user", "assistant", "assistant"]
            assert json.loads(json.dumps(r)) == r


def test_every_row_checks_out(data):
    for split in E.SPLITS:
        for r in data[split]:
            prompt, c = _prompt(split, r), r["constraint"]
            assert C.parse_constraint(prompt) == c, prompt
            assert prompt == f"{_question(prompt)} {C.describe(c)}"
            assert C.check(c, _chosen(split, r)) == 1.0, (prompt, _chosen(split, r))
            assert C.score(prompt, _chosen(split, r)) == 1.0
            if split.startswith("pref"):
                rej = r["rejected"][0]["content"]
                assert C.check(c, rej) == 0.0, (prompt, rej)
                assert C.score(prompt, rej) == 0.0
                assert rej != _chosen(split, r)


def test_rejected_mixes_natural_answers_and_near_misses(data):
    rows = data["pref_train"]
    natural = {f.answer for f in E.facts()}
    n_natural = sum(r["rejected"][0]["content"] in natural for r in rows)
    assert 0.3 * len(rows) < n_natural < 0.8 * len(rows)


def test_responses_are_short(data):
    words = [len(_chosen(s, r).split()) for s in E.SPLITS for r in data[s]]
    assert max(words) <= 30 and statistics.median(words) < 20


def test_write(tmp_path):
    out = tmp_path / "emb"
    E.write(out, seed=0, n_train=40, n_eval=10)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.jsonl" for s in E.SPLITS)  # no temp files left
    expected = E.generate(seed=0, n_train=40, n_eval=10)
    for split in E.SPLITS:
        lines = (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == (40 if split.endswith("train") else 10)
        assert [json.loads(line) for line in lines] == expected[split]
    E.write(out, seed=0, n_train=40, n_eval=10)  # overwriting is fine and still leaves no temp files
    assert len(list(out.iterdir())) == len(E.SPLITS)


def test_main(tmp_path):
    E.main([str(tmp_path), "--seed", "2", "--n-train", "9", "--n-eval", "9"])
    rows = [json.loads(x) for x in (tmp_path / "pref_eval.jsonl").read_text().splitlines()]
    assert rows == E.generate(seed=2, n_train=9, n_eval=9)["pref_eval"]


def test_the_generated_set_is_stamped_with_every_module_it_comes_from():
    """Facts, formats and constraint wording all shape the rows: a change to any of them regenerates the set."""
    from deltalign.data import facts

    assert {Path(m.__file__).name for m in E.SOURCES} == {"embedded.py", "facts.py", "checker.py"}
    assert facts.facts() == E.facts()  # the banks live in facts.py; embedded draws from them
