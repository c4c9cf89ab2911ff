"""Faults a user meets (issue 34): each ends in one line naming the culprit and exit 2 (Ctrl-C 130, SIGTERM 143),
and nothing a crash leaves in the run directory blocks the next ``run``, ``status`` or ``run --force``."""

import errno
import json
import re
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


# ---------------------------------------------------------------------------------------- fault injection
# A crash (os._exit: no cleanup handler runs) at each write or rename the run directory sees, then `run` again:
# the result is that of an uninterrupted run, bit for bit. Each run is a fork of this warm process. `make faults`
# (DELTALIGN_FAULTS=all) sweeps every point; the suite runs a sample.

VOLATILE = {"time", "wall_time_s", "finished_at", "peak_memory", "seconds", "tokens_per_s"}
SWEEP = [*TINY, "--set", "sft.max_steps=4", "--set", "sft.checkpoint_every=1", "--set", "sft.keep_checkpoints=1",
         "--set", "sft.eval_checker=false"]


def _fork(fn) -> int:
    """``fn()``'s return value as the exit code of a forked child (137: it crashed at the injected point)."""
    import os
    import sys
    import traceback

    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _run_in_fork(run, crash_at=0, points=None, args=SWEEP, stages=("sft",)) -> int:
    from deltalign.core import atomic

    def child():
        atomic.CRASH_AT, atomic.POINTS[:] = crash_at, []
        rc = main(["run", *stages, *args, "--run-dir", str(run)])
        if points is not None:
            points.write_text(json.dumps(atomic.POINTS))
        return rc

    return _fork(child)


def _normal(value):
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _result(run) -> dict:
    """Every file a run leaves (JSON without its timings), bytes for the rest; bookkeeping of resumes left out."""
    out = {}
    for f in sorted(run.rglob("*")):
        rel = str(f.relative_to(run))
        if not f.is_file() or rel.startswith(".history") or f.name == ".lock":
            continue
        if f.suffix == ".json":
            out[rel] = _normal(json.loads(f.read_text()))
        elif f.suffix == ".jsonl":
            out[rel] = [_normal(json.loads(ln)) for ln in f.read_text().splitlines()]
        elif f.suffix == ".md":  # a model card: names the run's folder and when each stage finished
            out[rel] = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", f.read_text().replace(str(run), "<run>"))
        else:
            out[rel] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run and the write points it passed."""
    from deltalign.pipeline.graph import stage_module

    stage_module("sft")  # imported once, here: every fork starts warm
    root = tmp_path_factory.mktemp("reference")
    assert _run_in_fork(root / "run", points=root / "points.json") == 0
    return _result(root / "run"), json.loads((root / "points.json").read_text())


def _sample(points: list[str]) -> list[int]:
    import os

    if os.environ.get("DELTALIGN_FAULTS") == "all":
        return list(range(1, len(points) + 1))
    want = ["inputs.json", "append", "mkdir", "state.json", "rename", "delete", "adapter_model", "manifest.json"]
    picked = {next(i for i, p in enumerate(points, 1) if w in p) for w in want}
    return sorted(picked | {len(points)})


def _crash_and_rerun(run, k: int, points: list[str], expected: dict, **kw) -> list[str]:
    """Crash a run at write point ``k``, run it again: what went wrong (nothing: the uninterrupted result)."""
    rc = _run_in_fork(run, crash_at=k, **kw)
    if rc != 137:
        return [f"point {k} ({points[k - 1]}): the crashed run exited {rc}"]
    rc = _run_in_fork(run, **kw)
    got = _result(run) if rc == 0 else {}
    shutil.rmtree(run, ignore_errors=True)
    if rc != 0 or got != expected:
        diff = sorted(set(got) ^ set(expected)) or [f for f in got if got[f] != expected.get(f)]
        return [f"point {k} ({points[k - 1]}): rerun exited {rc}; differs in {diff[:5]}"]
    return []


def test_a_crash_at_any_write_resumes_to_the_uninterrupted_result(reference, tmp_path):
    expected, points = reference
    assert len(points) > 30 and any("checkpoints" in p for p in points), points
    failures = []
    for k in _sample(points):
        run = tmp_path / f"crash-{k}"
        failures += _crash_and_rerun(run, k, points, expected)
    assert not failures, "\n".join(failures)


# rm, dpo and export the same way, on a finished sft (copied into each run: the sweep starts after it)
LATER = ("rm", "dpo", "export")
LATER_ARGS = [*TINY, "--set", "sft.max_steps=2", "--set", "sft.eval_checker=false",
              *[x for s in ("rm", "dpo") for x in ("--set", f"{s}.max_steps=3", "--set", f"{s}.checkpoint_every=1",
                                                     "--set", f"{s}.keep_checkpoints=1")],
              "--set", "dpo.eval_checker=false"]


@pytest.fixture(scope="module")
def later_reference(tmp_path_factory):
    """A finished sft, then an uninterrupted `run rm dpo export` from it, and the write points that one passed."""
    from deltalign.pipeline.graph import stage_module

    for s in LATER:
        stage_module(s)
    root = tmp_path_factory.mktemp("later")
    assert _run_in_fork(root / "sft", args=LATER_ARGS) == 0
    run = shutil.copytree(root / "sft", root / "run")
    assert _run_in_fork(run, points=root / "points.json", args=LATER_ARGS, stages=LATER) == 0
    return root / "sft", _result(run), json.loads((root / "points.json").read_text())


def _later_sample(points: list[str]) -> list[int]:
    import os

    if os.environ.get("DELTALIGN_FAULTS") == "all":
        return list(range(1, len(points) + 1))
    want = [("rm/head.safetensors",), ("rename", "dpo/ref_logprobs"), ("rename", "dpo/checkpoints/step"),
            ("rename", "export/model")]
    picked = {next(i for i, p in enumerate(points, 1) if all(w in p for w in words)) for words in want}
    return sorted(picked | {len(points)})


def test_a_crash_at_any_write_of_rm_dpo_export_resumes_to_the_uninterrupted_result(later_reference, tmp_path):
    sft_only, expected, points = later_reference
    for stage in LATER:
        assert any(f"/{stage}/" in p for p in points), (stage, points)
    failures = []
    for k in _later_sample(points):
        run = shutil.copytree(sft_only, tmp_path / f"crash-{k}")
        failures += _crash_and_rerun(run, k, points, expected, args=LATER_ARGS, stages=LATER)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ damaged checkpoints: the one before is used
KEEP2 = [*SWEEP, "--set", "sft.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def killed_at_step_3(tmp_path_factory):
    """A straight run and one killed during step 3 (checkpoints of steps 1 and 2 on disk), with KEEP2."""
    from deltalign.core import atomic

    root = tmp_path_factory.mktemp("keep2")
    assert _run_in_fork(root / "straight", args=KEEP2, points=root / "points.json") == 0
    points = json.loads((root / "points.json").read_text())
    renamed = [i for i, p in enumerate(points, 1) if p.endswith("checkpoints/step-000002")]
    assert _run_in_fork(root / "killed", crash_at=renamed[0] + 1, args=KEEP2) == 137
    assert sorted(p.name for p in (root / "killed" / "sft" / "checkpoints").iterdir()) == ["step-000001",
                                                                                          "step-000002"]
    assert atomic.CRASH_AT == 0
    return _result(root / "straight"), root / "killed"


@pytest.mark.parametrize("damage", ["truncate state.json", "flip a byte of trainable.safetensors",
                                    "older format", "delete optimizer.safetensors"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(killed_at_step_3, tmp_path, capfd,
                                                                            damage):
    expected, killed = killed_at_step_3
    run = shutil.copytree(killed, tmp_path / "run")
    ckpt = run / "sft" / "checkpoints" / "step-000002"
    if damage == "truncate state.json":
        (ckpt / "state.json").write_text((ckpt / "state.json").read_text()[:50])
    elif damage == "older format":
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps(state | {"format": 1}))
    elif damage.startswith("flip"):
        f = ckpt / "trainable.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF  # a tensor value, not the header: only the checksum sees it
        f.write_bytes(bytes(data))
    else:
        (ckpt / "optimizer.safetensors").unlink()
    assert _run_in_fork(run, args=KEEP2) == 0
    out = capfd.readouterr().out
    assert "step-000002: " in out and "set aside as step-000002.corrupt" in out, out
    assert "resuming" in out and "from step-000001" in out, out
    assert _result(run) == expected  # (the set-aside one goes with the other checkpoints once the stage is done)


def test_files_honour_the_umask(tmp_path):
    """A run's files and an atomic folder (what export writes through) are readable by whoever the umask lets."""
    import os
    import stat

    from deltalign.core import atomic

    def child():
        os.umask(0o022)
        atomic.write_json(tmp_path / "a" / "x.json", {})
        atomic.save_tensors({"t": torch.zeros(2)}, tmp_path / "a" / "t.safetensors")  # safetensors alone: 0600
        with atomic.directory(tmp_path / "exported") as d:
            (d / "w.bin").write_bytes(b"1")
            (d / "shard.bin").write_bytes(b"1")
            os.chmod(d / "shard.bin", 0o600)  # as transformers' save_pretrained leaves its safetensors shards
        return 0

    import torch

    assert _fork(child) == 0
    assert stat.S_IMODE((tmp_path / "a" / "x.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a" / "t.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "exported").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "exported" / "shard.bin").stat().st_mode) == 0o644


def test_disk_full_during_a_checkpoint_is_one_line_and_the_rerun_resumes(reference, tmp_path, capfd):
    """safetensors reports ENOSPC as its own SafetensorError: one line naming the file, exit 2; once space is
    free, `run` resumes and the result (metrics included: each step once) is the uninterrupted one."""
    import safetensors.torch
    from safetensors import SafetensorError

    expected, _ = reference
    real = safetensors.torch.save_file

    def child():
        def full(tensors, path, *a, **k):
            if "step-000002" in str(path) and str(path).endswith("optimizer.safetensors"):
                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                      'message: "No space left on device" })')
            return real(tensors, path, *a, **k)

        safetensors.torch.save_file = full
        return main(["run", "sft", *SWEEP, "--run-dir", str(tmp_path / "run")])

    assert _fork(child) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "optimizer.safetensors" in err[-1] and "No space" in err[-1], err
    assert not list((tmp_path / "run" / "sft" / "checkpoints").glob(".step-*"))  # no partial checkpoint left
    assert _run_in_fork(tmp_path / "run") == 0
    assert _result(tmp_path / "run") == expected


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_mid_training_is_one_line_and_the_rerun_resumes(reference, tmp_path, capfd, sig, code, word):
    """The real signal, delivered while the checkpoint of step 2 is being written (inside accelerate's and the
    engine's frames): exit 130 / 143, a last line naming the stage and the checkpoint it resumes from, no
    traceback; then `run` gives the uninterrupted result."""
    import os

    from deltalign.core import atomic

    expected, _ = reference
    real = atomic.crash_point

    def child():
        def hook(what):
            real(what)
            if str(what).endswith("checkpoints/step-000002"):
                os.kill(os.getpid(), sig)

        atomic.crash_point = hook
        return main(["run", "sft", *SWEEP, "--run-dir", str(tmp_path / "run")])

    assert _fork(child) == code
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert word in last and "stage sft" in last and "step 1" in last and "resumes" in last, last
    assert _run_in_fork(tmp_path / "run") == 0
    assert _result(tmp_path / "run") == expected


@pytest.mark.skipif(__import__("os").environ.get("DELTALIGN_FAULTS") != "all", reason="make faults only (2 launches)")
def test_zero3_one_rank_killed_the_other_does_not_hang_and_the_run_resumes(tmp_path):
    """ZeRO-3, 2 processes (``accelerate launch``, configs/accelerate/zero3.yaml, as tests/test_zero.py): rank 1
    dies (os._exit) at sft's step 3; the launcher tears rank 0 down and exits non-zero well within the timeout
    (the time from the kill to the launcher's exit is printed: a measurement on a shared machine, not a
    benchmark); rank 0 prints no traceback; the next launch resumes from the step-2 checkpoint, steps once each."""
    import time

    import test_zero as z

    stamp = tmp_path / "killed-at"
    p = z.launch("configs/accelerate/zero3.yaml", tmp_path / "probe", tmp_path / "run", z.Z3_GATHER, stages=["sft"],
                 env={"DELTALIGN_TEST_KILL_AT_STEP": "sft:3", "DELTALIGN_TEST_KILL_RANK": "1",
                      "DELTALIGN_TEST_KILL_STAMP": str(stamp)}, timeout=300)
    ended = time.time()
    assert p.returncode != 0 and stamp.exists(), p.stderr[-3000:]
    teardown = ended - float(stamp.read_text())
    print(f"ZeRO-3, rank 1 killed: launcher returned {teardown:.2f} s after the kill (shared machine)")
    lines = p.stderr.splitlines()
    ours = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln.startswith("Traceback") and
            "bin/accelerate" not in lines[i + 1]]  # the launcher's own traceback (ChildFailedError) is allowed
    assert not ours and teardown < 60, (teardown, ours, p.stderr[-3000:])
    assert [c.name for c in (tmp_path / "run" / "sft" / "checkpoints").iterdir()] == ["step-000002"]
    q = z._check(z.launch("configs/accelerate/zero3.yaml", tmp_path / "probe", tmp_path / "run", z.Z3_GATHER,
                          stages=["sft"], timeout=300))
    assert "resuming" in q.stdout + q.stderr
    assert [r["step"] for r in z.train_rows(tmp_path / "run", "sft")] == [1, 2, 3]


def test_max_length_beyond_the_positions_of_a_rope_model_warns(tmp_path, capsys, monkeypatch):
    """tiny is a Llama (RoPE) with 512 positions: max_length 4096 runs, with one warning line before any weights
    load (run and doctor)."""
    monkeypatch.setattr(graph.Pipeline, "run", lambda self, targets, force=False: {})
    assert main(["run", "sft", *TINY, "--set", "sft.max_length=4096", "--run-dir", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: sft.max_length=4096 is beyond the 512 positions") and "RoPE" in err, err
    assert len(err.splitlines()) == 1
    assert main(["doctor", "sft", *TINY, "--set", "sft.max_length=4096", "--run-dir", str(tmp_path / "r")]) == 0
    assert "warn  sft.max_length=4096 is beyond the 512 positions" in capsys.readouterr().out



# ------------------------------------------- issue 36's objectives: killed at step 2, the rerun ends as one run
# KTO, ORPO, GSPO, CISPO and DAPO's overlong options keep nothing between steps beyond what the engine checkpoints
# (trainable tensors, optimizer, schedule, RNG; GRPO's rollouts are seeded per step and prompt, KTO's reference
# point is computed afresh each step, ORPO has no reference cache): killed (os._exit) right after step 2's
# checkpoint, the rerun resumes from it and leaves the files of the uninterrupted run, bit for bit.
NEW_SFT = [*TINY, "--set", "sft.max_steps=2", "--set", "sft.eval_checker=false"]
GRPO = ["--set", "grpo.max_steps=3", "--set", "grpo.checkpoint_every=1", "--set", "grpo.eval_checker=false",
        "--set", "grpo.rules={faults_rewards:vary: 1.0}", "--set", "grpo.lr=1e-2"]
NEW = {  # the stages after sft (each killed in turn) and their settings: 3 steps, a checkpoint after each
    # ORPO from the base (dpo.init: fresh, no reference) and KTO against the SFT delta, in one run
    "orpo+kto": (["dpo", "kto"], ["--set", "dpo.loss=orpo", "--set", "dpo.init=fresh", "--set", "dpo.max_steps=3",
                                  "--set", "dpo.checkpoint_every=1", "--set", "dpo.eval_checker=false",
                                  "--set", "dpo.eval_data=", "--set", "kto.max_steps=3",
                                  "--set", "kto.checkpoint_every=1", "--set", "kto.eval_checker=false"]),
    # GSPO with DAPO's soft overlong penalty, truncated responses masked and the missing-stop penalty
    "gspo+dapo": (["grpo"], [*GRPO, "--set", "grpo.importance_sampling=sequence", "--set", "grpo.overlong_cache=4",
                             "--set", "grpo.mask_truncated=true", "--set", "grpo.missing_eos_penalty=0.5"]),
    "cispo": (["grpo"], [*GRPO, "--set", "grpo.loss=cispo"]),
}


def _resumable(run) -> dict:
    """:func:`_result` without GRPO's per-step timings (time_generate, time_score, time_optimise)."""
    def drop(value):
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if not k.startswith("time_")}
        return [drop(v) for v in value] if isinstance(value, list) else value

    return drop(_result(run))


@pytest.fixture(scope="module")
def new_objectives(tmp_path_factory):
    """A finished sft stage to copy from, and a user reward that varies within a group (the tiny model's answers
    all score 0 under the checker), importable in every fork."""
    import sys

    from deltalign.pipeline.graph import stage_module

    root = tmp_path_factory.mktemp("new-objectives")
    (root / "faults_rewards.py").write_text("def vary(prompts, responses):\n"
                                            "    return [float(sum(map(ord, r)) % 5) for r in responses]\n")
    sys.path.insert(0, str(root))
    for stage in ("sft", "dpo", "kto", "grpo"):
        stage_module(stage)  # imported once, here: every fork starts warm
    assert _run_in_fork(root / "sft-run", args=NEW_SFT) == 0
    yield root / "sft-run" / "sft"
    sys.path.remove(str(root))


@pytest.mark.parametrize("objectives", list(NEW))
def test_a_killed_run_of_each_new_objective_resumes_to_the_uninterrupted_result(new_objectives, tmp_path, capfd,
                                                                               objectives):
    import os

    import torch
    from safetensors.torch import load_file

    stages, settings = NEW[objectives]
    args, plan = [*NEW_SFT, *settings], ["sft", *stages]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        shutil.copytree(new_objectives, run / "sft")
    assert _run_in_fork(straight, args=args, stages=plan) == 0
    expected = _resumable(straight)
    for stage in stages:  # killed in each stage in turn: the next run resumes it (and runs on to the next kill)
        def child():
            os.environ["DELTALIGN_TEST_KILL_AT_STEP"] = f"{stage}:2"
            return main(["run", *plan, *args, "--run-dir", str(killed)])

        assert _fork(child) == 137, stage
        assert sorted(p.name for p in (killed / stage / "checkpoints").iterdir())[-1] == "step-000002"
    capfd.readouterr()
    assert _run_in_fork(killed, args=args, stages=plan) == 0
    out = capfd.readouterr().out
    assert "resuming" in out and "sft: running" not in out, out
    assert _resumable(killed) == expected
    for stage in stages:
        rows = [r for r in expected[f"{stage}/metrics.jsonl"] if r["kind"] == "train"]
        assert [r["step"] for r in rows] == [1, 2, 3]
        # it trained: the policy moved from where it started (ORPO: a fresh LoRA delta, its B at zero)
        end = load_file(str(straight / stage / "adapter_model.safetensors"))
        start = {k: torch.zeros_like(v) for k, v in end.items() if "lora_B" in k} if stage == "dpo" else \
            load_file(str(new_objectives / "adapter_model.safetensors"))
        assert start and any(not torch.equal(end[k], v) for k, v in start.items()), stage
        if objectives == "gspo+dapo":
            assert all(r["reward_overlong"] < 0 for r in rows) and any(r["ratio"] != 1 for r in rows), rows
            assert any(0 < r["masked_truncated"] < 1 for r in rows), rows  # some responses end: they train


# ------------------------------------------- damaged outputs of a finished stage: named, set aside, run again
CHAIN = [*TINY, "--set", "sft.max_steps=2", "--set", "rm.max_steps=2", "--set", "dpo.max_steps=2",
         "--set", "sft.eval_checker=false", "--set", "dpo.eval_checker=false"]


@pytest.fixture(scope="module")
def finished_chain(tmp_path_factory):
    run = tmp_path_factory.mktemp("chain") / "run"
    assert main(["run", "sft", "rm", "dpo", "export", *CHAIN, "--run-dir", str(run)]) == 0
    return run


def _damage(f, how):
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "flip":  # a tensor value, not the header: only the sha256 in the manifest sees it
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    elif how == "pickle":  # what another tool writes: the same weights, pickled
        f.rename(f.with_name("adapter_model.bin"))
    else:
        f.unlink()


@pytest.mark.parametrize("stage, name, how, then", [
    ("sft", "adapter_model.safetensors", "truncate", "dpo"),
    ("sft", "adapter_model.safetensors", "flip", "dpo"),
    ("sft", "adapter_model.safetensors", "pickle", "dpo"),
    ("rm", "head.safetensors", "truncate", "dpo"),      # rm: a stage dpo reads if present (its report)
    ("rm", "reward_stats.json", "truncate", "dpo"),
    ("dpo", "eval.json", "truncate", "export"),         # export's model card reads it
])
def test_a_damaged_output_is_named_set_aside_and_its_stage_reruns(finished_chain, tmp_path, capsys, stage, name,
                                                                   how, then):
    """A finished stage whose output does not read back whole (cut short, a flipped byte, pickled, a JSON that
    does not parse): `status` calls it corrupt naming the file, the next `run` of a stage that reads it names it,
    moves the stage under .history/ and runs it again (the same result: the rerun is deterministic), and the
    stage that reads it is then up to date; `eval` and `generate` stop in one line naming it."""
    run = shutil.copytree(finished_chain, tmp_path / "run")
    f = run / stage / name
    before = _content(f)
    _damage(f, how)
    args = [*CHAIN, "--run-dir", str(run)]
    assert main(["status", then, *args]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith(stage + " "))
    assert "corrupt" in row and str(f) in row, out
    if stage == "sft":  # the commands that read a finished stage without running it: one line, exit 2
        rc = main(["generate", "--from", "sft", "--prompt", "hi", *args])
        _one_line(capsys, rc, 2, str(f))
        rc = main(["eval", *args])
        _one_line(capsys, rc, 2, str(f), "run sft")
    assert main(["run", then, *args]) == 0
    out = capsys.readouterr()
    assert f"{f}: " in out.out and "previous output kept in" in out.out and "Traceback" not in out.err, out
    assert _content(f) == before
    assert f"{then}: up to date" in out.out, out.out
    assert all(ln.split()[1] == "done" for ln in _status(capsys, [then, *args])), out
    assert list((run / ".history").iterdir())  # the damaged output is kept, not deleted
    _damage(f, how)
    assert main(["run", stage, "--force", *args]) == 0  # --force always works
    assert _content(f) == before


def test_a_damaged_export_is_named_and_exported_again(finished_chain, tmp_path, capsys):
    """The merged model of an export cut short: `status` calls export corrupt, `generate --from export` stops in
    one line naming the file before loading it, and `run export` sets it aside and exports again."""
    run = shutil.copytree(finished_chain, tmp_path / "run")
    f = run / "export" / "model" / "model.safetensors"
    before = f.read_bytes()
    _damage(f, "truncate")
    args = [*CHAIN, "--run-dir", str(run)]
    row = _status(capsys, ["export", *args])[-1]
    assert row.startswith("export") and "corrupt" in row and str(f) in row, row
    rc = main(["generate", "--from", "export", "--prompt", "hi", *args])
    _one_line(capsys, rc, 2, str(f))
    assert main(["run", "export", *args]) == 0
    assert f"{f}: truncated" in capsys.readouterr().out and f.read_bytes() == before


def _content(f):
    return _normal(json.loads(f.read_text())) if f.suffix == ".json" else f.read_bytes()


def _status(capsys, args):
    assert main(["status", *args]) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("stage, name", [("sft", "eval_base.json"), ("rm", "eval_before.json"),
                                         ("dpo", "ref_logprobs-*.safetensors")])
def test_what_a_stage_keeps_to_resume_is_set_aside_when_unreadable(finished_chain, tmp_path, capsys, stage, name):
    """An unfinished stage (no manifest: it resumes) whose baseline or reference cache is cut short: one line, the
    file renamed .corrupt, computed again, and the stage ends with the uninterrupted result. (A finished stage is
    not run again for it: nothing else reads it.)"""
    run = shutil.copytree(finished_chain, tmp_path / "run")
    adapter = (run / stage / "adapter_model.safetensors").read_bytes()
    f = next((run / stage).glob(name))
    before = _content(f)
    _damage(f, "truncate")
    assert _status(capsys, [stage, *CHAIN, "--run-dir", str(run)])[-1].split()[1] == "done"
    (run / stage / "manifest.json").unlink()
    assert main(["run", stage, *CHAIN, "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    assert f"{f}: " in out.out and f"set aside as {f.name}.corrupt" in out.out, out.out
    assert "Traceback" not in out.err, out.err
    assert (run / stage / "adapter_model.safetensors").read_bytes() == adapter
    assert _content(f) == before and f.with_name(f.name + ".corrupt").is_file()


def test_an_unreadable_eval_table_is_left_out_of_the_model_card(finished_chain, tmp_path, capsys):
    """export's model card reads the run's eval_table.json (what `eval` wrote): cut short, it is set aside with
    one line and the card is written without it."""
    run = shutil.copytree(finished_chain, tmp_path / "run")
    (run / "eval_table.json").write_text('[{"policy": "ba')
    assert main(["run", "export", "--force", *CHAIN, "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    assert f"{run / 'eval_table.json'}: unreadable" in out.out and "eval_table.json.corrupt" in out.out, out
    assert "Traceback" not in out.err and "Policy comparison" not in (run / "export/model/README.md").read_text()
