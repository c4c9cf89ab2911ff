"""Bad input: exit code 2, one line on stderr naming the setting (or the file, row and field), no traceback, and
nothing in the run directory changed -- all before any model loads or any stage runs."""

import json
import shutil

import pytest

from deltalign.model.backbone import AdapterConfig
from deltalign.pipeline.cli import main

TINY = ["--config", "configs/tiny.yaml"]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _files(tmp):
    """Data files and model directories for the cases below."""
    sft_ok = {"prompt": "Say hi.", "completion": "hi"}
    nocfg = tmp / "model-noconfig"
    nocfg.mkdir()
    pickled = tmp / "model-pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    truncated = shutil.copytree("models/tiny-llama", tmp / "model-truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    notok = shutil.copytree("models/tiny-llama", tmp / "model-notok")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (notok / f).unlink()
    badbyte = tmp / "sft_badbyte.jsonl"
    badbyte.write_bytes(json.dumps(sft_ok).encode() + b"\n" + json.dumps(sft_ok).encode()[:-2] + b"\xff\"}\n")
    (tmp / "empty.yaml").write_text("# nothing here yet\n")
    lora_conf = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    for name in ("delta-pickled", "delta-truncated"):  # delta folders outside the run (compose.sources)
        (tmp / name).mkdir()
        (tmp / name / "adapter_config.json").write_text(lora_conf)
    (tmp / "delta-pickled" / "adapter_model.bin").write_bytes(b"\x80\x02")
    (tmp / "delta-truncated" / "adapter_model.safetensors").write_bytes((200).to_bytes(8, "little") + b"{")
    prompts_badbyte = tmp / "prompts_bad.txt"
    prompts_badbyte.write_bytes(b"Say hi.\n\nSay \xe9t\xe9.\n")  # Latin-1, not UTF-8
    return {
        "prompts_badbyte": str(prompts_badbyte),
        "empty_yaml": str(tmp / "empty.yaml"),
        "sft_long_prompt": _write(tmp / "sft_long.jsonl", [sft_ok, {"prompt": "x" * 5000, "completion": "y"}]),
        "sft_missing_field": _write(tmp / "sft_bad.jsonl", [sft_ok, {"prompt": "Say hi."}]),
        "sft_not_json": _write(tmp / "sft_notjson.jsonl", [sft_ok, "{not json"]),
        "pref_empty_chosen": _write(tmp / "pref_bad.jsonl", [{"prompt": "Q", "chosen": "", "rejected": "no"}]),
        "pref_as_sft": _write(tmp / "sft_for_dpo.jsonl", [sft_ok]),
        "no_rows": _write(tmp / "empty.jsonl", []),
        "kto_no_label": _write(tmp / "kto.jsonl", [{"prompt": "Q", "completion": "A", "label": True},
                                                   {"prompt": "Q", "completion": "B"}]),
        "missing": str(tmp / "nope.jsonl"),
        "sft_hh_empty": _write(tmp / "sft_hh.jsonl", [
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}]),
        "heldout_all_bad": _write(tmp / "heldout_bad.jsonl", [{"prompt": "Q", "chosen": "", "rejected": "no"},
                                                              {"prompt": "", "completion": "A"}]),
        "model_noconfig": str(nocfg),
        "model_pickled": str(pickled),
        "model_truncated": str(truncated),
        "model_notok": str(notok),
        "sft_badbyte": str(badbyte),
        "delta_pickled": str(tmp / "delta-pickled"),
        "delta_truncated": str(tmp / "delta-truncated"),
    }


# (command and settings, what the one-line message must name)
CASES = [
    (["run", "dpo", "--set", "dpo.loss=foo"], "dpo.loss"),
    (["run", "dpo", "--set", "dpo.beta=-1"], "dpo.beta"),
    (["run", "sft", "--set", "sft.lr=-1e-4"], "sft.lr"),
    (["run", "sft", "--set", "sft.lr=fast"], "sft.lr"),
    (["run", "sft", "--set", "sft.batch_size=0"], "sft.batch_size"),
    (["run", "sft", "--set", "sft.delta.method=lorax"], "sft.delta.method"),
    (["run", "sft", "--set", "sft.delta.dropout=1.5"], "sft.delta.dropout"),
    (["run", "sft", "--set", "sft.learning_rate=1e-4"], "sft.lr"),  # unknown key, with the suggestion
    (["run", "sft", "--set", "sfft.lr=1e-4"], "sfft"),
    (["run", "sft", "--set", "model.quantization=int3"], "model.quantization"),
    (["run", "sft", "--set", "sft.truncation=sometimes"], "sft.truncation"),
    (["run", "sft", "--set", "sft.warmup_ratio=2"], "sft.warmup_ratio"),
    (["run", "sft", "--set", "sft.generation.top_p=0"], "sft.generation.top_p"),
    (["run", "ppo", "--set", "ppo.mini_batch_size=64"], "ppo.mini_batch_size"),
    (["run", "ppo", "--set", "ppo.rollout.temperature=0"], "ppo.rollout.temperature"),
    (["run", "ppo", "--set", "ppo.rules={nosuch_module_xyz:f: 1.0}"], "ppo.rules"),
    (["run", "dpo", "--set", "dpo.label_smoothing=0.7"], "dpo.label_smoothing"),
    (["run", "dpo", "--set", "dpo.simpo_beta=0"], "dpo.simpo_beta"),
    (["run", "rm", "--set", "rm.init=maybe"], "rm.init"),
    (["run", "sft", "dpo", "--set", "dpo.reference=base"], "dpo.reference"),  # the house rule
    (["run", "sft", "--config", "configs/nope.yaml"], "configs/nope.yaml"),
    (["run", "sft", "--config", "{empty_yaml}"], "empty.yaml is empty"),
    (["run", "sft", "--set", "sft.data={missing}"], "nope.jsonl"),
    (["run", "sft", "--set", "sft.data={sft_missing_field}"], "sft_bad.jsonl: row 1"),
    (["run", "sft", "--set", "sft.eval_data={sft_not_json}"], "sft_notjson.jsonl: row 1"),
    (["run", "dpo", "--set", "dpo.data={pref_empty_chosen}"], "pref_bad.jsonl: row 0: field 'chosen'"),
    (["run", "dpo", "--set", "dpo.data={pref_as_sft}"], "sft_for_dpo.jsonl: row 0"),
    (["run", "sft", "--set", "sft.data={no_rows}"], "empty.jsonl"),
    (["run", "sft", "--set", "sft.data=embedded:nosuch"], "no embedded split"),
    (["run", "sft", "--set", "model.path=/nonexistent/model"], "model.path"),
    (["run", "sft", "--set", "model.path={model_noconfig}"], "config.json"),
    (["run", "sft", "--set", "model.path={model_pickled}"], "safetensors"),
    (["run", "sft", "--set", "model.path={model_truncated}"], "model.safetensors"),
    (["run", "sft", "--set", "model.path={model_notok}"], "tokenizer"),
    (["run", "sft", "--set", "sft.data={sft_badbyte}"], "sft_badbyte.jsonl: row 1"),
    (["run", "sft", "--set", "sft.truncation=drop", "--set", "sft.max_length=4"], "sft.truncation=drop leaves no row"),
    (["run", "sft", "--set", "sft.data={sft_long_prompt}"], "sft_long.jsonl: row 1"),
    (["run", "sft", "--set", "sft.delta.target_modules=[qproj]"], "sft.delta.target_modules: no module"),
    (["run", "sft", "dpo", "--set", "dpo.delta.target_modules=[q_proj,vproj]"], "'vproj'"),
    (["run", "sft", "--set", "sft.delta.target_modules=.*attn\\.qproj"], "sft.delta.target_modules"),
    (["generate", "--from", "base", "--prompts-file", "{prompts_badbyte}"], "prompts_bad.txt: row 1"),
    (["eval", "--set", "eval.data={missing}"], "eval.data"),
    (["eval", "--set", "eval.generation.max_new_tokens=0"], "eval.generation.max_new_tokens"),
    (["run", "sft", "--set", "sft.data={sft_hh_empty}"], "sft_hh.jsonl: row 1: field 'chosen': the final assistant"),
    (["eval", "--set", "eval.data={heldout_all_bad}", "--set", "eval.bad_rows=skip"], "heldout_bad.jsonl"),
    (["eval", "--set", "eval.judge={model_noconfig}"], "eval.judge: "),  # an empty folder
    (["eval", "--set", "eval.judge={model_pickled}"], "not a finished stage"),
    (["export", "--set", "export.policy=bogus"], "export.policy"),
    (["run", "dpo", "--set", "dpo.loss=orpo", "--set", "dpo.reference=sft"], "dpo.reference"),  # ORPO: none
    (["run", "grpo", "--set", "grpo.loss=cispo", "--set", "grpo.importance_sampling=sequence"],
     "grpo.importance_sampling"),
    (["run", "grpo", "--set", "grpo.overlong_cache=999"], "grpo.overlong_cache"),
    (["run", "kto", "--set", "kto.batch_size=1"], "kto.batch_size"),
    (["run", "kto", "--set", "kto.data={kto_no_label}"], "kto.jsonl: row 1: field 'label'"),
    (["run", "compose", "--set", "compose.sources=[sft,{delta_pickled}]"], "pickled adapter_model.bin"),
    (["run", "compose", "--set", "compose.sources=[sft,{delta_truncated}]"],
     "delta-truncated/adapter_model.safetensors: not a readable safetensors file"),
    (["run", "sft", "kto", "--set", "kto.reference=base"], "kto.reference"),  # the house rule
]


@pytest.mark.parametrize("args,names", CASES, ids=[" ".join(a[-1:]) + f"-{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(tmp_path, capsys, args, names):
    files = _files(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    for key, value in files.items():
        args = [a.replace("{" + key + "}", value) for a in args]
    config = [] if "--config" in args else TINY
    rc = main([args[0], *args[1:], *config, "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert names in err, err
    assert sorted(p.name for p in run_dir.rglob("*")) == ["keep.txt"]  # nothing written, nothing archived


def test_a_pickled_adapter_is_refused(tmp_path, tiny_backbone):
    """Adapters load from safetensors only: a folder with adapter_model.bin is refused, never unpickled."""
    tiny_backbone.add_adapter("sft", AdapterConfig(r=2))
    tiny_backbone.save_adapter("sft", tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin"):
        tiny_backbone.load_adapter("other", tmp_path / "a")


@pytest.mark.parametrize("changes, names", [
    (["model.quantization=nf4"], "model.quantization='nf4'"),
    (["model.quantization=nf4", "model.gradient_checkpointing=selective"], "model.quantization='nf4'"),
])
def test_what_zero3_cannot_run_is_refused_before_it_starts(tmp_path, capsys, monkeypatch, changes, names):
    """Launched under ZeRO-3 (the environment ``accelerate launch --config_file configs/accelerate/zero3.yaml``
    sets): a 4-bit base is refused at the command line, exit 2 and one line, before DeepSpeed starts or any model
    loads. Selective checkpointing runs under ZeRO-3 (tests/test_zero.py's ZeRO-3 chain uses it)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/accelerate/ds_zero3.json")
    args = ["run", "sft", *TINY, "--run-dir", str(tmp_path / "run")]
    rc = main([*args, *[x for c in changes for x in ("--set", c)]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and names in err and "ZeRO-3" in err, err
    assert not (tmp_path / "run").exists()
    from deltalign.model.backbone import ModelConfig
    from deltalign.pipeline.checks import check_model

    check_model(ModelConfig(path="tiny", gradient_checkpointing="selective"))  # ZeRO-3 runs selective checkpointing
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/accelerate/ds_zero2.json")  # ZeRO-2 runs both
    check_model(ModelConfig(path="tiny", gradient_checkpointing="selective", quantization="nf4"))
