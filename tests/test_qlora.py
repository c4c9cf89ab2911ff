"""QLoRA in every stage: the tiny sft -> rm -> dpo -> ppo chain on an NF4-quantised base, with the invariants:
the 4-bit base is bit-identical after training, frozen deltas stay frozen, trained deltas change, and export
merges into a full-precision copy (never into 4-bit weights)."""

import json

import torch
from safetensors.torch import load_file

from deltalign.model.backbone import Backbone
from deltalign.core import settings as configs
from deltalign.pipeline.graph import Pipeline, sections

SETS = ["model.quantization=nf4", "sft.max_steps=3", "rm.max_steps=2", "dpo.max_steps=2", "ppo.max_steps=2",
        "sft.eval_checker=false", "dpo.eval_checker=false", "ppo.eval_checker=false", "rm.stats_pairs=8",
        "ppo.batch_size=4", "ppo.mini_batch_size=4", "ppo.passes=1"]


def test_the_chain_trains_on_a_4bit_base(tmp_path, monkeypatch):
    snapshots = []
    load = Backbone.load.__func__

    def spy(cls, cfg):  # every backbone a stage loads: its base tensors as loaded, 4-bit packed bytes included
        bb = load(cls, cfg)
        snapshots.append((bb, {n: t.detach().clone() for n, t in bb.causal_lm.state_dict().items()}))
        return bb

    monkeypatch.setattr(Backbone, "load", classmethod(spy))
    run = tmp_path / "run"
    cfgs = configs.load(sections(), "configs/tiny.yaml", SETS)
    Pipeline(cfgs, run).run(["sft", "rm", "dpo", "ppo", "export"])
    assert len(snapshots) >= 4
    for bb, before in snapshots[:4]:  # sft, rm, dpo, ppo
        assert any("4bit" in type(m).__name__ for m in bb.causal_lm.modules())
        after = {n.replace(".base_layer", ""): t for n, t in bb.causal_lm.state_dict().items()}
        base = {n.replace(".base_layer", ""): t for n, t in before.items() if "lora_" not in n}
        for n, t in base.items():
            assert torch.equal(after[n], t), f"base tensor {n} changed"
    sft = load_file(run / "sft" / "adapter_model.safetensors")
    for stage in ("dpo", "ppo"):  # trained copies of the SFT delta moved away from it
        w = load_file(run / stage / "adapter_model.safetensors")
        assert w.keys() == sft.keys() and any(not torch.equal(w[k], sft[k]) for k in w)
    ppo_bb = snapshots[3][0]
    for k, v in sft.items():  # the frozen reference inside PPO is bit-identical to the sft folder
        name = k.replace(".weight", ".sft.weight")
        assert torch.equal(dict(ppo_bb.model.named_parameters())[name], v), k
    export = json.loads((run / "export" / "manifest.json").read_text())["metrics"]
    assert export["policy"] == "ppo" and export["model"]["max_abs_logit_diff"] < 1e-3
    assert "nf4" in (run / "export" / "model" / "README.md").read_text()
