"""Training mechanics: accumulation normalised once, schedule, kill + resume, skip-if-done, no silent overwrite."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from deltalign.model.backbone import AdapterConfig
from deltalign.training.engine import Engine
from deltalign.training.train_config import TrainConfig, lr_lambda
from deltalign.losses import sft_loss_sum
from deltalign.model.labelled import labelled_logits


def test_schedule_warms_up_then_decays_to_min():
    total, warm = 100, 10
    assert lr_lambda(0, total, warm, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, total, warm, 0.1) == pytest.approx(1.0)
    assert lr_lambda(10, total, warm, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, total, warm, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_lambda(100, total, warm, 0.1) == pytest.approx(0.1)


def _one_step(tiny_backbone, micro_batches, grad_accum, tmp_path):
    bb = tiny_backbone
    torch.manual_seed(0)
    bb.add_adapter("sft", AdapterConfig(dropout=0.0))
    eng = Engine(TrainConfig(lr=1e-2, grad_accum=grad_accum, max_grad_norm=0, checkpoint_every=0), tmp_path,
                 quiet=True)
    model = eng.prepare(bb, n_steps=1)
    for _, micro in eng.steps(lambda epoch: micro_batches):
        total = eng.global_sum(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro))
        for mb in micro:
            logits, targets, _ = labelled_logits(bb, model, mb)
            eng.backward(sft_loss_sum(logits, targets)[0], total)
        grads = {n: p.grad.clone() for n, p in bb.adapter_parameters("sft").items() if p.grad is not None}
        eng.step({})
    return grads


def test_accumulation_is_normalised_over_the_whole_step(batch, tmp_path):
    """Two micro-batches with different token counts == one batch holding both (token-mean over the step)."""
    from deltalign.model.backbone import Backbone, ModelConfig

    a = {k: v[:1] for k, v in batch.items()}
    b = {k: v[1:] for k, v in batch.items()}
    assert (a["labels"] != -100).sum() != (b["labels"] != -100).sum()
    whole = _one_step(Backbone.load(ModelConfig(path="tiny")), [batch], 1, tmp_path / "a")
    split = _one_step(Backbone.load(ModelConfig(path="tiny")), [a, b], 2, tmp_path / "b")
    assert whole.keys() == split.keys() and whole
    for n in whole:
        torch.testing.assert_close(split[n], whole[n], atol=1e-6, rtol=1e-5)


TINY = ["--config", "configs/tiny.yaml", "--set", "sft.eval_checker=false"]


def adapter(run: Path):
    return load_file(str(run / "sft" / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_adapter(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(["run", "sft", *TINY, "--run-dir", str(straight)])
    p = run_cli(["run", "sft", *TINY, "--run-dir", str(killed)], env={"DELTALIGN_TEST_KILL_AT_STEP": "3"},
                check=False)
    assert p.returncode == 137
    assert not (killed / "sft" / "manifest.json").exists()          # not mistaken for finished
    ckpt = killed / "sft" / "checkpoints" / "step-000002"
    assert ckpt.is_dir()  # last checkpoint before the kill
    files = sorted(f.name for f in ckpt.rglob("*"))
    assert files and all(f.endswith((".safetensors", ".json")) for f in files), files  # nothing to unpickle
    p = run_cli(["run", "sft", *TINY, "--run-dir", str(killed)])
    assert "resuming" in p.stdout + p.stderr
    a, b = adapter(straight), adapter(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(l)["step"] for l in (killed / "sft" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lost step 3 logged once, after the resume
    assert not (killed / "sft" / "checkpoints").exists()


def test_finished_stage_is_skipped_and_changed_input_reruns_keeping_the_old(tmp_path):
    run = tmp_path / "run"
    run_cli(["run", "sft", *TINY, "--run-dir", str(run)])
    first = json.loads((run / "sft" / "manifest.json").read_text())
    p = run_cli(["run", "sft", *TINY, "--run-dir", str(run)])
    assert "up to date" in p.stdout
    assert json.loads((run / "sft" / "manifest.json").read_text()) == first
    p = run_cli(["run", "sft", *TINY, "--set", "sft.lr=1e-3", "--run-dir", str(run)])
    assert "running" in p.stdout
    second = json.loads((run / "sft" / "manifest.json").read_text())
    assert second["hash"] != first["hash"]
    kept = list((run / ".history").glob("sft-*"))
    assert len(kept) == 1 and json.loads((kept[0] / "manifest.json").read_text()) == first
