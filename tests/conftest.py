"""Shared fixtures: the tiny random Llama + byte-level tokenizer (built on the fly, no network)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # models/tiny-llama and data/embedded are repo-relative
torch.set_num_threads(1)  # the tiny model is dominated by thread sync; one thread is faster


@pytest.fixture
def tiny_backbone():
    from deltalign.model.backbone import Backbone, ModelConfig

    torch.manual_seed(0)
    return Backbone.load(ModelConfig(path="tiny"))


@pytest.fixture
def batch(tiny_backbone):
    """Two right-padded rows with labels on the last tokens only."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tensor_storages(shape=None) -> set[int]:
    """The storages of every live tensor (of ``shape``). ``type(t)``, not ``isinstance``: isinstance reads
    ``__class__``, which torch's deprecated module aliases (``torch.distributed.reduce_op``) answer with a warning."""
    import gc

    gc.collect()
    return {t.untyped_storage().data_ptr() for t in gc.get_objects()
            if issubclass(type(t), torch.Tensor) and (shape is None or t.shape == shape)}


def run_cli(args, env=None, check=True):
    """Run `python -m deltalign ...` in a subprocess (as a user would)."""
    import subprocess

    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "deltalign", *args], cwd=ROOT, env=e, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """An SFT adapter (with dropout 0.05 configured) and a reward model (adapter + head + stats), as the sft and rm
    stages would leave them: what the online RL stages (ppo, grpo) read."""
    import json

    from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig

    def perturbed(bb, name):  # a trained-looking delta: random non-zero values
        with torch.no_grad():
            for p in bb.adapter_parameters(name).values():
                p.add_(torch.randn_like(p) * 0.05)

    root = tmp_path_factory.mktemp("up")
    bb = Backbone.load(ModelConfig(path="tiny"))
    torch.manual_seed(3)
    bb.add_adapter("sft", AdapterConfig(r=4, dropout=0.05))
    perturbed(bb, "sft")
    bb.save_adapter("sft", root / "sft")
    bb.add_adapter("rm", AdapterConfig(r=4, dropout=0.0))
    perturbed(bb, "rm")
    head = bb.add_head("rm")
    with torch.no_grad():
        head.proj.bias.fill_(0.3)
    bb.save_adapter("rm", root / "rm")
    bb.save_head("rm", root / "rm" / "head.safetensors")
    (root / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "n": 10}))
    return {"sft": root / "sft", "rm": root / "rm"}
