"""The stage cache: what the content hash follows (and ignores), the embedded data it reads, the run-dir lock."""

import importlib
import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

from deltalign.data import embedded as E
from deltalign.data import formats as F
from deltalign.core import settings as configs
from deltalign.pipeline import graph
from deltalign.pipeline.graph import Pipeline, sections
from deltalign.pipeline.rundir import data_fingerprint

LAUNCH_ENV = ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
              "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_ZERO3_INIT", "ACCELERATE_MIXED_PRECISION")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """Each test starts as a plain one-process run, whatever launched pytest."""
    for k in LAUNCH_ENV + ("RANK",):
        monkeypatch.delenv(k, raising=False)


def tiny(*overrides):
    return configs.load(sections(), "configs/tiny.yaml", list(overrides))


def h(stage, *overrides, run_dir=None):
    return Pipeline(tiny(*overrides), run_dir).hash(stage)


# --- what the hash follows ---------------------------------------------------------------------------------------

def test_settings_that_cannot_change_results_are_not_hashed():
    base = h("sft")
    for o in ("sft.threads=2", "sft.log_every=7", "sft.checkpoint_every=3", "sft.keep_checkpoints=5",
              "model.gradient_checkpointing=true"):
        assert h("sft", o) == base, o
    assert h("sft", "sft.lr=1e-3") != base and h("sft", "model.dtype=bfloat16") != base


def test_process_count_and_deepspeed_config_are_hashed(monkeypatch, tmp_path):
    base = h("sft")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process launch is the same run as none
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert h("sft") == base
    monkeypatch.setenv("WORLD_SIZE", "2")  # accelerate launch --num_processes 2: twice the global batch
    two = h("sft")
    assert two != base
    assert Pipeline(tiny()).inputs("sft")["launch"]["global_batch"] == 2 * 4  # world x batch_size x grad_accum
    # what `accelerate launch --config_file configs/accelerate/zero2.yaml` exports: the DeepSpeed JSON's content
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false")
    zero2 = h("sft")
    assert zero2 != two
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2}))
    assert h("sft") != zero2
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert h("sft") not in (zero2, two)


def test_user_reward_source_is_hashed(monkeypatch, tmp_path):
    mod = tmp_path / "cache_test_reward.py"
    mod.write_text("def score(prompts, responses):\n    return [1.0 for _ in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()

    def hashes():
        cfgs = tiny()
        for stage in ("ppo", "grpo"):  # any stage with a `rules` mapping
            cfgs[stage].rules = {"checker": 1.0, "cache_test_reward:score": 0.5}
        p = Pipeline(cfgs)
        return [p.hash(s) for s in ("ppo", "grpo", "sft")]

    ppo_a, grpo_a, sft_a = hashes()
    mod.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    ppo_b, grpo_b, sft_b = hashes()
    assert ppo_a != ppo_b and grpo_a != grpo_b and sft_a == sft_b


def test_versions_are_hashed(monkeypatch):
    base = h("sft")
    real = importlib.metadata.version
    for pkg in ("deltalign", "torch", "transformers", "peft"):
        monkeypatch.setattr(importlib.metadata, "version", lambda n, pkg=pkg: "99.0" if n == pkg else real(n))
        assert h("sft") != base, pkg


def test_dpo_follows_the_rm_it_reports_scores_with(tmp_path):
    def write_rm(content_hash):
        (tmp_path / "rm").mkdir(exist_ok=True)
        (tmp_path / "rm" / "manifest.json").write_text(json.dumps({"hash": content_hash}))

    without = h("dpo", run_dir=tmp_path)
    write_rm("aaa")
    with_a = h("dpo", run_dir=tmp_path)
    write_rm("bbb")
    with_b = h("dpo", run_dir=tmp_path)
    assert len({without, with_a, with_b}) == 3
    assert h("sft", run_dir=tmp_path) == h("sft")  # sft does not read rm


# --- data ----------------------------------------------------------------------------------------------------------

def test_embedded_fingerprint_is_the_content_read(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "EMBEDDED_DIR", tmp_path / "embedded")
    before = data_fingerprint("embedded:sft_train")
    path = tmp_path / "embedded" / "sft_train.jsonl"
    assert path.is_file()
    with open(path, "a") as f:  # the file a stage reads changed: so does the hash
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                + "\n")
    assert data_fingerprint("embedded:sft_train") != before


def test_embedded_files_from_other_generator_code_are_regenerated(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "EMBEDDED_DIR", tmp_path / "embedded")
    fresh = F.load_rows("embedded:pref_eval")
    assert fresh == E.generate()["pref_eval"]
    before = data_fingerprint("embedded:pref_eval")
    # what an older generator left behind: other rows, and no record of the code that made them
    for f in (tmp_path / "embedded").iterdir():
        f.write_text(json.dumps({"prompt": "old", "chosen": "a", "rejected": "b"}) + "\n") if f.suffix == ".jsonl" \
            else f.unlink()
    assert F.load_rows("embedded:pref_eval") == fresh
    assert data_fingerprint("embedded:pref_eval") == before


def _fake_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    refs = tmp_path / "hub" / "datasets--someone--prefs" / "refs"
    refs.mkdir(parents=True)
    return refs


def test_datasets_id_is_pinned_to_the_cached_revision(monkeypatch, tmp_path):
    refs = _fake_hub_cache(monkeypatch, tmp_path)
    unresolved = data_fingerprint("someone/prefs")
    (refs / "main").write_text("a" * 40)
    rev_a = data_fingerprint("someone/prefs")
    (refs / "main").write_text("b" * 40)
    rev_b = data_fingerprint("someone/prefs")
    assert len({unresolved, rev_a, rev_b}) == 3
    (refs / "main").unlink()  # only datasets' own cache left: <name>/<config>/<version>/<commit>
    (tmp_path / "datasets" / "someone___prefs" / "default" / "0.0.0" / ("c" * 40)).mkdir(parents=True)
    assert data_fingerprint("someone/prefs") not in (unresolved, rev_a, rev_b)


def test_a_dataset_downloaded_during_the_run_is_recorded_at_its_revision(monkeypatch, tmp_path):
    refs = _fake_hub_cache(monkeypatch, tmp_path)
    real_module = graph.stage_module

    class FakeSFT:  # downloads the data set (the hub cache now names its revision) and trains nothing
        Config = real_module("sft").Config

        @staticmethod
        def run(cfg, model_cfg, out_dir, upstream):
            (refs / "main").write_text("a" * 40)
            return {}

    monkeypatch.setattr(graph, "stage_module", lambda n: FakeSFT if n == "sft" else real_module(n))
    cfgs = tiny("sft.data=someone/prefs", "sft.eval_data=")
    Pipeline(cfgs, tmp_path / "run").run(["sft"])
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["hash"] == Pipeline(cfgs, tmp_path / "run").hash("sft")  # the next run skips it


# --- the run-directory lock ----------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import fcntl, os, sys, time
    f = open(sys.argv[1], "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.seek(0); f.truncate(); f.write(f"{os.getpid()}\\n"); f.flush()
    print("locked", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(120)
""")


def _finished_sft(run):
    """A run dir whose sft is done for the tiny config: Pipeline.run(["sft"]) only checks and skips."""
    p = Pipeline(tiny(), run)
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "manifest.json").write_text(json.dumps({"hash": p.hash("sft"), "metrics": {"ok": 1}}))
    return p


def _snapshot(run):
    return {str(f): (f.stat().st_mtime_ns, f.is_file() and f.read_bytes()) for f in sorted(run.rglob("*"))}


def test_a_second_run_on_a_locked_run_dir_is_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    p = _finished_sft(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock"), "hold"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        with pytest.raises(FileExistsError) as err:
            p.run(["sft"])
        msg = str(err.value)
        assert "\n" not in msg and f"pid {holder.pid}" in msg and str(run) in msg
        assert _snapshot(run) == before  # nothing written, nothing archived
        monkeypatch.setenv("RANK", "1")  # only the main process takes the lock
        assert p.run(["sft"]) == {"sft": {"ok": 1}}
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    p = _finished_sft(run)
    subprocess.run([sys.executable, "-c", HOLD, str(run / ".lock"), "exit"], check=True, capture_output=True)
    assert (run / ".lock").read_text().strip()  # its pid is still written there
    assert p.run(["sft"]) == {"sft": {"ok": 1}}
    assert p.run(["sft"]) == {"sft": {"ok": 1}}  # and a finished run releases it
