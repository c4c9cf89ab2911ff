"""Real data has odd rows and long prompts: ``bad_rows`` decides whether they stop the stage or are skipped and
counted, and held-out rows follow the same ``truncation`` rule as training rows."""

import json

from deltalign.pipeline.cli import main

FAST = ["rm.init=fresh", "rm.max_steps=2", "rm.batch_size=2", "rm.stats_pairs=4", "rm.eval_batch_size=4",
        "rm.max_length=64", "rm.truncation=keep_end"]


def _hh(human: str, answer: str, earlier: str = "") -> str:
    return f"{earlier}\n\nHuman: {human}\n\nAssistant: {answer}"


def _files(tmp_path):
    good = [{"chosen": _hh(f"Name colour {i}.", "Red."), "rejected": _hh(f"Name colour {i}.", "I will not.")}
            for i in range(6)]
    odd_context = {"chosen": _hh("Next?", "Yes.", _hh("Hi", "Hello.")),
                   "rejected": _hh("Next?", "No.", _hh("Hi", "Go away."))}  # differ before the last turn
    empty_answer = {"chosen": _hh("Say it.", ""), "rejected": _hh("Say it.", "No.")}
    train = tmp_path / "hh_train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in good[:2] + [odd_context] + good[2:4] + [empty_answer]))
    long_prompt = {"chosen": _hh("word " * 200 + "ok?", "Yes."), "rejected": _hh("word " * 200 + "ok?", "No.")}
    held = tmp_path / "hh_eval.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in good[4:] + [long_prompt]))
    return train, held


def _run(tmp_path, *sets):
    train, held = _files(tmp_path)
    args = ["run", "rm", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"),
            "--set", f"rm.data={train}", "--set", f"rm.eval_data={held}"]
    for s in FAST + list(sets):
        args += ["--set", s]
    return main(args), train


def test_odd_rows_stop_the_stage_by_default(tmp_path, capsys):
    rc, train = _run(tmp_path)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{train}: row 2" in err  # the first odd row, named before anything trains
    assert not (tmp_path / "run" / "rm").exists()


def test_skip_drops_and_counts_odd_rows_and_held_out_follows_truncation(tmp_path, capsys):
    rc, train = _run(tmp_path, "rm.bad_rows=skip")
    err = capsys.readouterr().err
    assert rc == 0, err
    skipped = [ln for ln in err.splitlines() if ln.startswith("skipped bad row")]
    assert len(skipped) == 2, skipped
    assert f"{train}: row 2" in skipped[0] and f"{train}: row 5: field" in skipped[1]
    ev = json.loads((tmp_path / "run" / "rm" / "eval.json").read_text())
    assert ev["data"]["train"] == {"rows": 6, "skipped": 2, "dropped": 0}
    # the held-out row whose prompt alone is longer than max_length is cut (keep_end), not an error
    assert ev["data"]["eval"] == {"rows": 3, "skipped": 0, "dropped": 0} and ev["after"] is not None
