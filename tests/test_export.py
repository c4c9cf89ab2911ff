"""Export: the merged policy gives the adapter model's logits and loads without peft; sharding; the reward model
as a plain sequence classifier gives the pipeline's scores; bf16; QLoRA merges into full precision; an existing
destination is refused; ``generate`` prints responses from base, a stage and an export."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from deltalign.model.backbone import Backbone, ModelConfig
from deltalign.data.batching import pad_batch
from deltalign.data.tokenize import tokenize_prompt
from deltalign.core import settings as configs
from deltalign.pipeline.cli import main
from deltalign.pipeline.graph import Pipeline, sections
from deltalign.rewards.model import load_reward_model
from deltalign.stages import export

TINY = ModelConfig(path="tiny")
FAST = ["dpo.max_steps=2", "dpo.eval_checker=false", "sft.eval_checker=false", "rm.max_steps=4", "sft.eval_data=",
        "rm.eval_data=", "sft.max_steps=4"]


def tiny(*overrides):
    return configs.load(sections(), "configs/tiny.yaml", [*FAST, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny sft -> rm -> dpo run and its default export (policy auto = dpo)."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("export") / "run"
    Pipeline(tiny(), run_dir).run(["sft", "rm", "dpo", "export"])
    return run_dir


def ids_batch(tok):
    seqs = [tokenize_prompt([{"role": "user", "content": t}], tok, True) for t in ("What do bees make?", "Hi")]
    return pad_batch(seqs, tok.pad_token_id)


def adapter_logits(run_dir, stage, batch):
    bb = Backbone.load(TINY)
    if stage is not None:
        bb.load_adapter(stage, run_dir / stage, trainable=False)
    with torch.no_grad():
        out = bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[batch["attention_mask"].bool()], bb.tokenizer


def hf_logits(model_dir, batch):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[
            batch["attention_mask"].bool()], m


def test_merged_policy_matches_adapter_model_and_is_complete(run):
    batch = ids_batch(Backbone.load(TINY).tokenizer)
    ref, tok = adapter_logits(run, "dpo", batch)
    base, _ = adapter_logits(run, None, batch)
    got, model = hf_logits(run / "export" / "model", batch)
    assert (ref - base).abs().max() > 1e-3  # the adapter matters, so a missing merge would fail below
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    d = run / "export" / "model"
    names = {p.name for p in d.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(d)
    assert saved.chat_template and saved.pad_token == tok.pad_token != saved.eos_token
    card = (d / "README.md").read_text()
    sft_hash = json.loads((run / "sft" / "manifest.json").read_text())["hash"]
    assert "`tiny`" in card and sft_hash[:16] in card and "dpo (merged)" in card and "reward_accuracy" in card
    m = json.loads((run / "export" / "manifest.json").read_text())["metrics"]
    assert m["policy"] == "dpo" and m["model"]["max_abs_logit_diff"] < 1e-4
    assert set(m["sources"]) == {"sft", "rm", "dpo"}
    assert (run / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_export_loads_with_plain_transformers_and_no_peft(run, tmp_path):
    script = f"""
import sys, json
sys.modules["peft"] = None  # peft "not installed": any import of it fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = {str(run / "export" / "model")!r}
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d)
ids = tok.apply_chat_template([{{"role": "user", "content": "What do bees make?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    print(json.dumps({{"ids": ids[0].tolist(), "logits": m(ids).logits[0].tolist(), "peft": "peft" in sys.modules
                      and sys.modules["peft"] is not None}}))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"OMP_NUM_THREADS": "1",
                       "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["peft"] is False
    ids = torch.tensor([out["ids"]])
    ref, _ = adapter_logits(run, "dpo", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(torch.tensor(out["logits"]), ref, atol=1e-4, rtol=1e-4)


def upstream(run):
    return {s: run / s for s in ("sft", "rm", "dpo")}


def test_small_max_shard_size_writes_an_index_and_shards(run, tmp_path):
    cfg = export.Config(max_shard_size="20KB", reward_model=False, copy_delta=False)
    export.run(cfg, TINY, tmp_path / "export", upstream(run))
    d = tmp_path / "export" / "model"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((d / s).exists() for s in shards) and not (d / "model.safetensors").exists()
    got, _ = hf_logits(d, ids_batch(Backbone.load(TINY).tokenizer))
    ref, _ = hf_logits(run / "export" / "model", ids_batch(Backbone.load(TINY).tokenizer))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def hf_scores(model_dir, batch):
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float(), m


def test_reward_model_export_gives_the_pipeline_scores(run, tmp_path):
    rm = load_reward_model(TINY, run / "rm")
    tok = rm.backbone.tokenizer
    seqs = [rm.tokenize([{"role": "user", "content": q}], a) for q, a in
            [("What do bees make?", "honey"), ("Say hi.", "HELLO THERE, FRIEND"), ("2+2?", "4")]]
    batch = pad_batch(seqs, tok.pad_token_id)
    ours = rm.score_ids(batch["input_ids"], batch["attention_mask"])
    # Adam moves the head bias by ~lr a step from round-off gradients: it is stored beside the weights
    got, model = hf_scores(run / "export" / "reward_model", batch)
    bias = rm.backbone.heads["rm"].proj.bias.item()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert getattr(model.config, "deltalign_score_bias", 0.0) == pytest.approx(bias, abs=0)
    torch.testing.assert_close(got + bias, ours, atol=1e-5, rtol=1e-5)
    assert ours.std() > 1e-3  # distinct scores: a wrong pooling position would show
    # with a zero bias (the intended Bradley-Terry state) the plain logits are the scores, and nothing extra is stored
    rm_copy = tmp_path / "rm"
    shutil.copytree(run / "rm", rm_copy)
    from safetensors.torch import load_file, save_file

    head = load_file(str(rm_copy / "head.safetensors"))
    save_file({"proj.weight": head["proj.weight"], "proj.bias": torch.zeros(1)}, str(rm_copy / "head.safetensors"))
    export.merged_reward_model(export.Config(), TINY, rm_copy, tmp_path / "rm_export", "card")
    got0, model0 = hf_scores(tmp_path / "rm_export", batch)
    assert not hasattr(model0.config, "deltalign_score_bias")
    torch.testing.assert_close(got0, ours - bias, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "rm_export" / "reward_stats.json").exists()


def test_bfloat16_export(run, tmp_path):
    m = export.run(export.Config(dtype="bfloat16", reward_model=False, copy_delta=False), TINY,
                   tmp_path / "export", upstream(run))
    d = tmp_path / "export" / "model"
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert 0 < m["model"]["max_abs_logit_diff"] < 0.1
    batch = ids_batch(Backbone.load(TINY).tokenizer)
    ref, _ = adapter_logits(run, "dpo", batch)
    got, model = hf_logits(d, batch)
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


def test_qlora_merges_into_a_full_precision_base(run, tmp_path, monkeypatch):
    seen = []
    real = export.load_base
    monkeypatch.setattr(export, "load_base", lambda cfg: seen.append(cfg) or real(cfg))
    qlora = ModelConfig(path="tiny", quantization="nf4")
    m = export.run(export.Config(reward_model=False), qlora, tmp_path / "export", upstream(run))
    assert seen and all(c.quantization == "none" and c.dtype == "float32" for c in seen)
    assert "QLoRA" in (tmp_path / "export" / "model" / "README.md").read_text()
    assert m["model"]["max_abs_logit_diff"] < 1e-4


def test_auto_policy_choice(run):
    done = {s: run / s for s in ("sft", "rm", "dpo")}
    assert export.choose_policy(export.Config(), done) == "dpo"
    assert export.choose_policy(export.Config(), {"sft": run / "sft"}) == "sft"
    assert export.choose_policy(export.Config(policy="sft"), done) == "sft"
    with pytest.raises(FileNotFoundError, match="no finished ppo"):
        export.choose_policy(export.Config(policy="ppo"), done)
    with pytest.raises(FileNotFoundError, match="nothing to export"):
        export.choose_policy(export.Config(), {"rm": run / "rm"})


def test_existing_destination_is_refused_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "dest"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["export", "--config", "configs/tiny.yaml", *sum((["--set", o] for o in FAST), []), "--run-dir", str(run),
            "--out", str(out)]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    before = (run / "export" / "manifest.json").read_text()
    assert main([*args, "--overwrite"]) == 0
    assert (run / "export" / "manifest.json").read_text() == before  # up to date: copied, not exported again
    assert not (run / ".history").exists()
    assert not (out / "keep.txt").exists() and (out / "model" / "config.json").exists()
    assert (out / "reward_model" / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".dest*"))  # no temp directory left behind
    # export.out in the config: refused before any work
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export.run(export.Config(out=str(out)), TINY, tmp_path / "e2", upstream(run))
    assert not (tmp_path / "e2").exists()
    # the run's own export is refused too if out points inside it
    with pytest.raises(ValueError, match="inside"):
        export.check_out(export.Config(out=str(run / "export" / "x")), run / "export")


def test_export_is_run_export_one_front_door(run, tmp_path, capsys):
    """``deltalign export`` and ``deltalign run export`` are one code path: the same lines, and ``export.out`` gets a
    copy of the export as it stands after the run (fresh or up to date), never a forced re-export."""
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    dest = tmp_path / "dest"
    args = ["--config", "configs/tiny.yaml", *sum((["--set", o] for o in FAST), []), "--run-dir", str(mine),
            "--set", f"export.out={dest}"]
    assert main(["run", "export", *args]) == 0  # export.out is part of the export's hash: exported afresh here
    assert (dest / "model" / "config.json").exists()
    capsys.readouterr()
    manifest = (mine / "export" / "manifest.json").read_text()
    said = {}
    for words in (["run", "export"], ["export"]):
        shutil.rmtree(dest)
        assert main([*words, *args]) == 0
        said[words[0]] = capsys.readouterr().out
        assert (mine / "export" / "manifest.json").read_text() == manifest  # up to date: copied, not re-exported
        assert (dest / "model" / "config.json").exists() and (dest / "adapter" / "adapter_config.json").exists()
    assert said["run"] == said["export"]
    assert f"exported policy 'dpo' to {mine / 'export' / 'model'}" in said["run"] and f"copied to {dest}" in said["run"]


def test_a_destination_in_the_way_fails_before_any_stage_runs(tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    args = ["--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"), "--set", "export.policy=sft",
            "--set", f"export.out={dest}"]
    for words in (["run", "export"], ["export"]):
        assert main([*words, *args]) == 2
        assert "already exists" in capsys.readouterr().err
        assert not (tmp_path / "run" / "sft").exists()  # sft (needed by export.policy=sft) never started


def test_generate_prints_responses_for_base_a_stage_and_an_export(run, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What do bees make?"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    common = ["--config", "configs/tiny.yaml", "--run-dir", str(run), "--max-new-tokens", "4"]
    assert main(["generate", "--from", "base", "--prompt", "What do bees make?", *common]) == 0
    out = capsys.readouterr().out
    assert "### [1] prompt\nWhat do bees make?" in out and "### [1] response (base)" in out
    for source in ("dpo", str(run / "export")):
        assert main(["generate", "--from", source, "--prompts-file", str(prompts), *common]) == 0
        out = capsys.readouterr().out
        assert f"### [2] response ({source})" in out and "Hi" in out
    assert main(["generate", "--from", "ppo", "--prompt", "x", *common]) == 2
    assert "no finished ppo" in capsys.readouterr().err
    assert main(["generate", "--from", str(tmp_path), "--prompt", "x", *common]) == 2
    assert "not a model directory" in capsys.readouterr().err


# --- methods of ours: merged when they can be, adapter + base reference when they cannot -------------------------

def fake_stage(root, stage, method, head=False):
    """A finished stage folder holding a nudged delta of ``method`` (and a head), as a run would leave it."""
    from deltalign.model.backbone import AdapterConfig

    torch.manual_seed(0)
    bb = Backbone.load(TINY)
    bb.add_adapter(stage, AdapterConfig(method=method, prefix_length=3, prompt_length=3, bottleneck_size=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bb.adapter_parameters(stage).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    d = root / stage
    bb.save_adapter(stage, d)
    if head:
        bb.add_head(stage)
        bb.save_head(stage, d / "head.safetensors")
        (d / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "n": 1}))
    (d / "manifest.json").write_text(json.dumps({"hash": "ab" * 32, "inputs": {}, "finished_at": "now"}))
    return d


def own_logits(adapter_dir, batch):
    bb = Backbone.load(TINY)
    bb.load_adapter("x", adapter_dir)
    with torch.no_grad():
        return bb.lm_logits(bb(batch["input_ids"], batch["attention_mask"]))[batch["attention_mask"].bool()]


@pytest.mark.parametrize("method", ["ia3", "ln"])
def test_our_mergeable_methods_merge_into_plain_weights(method, tmp_path):
    src = fake_stage(tmp_path / "run", "sft", method)
    m = export.run(export.Config(policy="sft", reward_model=False), TINY, tmp_path / "export", {"sft": src})
    batch = ids_batch(Backbone.load(TINY).tokenizer)
    ref = own_logits(src, batch)
    base, _ = adapter_logits(tmp_path, None, batch)
    got, _ = hf_logits(tmp_path / "export" / "model", batch)
    assert (ref - base).abs().max() > 1e-3  # the delta matters, so a missing merge would fail below
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert m["model"]["max_abs_logit_diff"] < 1e-4
    assert "deltalign_method" in (tmp_path / "export" / "adapter" / "adapter_config.json").read_text()


@pytest.mark.parametrize("method", ["prefix", "prompt", "bottleneck"])
def test_a_method_that_cannot_merge_exports_the_adapter_and_its_base_never_a_merged_model(method, tmp_path):
    src = fake_stage(tmp_path / "run", "sft", method)
    rm = fake_stage(tmp_path / "run", "rm", "bottleneck", head=True)
    stale = tmp_path / "export" / "model"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # an earlier export's merged model must not survive
    with pytest.warns(UserWarning, match="cannot be merged"):
        m = export.run(export.Config(policy="sft", copy_delta=False), TINY, tmp_path / "export",
                       {"sft": src, "rm": rm})
    out = tmp_path / "export"
    assert not (out / "model").exists()
    assert m["model"]["merged"] is False and m["model"]["method"] == method
    assert "cannot be merged" in m["model"]["message"] and "tiny" in m["model"]["message"]
    card = (out / "adapter" / "README.md").read_text()
    assert "not merged" in card and "load_adapter" in card
    assert json.loads((out / "adapter" / "base_model.json").read_text())["path"] == "tiny"
    batch = ids_batch(Backbone.load(TINY).tokenizer)
    torch.testing.assert_close(own_logits(out / "adapter", batch), own_logits(src, batch), atol=0, rtol=0)
    # a reward model that cannot merge: adapter + head + statistics, scoring as the pipeline does
    assert m["reward_model"]["merged"] is False and not (out / "reward_model" / "config.json").exists()
    assert {"adapter_model.safetensors", "head.safetensors", "reward_stats.json", "base_model.json"} <= {
        p.name for p in (out / "reward_model").iterdir()}
    tok = Backbone.load(TINY).tokenizer
    b = pad_batch([tokenize_prompt([{"role": "user", "content": q}], tok, True) for q in ("Hi", "What is 2+2?")],
                  tok.pad_token_id)
    scores = [load_reward_model(TINY, d).score_ids(b["input_ids"], b["attention_mask"])
              for d in (rm, out / "reward_model")]
    torch.testing.assert_close(scores[0], scores[1], atol=0, rtol=0)


def test_cli_exports_and_generates_from_a_delta_that_cannot_merge(tmp_path, capsys):
    from deltalign.pipeline.cli import main

    args = ["--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run"), "--set", "sft.delta.method=prefix",
            "--set", "sft.max_steps=2", "--set", "sft.eval_checker=false"]
    assert main(["run", "sft", *args]) == 0
    with pytest.warns(UserWarning, match="is a prefix delta, which cannot be merged"):
        assert main(["export", *args]) == 0
    out = capsys.readouterr().out
    assert "to " + str(tmp_path / "run" / "export" / "adapter") in out and "cannot be merged" in out
    assert not (tmp_path / "run" / "export" / "model").exists()
    assert main(["generate", "--from", "export", "--prompt", "Hi?", "--max-new-tokens", "3", *args]) == 0
    assert "response (export)" in capsys.readouterr().out
