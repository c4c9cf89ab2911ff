"""The stage graph: order, running only what is missing upstream, passing the RM to DPO's evaluation; the CLI."""

import json


from conftest import run_cli
from deltalign.core import settings as configs
from deltalign.pipeline.cli import main
from deltalign.pipeline.graph import Pipeline, sections


def tiny(*overrides):
    return configs.load(sections(), "configs/tiny.yaml", list(overrides))


def test_plan_adds_missing_upstream_in_graph_order():
    assert Pipeline(tiny()).plan(["dpo"]) == ["sft", "dpo"]
    assert Pipeline(tiny()).plan(["dpo", "sft", "rm"]) == ["sft", "rm", "dpo"]
    assert Pipeline(tiny("rm.init=fresh", "dpo.reference=base", "dpo.init=fresh")).plan(["rm", "dpo"]) == ["rm", "dpo"]
    assert Pipeline(tiny()).plan(["ppo"]) == ["sft", "rm", "ppo"]
    assert Pipeline(tiny("ppo.rm_weight=0", "ppo.critic_init=fresh")).plan(["ppo"]) == ["sft", "ppo"]
    assert Pipeline(tiny()).plan(["grpo"]) == ["sft", "grpo"]  # the checker alone: no reward model
    assert Pipeline(tiny("grpo.rm_weight=1")).plan(["grpo"]) == ["sft", "rm", "grpo"]


def test_export_hash_follows_the_finished_stages_it_reads(tmp_path):
    def hashes(dpo_hash):
        (tmp_path / "dpo").mkdir(exist_ok=True)
        (tmp_path / "dpo" / "manifest.json").write_text(json.dumps({"hash": dpo_hash}))
        p = Pipeline(tiny(), tmp_path)
        assert p.inputs("export")["used"] == {"dpo": dpo_hash}
        assert "used" not in p.inputs("dpo")  # other stages do not hash what they merely use
        return p.hash("export"), p.hash("sft")

    (export_a, sft_a), (export_b, sft_b) = hashes("aaa"), hashes("bbb")
    assert export_a != export_b and sft_a == sft_b  # a changed dpo makes the export stale, nothing else


def test_sft_rm_dpo_in_order_with_reward_model_scores(tmp_path):
    run = tmp_path / "run"
    out = Pipeline(tiny("dpo.max_steps=2"), run).run(["sft", "rm", "dpo"])
    assert list(out) == ["sft", "rm", "dpo"]
    for stage in ("sft", "rm", "dpo"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["status"] == "done"
        assert 0.05 < m["peak_memory"]["host_gib"] < 8  # this process's resident peak while the stage ran
    dpo_m = json.loads((run / "dpo" / "manifest.json").read_text())
    sft_m = json.loads((run / "sft" / "manifest.json").read_text())
    assert dpo_m["inputs"]["upstream"] == {"sft": sft_m["hash"]}
    report = json.loads((run / "dpo" / "eval.json").read_text())
    assert {"reference", "dpo"} <= report.keys()
    assert "rm_score" in report["dpo"] and "rm_score" in report["reference"]
    assert (run / "rm" / "head.safetensors").exists()
    # a changed SFT config makes SFT and DPO stale; RM with init=sft too
    p = Pipeline(tiny("dpo.max_steps=2", "sft.lr=1e-3"), run)
    assert all(p.hash(s) != json.loads((run / s / "manifest.json").read_text())["hash"] for s in ("sft", "rm", "dpo"))


def test_cli_help_lists_settings_and_rejects_unknown_keys(capsys):
    assert main(["run", "dpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "dpo.beta = 0.1" in text and "dpo.reference = sft" in text and "model.quantization" in text
    assert main(["run", "sft", "--config", "configs/tiny.yaml", "--set", "sft.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "sft.learning_rate" in err and "sft.lr" in err


def test_cli_bad_data_names_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yo"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "   "}]}) + "\n")
    p = run_cli(["run", "sft", "--config", "configs/tiny.yaml", "--set", f"sft.data={bad}",
                 "--run-dir", str(tmp_path / "r")], check=False)
    assert p.returncode == 2
    assert "bad.jsonl" in p.stderr and "row 1" in p.stderr and "content" in p.stderr


def test_eval_compares_every_finished_policy(tmp_path, capsys):
    run = tmp_path / "run"
    Pipeline(tiny("dpo.max_steps=2", "dpo.eval_checker=false"), run).run(["sft", "rm", "dpo"])
    assert main(["eval", "--config", "configs/tiny.yaml", "--run-dir", str(run), "--limit", "4"]) == 0
    table = json.loads((run / "eval_table.json").read_text())
    assert set(table) == {"base", "sft", "dpo"}
    assert table["sft"]["kl_to_reference"] == 0.0 and all("rm_score" in r for r in table.values())
    assert "| dpo |" in capsys.readouterr().out


def test_a_finished_stage_leaves_no_model_behind_for_the_next(tmp_path, monkeypatch):
    """A stage's backbone sits in reference cycles (accelerate, hooks, peft); the next stage of the same process
    must not start with it still in memory (with SmolLM2: DPO after RM peaked 0.8 GiB higher than DPO alone)."""
    import weakref

    from deltalign.model.backbone import Backbone

    alive, load = [], Backbone.load.__func__

    def recording(cls, cfg):
        bb = load(cls, cfg)
        alive.append(weakref.ref(bb))
        return bb

    monkeypatch.setattr(Backbone, "load", classmethod(recording))
    Pipeline(tiny("sft.max_steps=2", "rm.max_steps=2"), tmp_path).run(["sft", "rm"])
    assert len(alive) == 2 and not any(ref() is not None for ref in alive)


def test_status_says_what_run_would_do_and_writes_nothing(tmp_path, capsys):
    """`status`: per stage of the plan, done (with wall time and peak memory), stale (inputs changed), unfinished
    (resumes from its newest checkpoint, or restarts) or missing -- from hashes and manifests, no model loaded."""
    run = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", "--run-dir", str(run), "--set", "sft.max_steps=2"]
    assert main(["status", "dpo", *args]) == 0 and not run.exists()  # nothing written, not even the folder
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sft") and "missing" in lines[0] and "dpo" in lines[1] and "missing" in lines[1]
    Pipeline(tiny("sft.max_steps=2"), run).run(["sft"])
    capsys.readouterr()
    assert main(["status", "dpo", *args]) == 0
    sft, dpo = capsys.readouterr().out.splitlines()
    assert sft.split()[:2] == ["sft", "done"] and "GiB" in sft and "s," in sft
    assert dpo.split()[:2] == ["dpo", "missing"]
    assert main(["status", "dpo", *args, "--set", "sft.lr=1e-3"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["sft", "stale"]
    # a stage that started and left a checkpoint resumes from it
    p = Pipeline(tiny("sft.max_steps=2"), run)
    (run / "dpo" / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "dpo" / "inputs.json").write_text(json.dumps({"hash": p.hash("dpo")}))
    assert main(["status", "dpo", *args]) == 0
    dpo = capsys.readouterr().out.splitlines()[1]
    assert dpo.split()[:2] == ["dpo", "unfinished"] and "step 1" in dpo
    assert main(["status", "sfr", *args]) == 2 and "unknown stage(s) ['sfr']" in capsys.readouterr().err
