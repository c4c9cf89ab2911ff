"""Faults a user meets (issue 34): each ends in one line naming the culprit and exit 2 (Ctrl-C 130, SIGTERM 143),
and nothing a crash leaves in the run directory blocks the next ``run``, ``status`` or ``run --force``."""

import errno
import json
import shutil
import signal

import pytest

from deltalign.pipeline import cli, graph
from deltalign.pipeline.cli import main

TINY = ["--config", "configs/tiny.yaml"]


def _one_line(capsys, rc, want_rc, *names):
    err = capsys.readouterr().err.strip()
    assert rc == want_rc, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


def test_doctor_names_a_truncated_safetensors_file(tmp_path, capsys):
    model = shutil.copytree("models/tiny-llama", tmp_path / "m")
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    rc = main(["doctor", "sft", *TINY, "--set", f"model.path={model}", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 2 and "FAIL" in out and "model.safetensors" in out, out


def test_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc = main(["run", "sft", *TINY, "--run-dir", str(f)])
    _one_line(capsys, rc, 2, str(f), "not a directory")
    assert f.read_text() == "x"


def test_unwritable_run_dir(tmp_path, capsys, monkeypatch):
    """A read-only file system (EROFS at the lock, the first write): one line naming the path."""
    real = open

    def ro_open(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr("builtins.open", ro_open)
    rc = main(["run", "sft", *TINY, "--run-dir", str(tmp_path / "run")])
    _one_line(capsys, rc, 2, str(tmp_path / "run"), "Read-only file system")


@pytest.mark.parametrize("exc, code, word", [(KeyboardInterrupt, 130, "interrupted"),
                                             (None, 143, "terminated")])
def test_ctrl_c_and_sigterm_end_in_one_line(tmp_path, capsys, monkeypatch, exc, code, word):
    def stop(self, targets, force=False):
        self.current = "sft"
        if exc is None:
            signal.raise_signal(signal.SIGTERM)
        raise exc()

    monkeypatch.setattr(graph.Pipeline, "run", stop)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["run", "sft", *TINY, "--run-dir", str(tmp_path / "run")])
    _one_line(capsys, rc, code, word, "sft", "resumes")
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.fixture(scope="module")
def finished_sft(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(["run", "sft", *TINY, "--set", "sft.max_steps=2", "--run-dir", str(run)]) == 0
    return run


def test_truncated_manifest_is_set_aside_and_the_stage_reruns(finished_sft, tmp_path, capsys):
    run = shutil.copytree(finished_sft, tmp_path / "run")
    m = run / "sft" / "manifest.json"
    m.write_text(m.read_text()[:20])
    args = [*TINY, "--set", "sft.max_steps=2", "--run-dir", str(run)]
    assert main(["status", "sft", *args]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "manifest.json" in out, out
    assert main(["run", "sft", *args]) == 0
    out = capsys.readouterr()
    assert "manifest.json unreadable; previous output kept in" in out.out and "Traceback" not in out.err, out
    assert json.loads(m.read_text())["status"] == "done"
    assert list((run / ".history").iterdir())  # the unreadable output is kept, not deleted
    m.write_text("{")
    assert main(["run", "sft", "--force", *args]) == 0
    assert json.loads(m.read_text())["status"] == "done"


def test_truncated_started_json_does_not_block(finished_sft, tmp_path, capsys):
    run = shutil.copytree(finished_sft, tmp_path / "run")
    (run / "sft" / "manifest.json").unlink()
    (run / "sft" / "inputs.json").write_text('{"ha')
    args = [*TINY, "--set", "sft.max_steps=2", "--run-dir", str(run)]
    assert main(["status", "sft", *args]) == 0
    assert main(["run", "sft", *args]) == 0
    assert json.loads((run / "sft" / "manifest.json").read_text())["status"] == "done"
