"""The stage skeleton (issue 35 goal 4): what every training stage repeated lives in one place.

The tail (evaluate -> save the delta -> eval.json -> finish), an epoch's batches, the checker's row, the data
settings, the dpo/kto load block and the test kill hook: each written once, and the stages use it."""

import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from deltalign.data import splits
from deltalign.data.batching import length_grouped_batches
from deltalign.pipeline.help import _own_docs
from deltalign.sampling import rollout
from deltalign.stages import compose, dpo, grpo, kto, ppo, rm, sft
from deltalign.stages import skeleton
from deltalign.training import engine, faults

TRAINING = [sft, rm, dpo, kto, ppo, grpo, compose]


def source(module) -> str:
    return inspect.getsource(module)


def test_no_stage_writes_its_own_tail():
    for m in (sft, rm, dpo, kto, ppo, grpo):  # compose has no engine tail (it trains only for method gates)
        text = source(m)
        assert "engine.finish()" not in text and "save_delta(" not in text, m.__name__
        assert '"eval.json"' not in text and "engine.evaluating(" not in text, m.__name__
        assert "evaluate_and_save(" in text, m.__name__


def test_no_stage_declares_its_own_batches_or_checker_row():
    for m in TRAINING:
        text = source(m)
        assert "length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)" not in text, m.__name__
        assert '"mean_response_tokens": res[' not in text, m.__name__  # the checker's row: generation.checker_row


def test_dpo_and_kto_load_policy_and_reference_through_one_function():
    for m in (dpo, kto):
        assert "policy_and_reference(model_cfg, NAME, cfg, upstream)" in source(m.run)
        assert "Backbone.load(" not in source(m.run)


def test_data_settings_are_declared_once():
    for m in TRAINING:
        own = _own_docs(m.Config)
        assert not {"data", "eval_data", "split"} & own.keys(), m.__name__  # documented in data.splits.Sources
        assert issubclass(m.Config, splits.Sources), m.__name__
        assert {"data", "eval_data", "split"} <= set(m.Config.__dataclass_fields__)
    assert issubclass(rollout.PromptData, splits.Sources)
    assert sft.Config().data == "embedded:sft_train" and compose.Config().eval_data == "embedded:sft_eval"
    assert dpo.Config().data == "embedded:pref_train" and ppo.Config().eval_data == "embedded:pref_eval"


def test_engine_has_no_identity_accumulate_and_no_kill_hook_inline():
    assert not hasattr(engine.Engine, "accumulate")
    assert "DELTALIGN_TEST_KILL" not in source(engine)
    assert "faults.kill_point(" in source(engine.Engine.step)


def test_epoch_batches_are_the_length_grouped_batches_of_each_epoch():
    class Cfg:
        batch_size, seed = 3, 7

    lengths = [5, 1, 9, 4, 4, 8, 2, 6, 3, 7]
    batches = skeleton.epoch_batches(lengths, Cfg)
    for epoch in (0, 1, 2):
        assert batches(epoch) == length_grouped_batches(lengths, 3, 7, epoch)
    assert batches(0) != batches(1)  # shuffled per epoch


@pytest.mark.parametrize("stage,step,rank,env,killed", [
    ("sft", 3, 0, {"DELTALIGN_TEST_KILL_AT_STEP": "3"}, True),
    ("sft", 2, 0, {"DELTALIGN_TEST_KILL_AT_STEP": "3"}, False),
    ("rm", 3, 0, {"DELTALIGN_TEST_KILL_AT_STEP": "sft:3"}, False),
    ("sft", 3, 0, {"DELTALIGN_TEST_KILL_AT_STEP": "sft:3"}, True),
    ("sft", 3, 0, {"DELTALIGN_TEST_KILL_AT_STEP": "3", "DELTALIGN_TEST_KILL_RANK": "1"}, False),
    ("sft", 3, 1, {"DELTALIGN_TEST_KILL_AT_STEP": "3", "DELTALIGN_TEST_KILL_RANK": "1"}, True),
    ("sft", 3, 0, {}, False),
])
def test_kill_point(monkeypatch, tmp_path, stage, step, rank, env, killed):
    for k in ("DELTALIGN_TEST_KILL_AT_STEP", "DELTALIGN_TEST_KILL_RANK", "DELTALIGN_TEST_KILL_STAMP"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DELTALIGN_TEST_KILL_STAMP", str(tmp_path / "stamp"))
    codes = []
    monkeypatch.setattr(faults.os, "_exit", codes.append)
    faults.kill_point(stage, step, rank)
    assert codes == ([137] if killed else [])
    assert (tmp_path / "stamp").exists() == killed


class FakeEngine:
    """Records the order of the tail's calls."""

    def __init__(self, is_main: bool = True):
        self.is_main, self.calls = is_main, []

    @contextmanager
    def evaluating(self, forwards: bool = True):
        self.calls.append(("enter", forwards))
        yield self.is_main
        self.calls.append(("exit",))

    def save_delta(self, name, folder, head_file=None):
        self.calls.append(("save", name, Path(folder).name, head_file and Path(head_file).name))

    def finish(self):
        self.calls.append(("finish",))


def test_evaluate_and_save_evaluates_inside_then_saves_writes_and_waits(tmp_path):
    eng, results = FakeEngine(), {"data": {"train": 1}}

    def evaluate():
        eng.calls.append(("evaluate",))
        results["after"] = {"loss": 0.5}
        results["stats"] = {"mean": 1.0}

    out = skeleton.evaluate_and_save(eng, tmp_path, results, evaluate, when=False,
                                     deltas=[("rm", tmp_path, tmp_path / "head.safetensors"),
                                             ("critic", tmp_path / "critic", None)], files={"stats.json": "stats"})
    assert out is results
    assert eng.calls == [("enter", False), ("evaluate",), ("exit",), ("save", "rm", tmp_path.name, "head.safetensors"),
                         ("save", "critic", "critic", None), ("finish",)]
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    assert json.loads((tmp_path / "stats.json").read_text()) == {"mean": 1.0}


def test_evaluate_and_save_on_a_process_that_does_not_evaluate_writes_nothing(tmp_path):
    eng = FakeEngine(is_main=False)
    skeleton.evaluate_and_save(eng, tmp_path, {}, lambda: pytest.fail("evaluated"), deltas=[("sft", tmp_path, None)])
    assert [c[0] for c in eng.calls] == ["enter", "exit", "save", "finish"] and not list(tmp_path.iterdir())


def test_measured_once_is_read_back_on_resume(tmp_path):
    eng, n = FakeEngine(), []

    def measure():
        n.append(1)
        return {"heldout_loss": 2.0}

    file = tmp_path / "eval_base.json"
    assert skeleton.measured_once(eng, file, measure, when=True) == {"heldout_loss": 2.0}
    assert skeleton.measured_once(eng, file, measure, when=True) == {"heldout_loss": 2.0}
    assert len(n) == 1 and json.loads(file.read_text()) == {"heldout_loss": 2.0}
