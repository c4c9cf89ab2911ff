"""DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU processes (gloo) on the tiny model, against one process with the same global
batch: losses and gradient norms of the first steps, saved adapters/heads (complete, equal to rank 0's memory,
loadable by peft), only rank 0 writing outputs, the frozen backbone bit-identical, ZeRO-3 really sharding the
frozen base, generation with gathered weights, resume under ZeRO-3; and gradient checkpointing == no checkpointing.

Each 2-process run goes through ``accelerate launch --config_file configs/accelerate/zero{2,3}.yaml`` with this
file as the script: run as ``__main__`` it is a probe that wraps ``python -m deltalign run ...`` (records what a
rank other than 0 writes, and dumps what each rank holds in memory at the end of every stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["sft", "rm", "dpo", "ppo", "grpo", "kto"]
COMMON = ["--config", "configs/tiny.yaml",
          *[x for s in STAGES for x in ("--set", f"{s}.max_steps=3", "--set", f"{s}.lr=2e-4")],
          "--set", "sft.delta.dropout=0", "--set", "rm.delta.dropout=0",  # dropout RNG differs per process
          "--set", "sft.eval_limit=4", "--set", "dpo.eval_limit=4", "--set", "rm.stats_pairs=16",
          "--set", "dpo.eval_checker=false", "--set", "ppo.eval_limit=4", "--set", "grpo.eval_limit=4",
          "--set", "kto.eval_limit=4", "--set", "kto.eval_checker=false",
          # GRPO scored by the reward model (the checker gives the tiny model's bytes 0: no signal), with the KL term
          "--set", "grpo.rm_weight=1.0", "--set", "grpo.rules.checker=0", "--set", "grpo.kl_coef=0.05",
          "--set", "grpo.num_generations=2"]
# 1 process x 2 micro-batches == 2 processes x 1. PPO and GRPO (a step is one rollout batch per process): the data is
# 8 prompts, so every step rolls out all 8 -- one batch of 8 in one process, 4 + 4 in two; rollouts are seeded per
# prompt, so they are the same; one minibatch per update (the whole batch), two updates per step.
SINGLE = [*[x for s in ("sft", "rm", "dpo", "kto") for x in ("--set", f"{s}.grad_accum=2")],
          "--set", "ppo.batch_size=8", "--set", "ppo.mini_batch_size=8", "--set", "grpo.batch_size=8"]
MULTI = ["--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=4", "--set", "grpo.batch_size=4"]
COMPARED = {"sft": ["loss", "grad_norm"], "rm": ["loss", "grad_norm"], "dpo": ["loss", "grad_norm"],
            "ppo": ["policy_loss", "value_loss", "grad_norm", "score", "kl", "response_length", "entropy"],
            "grpo": ["policy_loss", "grad_norm", "score", "kl", "response_length", "entropy", "zero_std"],
            # KTO's reference point is a mean over the step's rows on every process, so it is the same split 1 x 2 or 2 x 1
            "kto": ["loss", "grad_norm", "kl"]}
# GRPO's score is the reward model's, normalised by its saved std: ZeRO-3 scores 4-row batches from differently
# blocked matmuls than one process's 8-row batches (measured: 3e-5 relative)
REL = {("grpo", "score"): 1e-4}
# The other delta methods under ZeRO-2 and ZeRO-3, in mixed runs: each chain's policy method (sft -> dpo, ppo, grpo
# copies) differs from its reward model's, and PPO's critic is a third method. The chains also carry the objectives
# the main chain does not (issue 36): ORPO (dpo.loss: orpo, no reference) and GSPO (sequence-level ratios) in the
# first, CISPO (capped importance weights) in the second; passes 2, so their ratios move on the second pass.
METHOD_CHAINS = {
    "prefix+ia3": (["sft", "rm", "dpo", "grpo"], {"sft": "prefix", "rm": "ia3", "dpo": "prefix", "grpo": "prefix"},
                   ["--set", "sft.delta.method=prefix", "--set", "rm.init=fresh", "--set", "rm.delta.method=ia3",
                    "--set", "dpo.loss=orpo", "--set", "grpo.importance_sampling=sequence"]),
    "prompt+bottleneck+ln": (["sft", "rm", "dpo", "ppo", "grpo"],
                             {"sft": "prompt", "rm": "bottleneck", "dpo": "prompt", "ppo": "prompt", "critic": "ln",
                              "grpo": "prompt"},
                             ["--set", "sft.delta.method=prompt", "--set", "rm.init=fresh",
                              "--set", "rm.delta.method=bottleneck",
                              "--set", "ppo.critic_init=fresh", "--set", "ppo.critic_delta.method=ln",
                              "--set", "grpo.loss=cispo"]),
}
# Under ZeRO-2 the second chain runs only what CISPO needs (its dpo and ppo are the main chain's objectives)
ZERO2_STAGES = {"prompt+bottleneck+ln": ["sft", "rm", "grpo"]}
PROMPTS = [[5, 80, 81, 82, 90, 91], [5, 100, 101, 102]]


# ------------------------------------------------------------------------------------------------- the probe
def _probe(probe_dir: Path, argv: list[str]) -> int:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(argv[argv.index("--run-dir") + 1]).resolve()
    writes: list[list[str]] = []

    def inside(path) -> bool:
        try:
            return isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).resolve().is_relative_to(
                run_dir)
        except (OSError, ValueError):
            return False

    if rank != 0:
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def audit(event, args):
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
                if writing and inside(path):
                    writes.append([event, os.fsdecode(path)])
            elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.unlink"):
                if args and inside(args[0]):
                    writes.append([event, os.fsdecode(args[0])])

        sys.addaudithook(audit)
        import safetensors.torch as st

        real_save = st.save_file

        def save_file(tensors, filename, *a, **k):  # written from Rust: invisible to the audit hook
            if inside(filename):
                writes.append(["safetensors.save_file", os.fsdecode(filename)])
            return real_save(tensors, filename, *a, **k)

        st.save_file = save_file
        real_torch_save = torch.save

        def torch_save(obj, f, *a, **k):  # a path is opened from C++: invisible to the audit hook too
            if inside(f):
                writes.append(["torch.save", os.fsdecode(f)])
            return real_torch_save(obj, f, *a, **k)

        torch.save = torch_save

    from deltalign.model import backbone as backbone_mod
    from deltalign.training import engine as engine_mod
    from deltalign.zero import loading as zero_mod

    loads, reads = [], []
    real_read, real_load_base = zero_mod.read_tensor, backbone_mod.load_base

    def read_tensor(entry, *a, **k):
        t = real_read(entry, *a, **k)
        reads.append(t.numel())
        return t

    def load_base(cfg):  # what the process holds of the base right after loading it, what it read, and how
        collectives = []  # many collectives (broadcasts, gathers) loading it took
        c10d = torch.distributed.distributed_c10d  # (all_gather_into_tensor, which DeepSpeed holds, calls it)
        real = {(mod, k): getattr(mod, k) for mod, k in ((torch.distributed, "broadcast"),
                                                         (torch.distributed, "all_gather"),
                                                         (c10d, "all_gather_single"))}

        def counted(key):
            def f(*a, **kw):
                collectives.append(key[1])
                return real[key](*a, **kw)
            return f

        for mod, k in real:
            setattr(mod, k, counted((mod, k)))
        try:
            model, tok = real_load_base(cfg)
        finally:
            for (mod, k), f in real.items():
                setattr(mod, k, f)
        params = list(model.parameters())
        loads.append({"partitioned": all(hasattr(p, "ds_id") for p in params),
                      "local": sum(p.numel() for p in params),
                      "full": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
                      "reads": len(reads), "max_read": max(reads, default=0), "n_params": len(params),
                      "collectives": len(collectives)})
        reads.clear()
        return model, tok

    zero_mod.read_tensor, backbone_mod.load_base = read_tensor, load_base

    real_finish = engine_mod.Engine.finish

    def finish(self):
        from peft.utils import get_peft_model_state_dict

        from deltalign.sampling import generation

        from deltalign import zero
        from deltalign.sampling.generation import GenerationConfig, generate

        stage, bb = self.out.name, self.backbone

        def delta_state(name):  # what the saved adapter_model.safetensors holds (peft's keys or our module's)
            state = bb.deltas[name].state_dict() if name in bb.deltas else get_peft_model_state_dict(
                bb.model, adapter_name=name)
            return {k: v.detach().clone() for k, v in state.items()}
        base = [(n, p) for n, p in bb.causal_lm.named_parameters() if "lora_" not in n]
        local_numel = {n: p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for n, p in base}
        data_numel = {n: p.numel() for n, p in base}  # ZeRO-3: 0, the full tensor is partitioned away
        full_numel = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in base}
        gather = zero.gathered(self.model, bb) if self.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            dump = {"local_numel": local_numel, "full_numel": full_numel, "data_numel": data_numel,
                    "zero_stage": self.zero_stage,
                    "base": {n.replace(".base_layer", ""): p.detach().clone() for n, p in base}}
            if stage in bb.adapters:
                dump["adapter"] = delta_state(stage)
            if stage in bb.heads:
                dump["head"] = {k: v.detach().clone() for k, v in bb.heads[stage].state_dict().items()}
            if "critic" in bb.heads:  # ppo's value model
                dump["critic_delta"] = delta_state("critic")
                dump["critic_head"] = {k: v.detach().clone() for k, v in bb.heads["critic"].state_dict().items()}
            if stage in ("sft", "dpo", "ppo", "grpo"):  # greedy generation on every rank from the gathered weights
                with bb.using(stage):
                    dump["generated"] = generate(bb, PROMPTS, GenerationConfig(max_new_tokens=6))
        if self.zero_stage == 3 and stage in ("sft", "dpo", "ppo", "grpo"):
            # the same with the weights left sharded, in lockstep; rank 1 has one prompt fewer (a dummy row)
            with generation.in_lockstep(self.processes.all_true, self.processes.max_int), bb.using(stage):
                dump["generated_lockstep"] = generate(bb, PROMPTS[:len(PROMPTS) - rank],
                                                      GenerationConfig(max_new_tokens=6, batch_size=1))
        torch.save(dump, probe_dir / f"{stage}-rank{rank}.pt")
        return real_finish(self)

    engine_mod.Engine.finish = finish
    from deltalign.pipeline.cli import main

    try:
        return main(argv)
    finally:
        if rank != 0 and run_dir.is_dir():  # a canary through each audited channel: the audit does see writes
            canary = run_dir / f"audit-canary-rank{rank}.bin"
            canary.write_text("x")
            st.save_file({"x": torch.zeros(1)}, canary)
            torch.save({}, canary)
            os.remove(canary)
        (probe_dir / f"writes-rank{rank}-{os.getpid()}.json").write_text(json.dumps(writes))  # one per launch
        (probe_dir / f"loads-rank{rank}-{os.getpid()}.json").write_text(json.dumps(loads))


# ------------------------------------------------------------------------------------------------- helpers
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def ppo_prompts(path: Path, n: int = 8) -> Path:
    """The first ``n`` prompts of the embedded preference set (the checker reward understands them)."""
    from deltalign.data.formats import load_rows

    rows = load_rows("embedded:pref_train")[:n]
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return path


def launch(config: str | None, probe_dir: Path, run_dir: Path, extra: list[str], env=None, stages=STAGES,
           timeout: float = 600):
    """Run the probe: under ``accelerate launch`` with 2 processes (config given) or as one plain process."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    prompts = ppo_prompts(probe_dir / "prompts.jsonl")
    data = ["--set", f"ppo.data={prompts}", "--set", f"grpo.data={prompts}"]
    args = [str(Path(__file__)), str(probe_dir), "run", *stages, *COMMON, *data, *extra, "--run-dir",
            str(run_dir)]
    if config:
        cmd = [str(ROOT / ".venv/bin/accelerate"), "launch", "--config_file", config, "--num_processes", "2",
               "--main_process_port", str(_port()), *args]
    else:
        cmd = [sys.executable, *args]
    t0 = time.time()
    # its own process group: on a timeout (a hang) the workers under `accelerate launch` are killed with it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env() | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s (a hang?)\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}")
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    p.wall = time.time() - t0
    return p


def _check(p):
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}")
    return p


def train_rows(run: Path, stage: str) -> list[dict]:
    rows = [json.loads(l) for l in (run / stage / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if r["kind"] == "train"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(_probe(Path(sys.argv[1]), sys.argv[2:]))

# ------------------------------------------------------------------------------------------------- tests
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

WALL: dict[str, float] = {}


# the main ZeRO-3 chain checkpoints selectively and generates from gathered weights (zero3_generation: gather); the
# method chains below checkpoint in full and use the default, lockstep
Z3 = ["--set", "model.gradient_checkpointing=true", *MULTI]
Z3_GATHER = ["--set", "model.gradient_checkpointing=selective", *MULTI,
             *[x for s in STAGES for x in ("--set", f"{s}.zero3_generation=gather")]]


KILLS = [("sft", ["sft"]), ("dpo", ["sft", "rm", "dpo"]), ("ppo", ["sft", "rm", "dpo", "ppo"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and one 2-process run per ZeRO stage, each of sft -> rm -> dpo -> ppo -> grpo -> kto (3
    steps each). Both 2-process runs checkpoint selectively (the reference not at all): ZeRO-3's weight gathers
    inside the checkpointed layers replay where the backward puts them (deltalign/model/recompute.py); the
    ZeRO-3 run is killed three times before it completes: at sft's step 3 (after the step-2 checkpoint), then --
    resuming sft -- at dpo's step 3, then -- resuming dpo -- at ppo's step 3; the full run resumes ppo."""
    root = tmp_path_factory.mktemp("zero")
    out = {"killed": {}}
    for stage, stages in KILLS:
        p = launch("configs/accelerate/zero3.yaml", root / "zero3-probe", root / "zero3", Z3_GATHER, stages=stages,
                   env={"DELTALIGN_TEST_KILL_AT_STEP": f"{stage}:3"})
        WALL[f"zero3_killed_{stage}"] = p.wall
        ckpt = root / "zero3" / stage / "checkpoints" / "step-000002"
        files = sorted(f.relative_to(ckpt).as_posix() for f in ckpt.rglob("*")) if ckpt.is_dir() else []
        out["killed"][stage] = (p, files,
                                {k: v.shape for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
                                if "trainable.safetensors" in files else {},
                                load_file(str(ckpt / "optimizer.safetensors")) if "optimizer.safetensors" in files
                                else {})
    z2 = ["--set", "model.gradient_checkpointing=selective", *MULTI]
    for name, config, extra in [("single", None, SINGLE), ("zero2", "configs/accelerate/zero2.yaml", z2),
                                ("zero3", "configs/accelerate/zero3.yaml", Z3_GATHER)]:
        p = _check(launch(config, root / f"{name}-probe", root / name, extra))
        WALL[name] = p.wall
        out[name] = (root / name, root / f"{name}-probe", p)
    return out


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_losses_and_grad_norms_match_one_process(runs, zero):
    single, _, _ = runs["single"]
    run, _, _ = runs[zero]
    for stage in STAGES:
        a, b = train_rows(single, stage), train_rows(run, stage)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
        for ra, rb in zip(a, b):
            # metrics.jsonl rounds to 6 decimals; a 2x learning-rate change already moves step 2 by ~2e-5
            for key in COMPARED[stage]:
                assert rb[key] == pytest.approx(ra[key], rel=REL.get((stage, key), 1e-5), abs=2e-6), (stage, key, ra, rb)
            assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-6)


def _tiny_base():
    from deltalign.model.backbone import ModelConfig, resolve_path

    return load_file(str(resolve_path(ModelConfig(path="tiny").path) / "model.safetensors"))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_saved_outputs_are_complete_equal_to_rank0_memory_and_load_in_peft(runs, zero):
    from peft import PeftModel

    from deltalign.model.backbone import ModelConfig, load_base

    single, _, _ = runs["single"]
    run, probe, _ = runs[zero]
    for stage in STAGES:
        mem = torch.load(probe / f"{stage}-rank0.pt", weights_only=False)
        saved = load_file(str(run / stage / "adapter_model.safetensors"))
        reference = load_file(str(single / stage / "adapter_model.safetensors"))
        assert saved.keys() == reference.keys() == mem["adapter"].keys() and saved
        for k, v in saved.items():
            assert v.numel() > 0 and v.shape == reference[k].shape, (stage, k, v.shape)  # not ZeRO-3's empty shards
            assert torch.equal(v, mem["adapter"][k]), (stage, k)
            torch.testing.assert_close(v, reference[k], atol=1e-4, rtol=1e-3)  # 3 steps: same training
        if stage in ("rm", "ppo"):  # rm's head; ppo's critic adapter and head
            folder, key = (run / "rm", "head") if stage == "rm" else (run / "ppo" / "critic", "critic_head")
            head = load_file(str(folder / "head.safetensors"))
            assert head.keys() == mem[key].keys() and head["proj.weight"].numel() > 0
            for k, v in head.items():
                assert torch.equal(v, mem[key][k])
        if stage == "ppo":
            critic = load_file(str(run / "ppo" / "critic" / "adapter_model.safetensors"))
            assert critic.keys() == mem["critic_delta"].keys() and critic
            for k, v in critic.items():
                assert v.numel() > 0 and torch.equal(v, mem["critic_delta"][k]), k
        model, _ = load_base(ModelConfig(path="tiny"))
        peft_model = PeftModel.from_pretrained(model, str(run / stage))
        loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
        assert len(loaded) == len(saved)
        for n, p in loaded.items():
            key = n.replace(".default", "")
            assert torch.equal(p.detach(), saved[key]), n


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_only_rank0_writes_and_the_backbone_stays_bit_identical(runs, zero):
    run, probe, _ = runs[zero]
    launches = sorted(probe.glob("writes-rank1-*.json"))
    assert launches
    writes = [w for f in launches for w in json.loads(f.read_text())]
    # rank 1 writes nothing in the run directory, checkpoints included (rank 0 writes the whole optimizer state)
    outside = [w for w in writes if "audit-canary-rank1" not in w[1]]
    assert not outside, outside
    # the audit does see rank 1's writes: the probe's canary, through every channel
    assert {w[0] for w in writes} == {"open", "safetensors.save_file", "torch.save", "os.remove"}, writes
    assert_base_unchanged(probe, STAGES)


def test_each_stage_records_the_peak_of_every_process(runs):
    """A 2-process stage's manifest holds both processes' peaks and the larger as its own; one process: no list."""
    for stage in STAGES:
        single = json.loads((runs["single"][0] / stage / "manifest.json").read_text())["peak_memory"]
        assert "processes" not in single and single["host_gib"] > 0
        for zero in ("zero2", "zero3"):
            peak = json.loads((runs[zero][0] / stage / "manifest.json").read_text())["peak_memory"]
            each = [p["host_gib"] for p in peak.get("processes", [])]
            assert len(each) == 2 and min(each) > 0 and peak["host_gib"] == max(each), (zero, stage, peak)


def assert_base_unchanged(probe: Path, stages: list[str]) -> None:
    """What each rank held of the frozen base at the end of every stage equals the checkpoint on disk, bit for bit."""
    base_file = _tiny_base()
    for stage in stages:
        for rank in (0, 1):
            mem = torch.load(probe / f"{stage}-rank{rank}.pt", weights_only=False)
            covered = {k for k in base_file if k in mem["base"]}
            assert covered == set(base_file) - {"lm_head.weight"}, set(base_file) ^ covered
            for k in covered:
                assert torch.equal(mem["base"][k], base_file[k]), (stage, rank, k)


def test_zero3_shards_the_frozen_base_and_generates_from_gathered_and_sharded_weights(runs):
    from deltalign.model.backbone import Backbone, ModelConfig
    from deltalign.sampling.generation import GenerationConfig, generate

    run, probe, _ = runs["zero3"]
    for stage in STAGES:
        mem = [torch.load(probe / f"{stage}-rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert mem[0]["zero_stage"] == 3
        for n, full in mem[0]["full_numel"].items():
            # each rank holds about half of every frozen base tensor, not the whole (nor nothing on both)
            assert mem[0]["local_numel"][n] + mem[1]["local_numel"][n] >= full, n
            assert mem[0]["local_numel"][n] < full and mem[0]["data_numel"][n] == 0, n
    for stage in ("sft", "dpo", "ppo", "grpo"):
        g0, g1 = (torch.load(probe / f"{stage}-rank{r}.pt", weights_only=False)["generated"] for r in (0, 1))
        bb = Backbone.load(ModelConfig(path="tiny"))
        bb.load_adapter(stage, run / stage)
        with bb.using(stage):
            expected = generate(bb, PROMPTS, GenerationConfig(max_new_tokens=6))
        assert g0 == g1 == expected and all(len(g) > 0 for g in expected)
        l0, l1 = (torch.load(probe / f"{stage}-rank{r}.pt", weights_only=False)["generated_lockstep"] for r in (0, 1))
        assert l0 == expected and l1 == expected[:1], stage  # sharded weights, in lockstep: the same tokens


def test_zero3_loads_the_base_partitioned_reading_one_tensor_at_a_time(runs):
    """Under ZeRO-3 every load of the base (each stage, each rank) leaves it partitioned from the start (not loaded
    whole, then sharded by deepspeed.initialize); each rank reads each tensor once, only its own half: no read is
    larger than half the largest tensor, and building it takes no collective (no random values broadcast, no
    parameter gathered to initialise it: every value is read). Under ZeRO-2 the base is whole, read by transformers."""
    largest = max(v.numel() for v in _tiny_base().values())
    half = -(-largest // 2)
    for zero, partitioned in (("zero3", True), ("zero2", False)):
        _, probe, _ = runs[zero]
        for rank in (0, 1):
            loads = [x for f in sorted(probe.glob(f"loads-rank{rank}-*.json")) for x in json.loads(f.read_text())]
            # every stage loads the base once (ZeRO-3: the launches killed before the end record nothing; the last
            # one runs ppo, resumed, and grpo)
            assert len(loads) >= (2 if zero == "zero3" else len(STAGES)), (zero, rank, loads)
            for x in loads:
                assert x["partitioned"] == partitioned, (zero, rank, x)
                if partitioned:
                    assert x["local"] == 0 and x["full"] > 0, x  # nothing of the base left in place on this rank
                    assert x["reads"] == x["n_params"], (rank, x)
                    assert 0 < x["max_read"] <= half, (rank, x, half)
                    assert x["collectives"] == 0, x  # built partitioned, nothing broadcast or gathered
                else:
                    assert x["reads"] == 0 and x["local"] == x["full"], x


def test_zero3_resume_after_kill(runs):
    """Killed at step 3 under ZeRO-3 (sft, then dpo, then ppo): the step-2 checkpoint holds only safetensors and
    JSON (nothing to unpickle), with complete trainable tensors and the full (gathered, not sharded) fp32 master
    values and AdamW moments of each; the next run resumes the killed stage, logs steps 1-3 once and ends where
    one uninterrupted process ends (measured for sft: ZeRO-3 without a kill differs from it by < 2e-7, ZeRO-2 by
    0; the tolerance is 1e-6; ppo and dpo train on their predecessors' outputs: 1e-5)."""
    single, _, _ = runs["single"]
    run, _, final = runs["zero3"]
    resumed_by = {"sft": runs["killed"]["dpo"][0], "dpo": runs["killed"]["ppo"][0], "ppo": final}
    for stage, (p, files, trainable, optimizer) in runs["killed"].items():
        assert p.returncode != 0, stage
        assert files == ["optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"], files
        assert trainable and all(s.numel() > 0 for s in trainable.values())
        for n, shape in trainable.items():
            for key in (f"master/{n}", f"state/{n}/exp_avg", f"state/{n}/exp_avg_sq"):
                assert optimizer[key].shape == shape, (key, optimizer[key].shape, shape)
            assert optimizer[f"state/{n}/exp_avg_sq"].abs().sum() > 0, n  # two updates happened
        updates = 4 if stage == "ppo" else 2  # ppo: 2 epochs over each rollout, one update each
        assert any(k.startswith("flat/") and k.endswith("/step") and float(v) == updates for k, v in optimizer.items())
        later = resumed_by[stage]
        assert "resuming" in later.stdout + later.stderr, stage
        assert [r["step"] for r in train_rows(run, stage)] == [1, 2, 3], stage
        a = load_file(str(single / stage / "adapter_model.safetensors"))
        b = load_file(str(run / stage / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6 if stage == "sft" else 1e-5, rtol=0)
    print("wall times (s):", {k: round(v, 1) for k, v in WALL.items()})


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """Each chain of METHOD_CHAINS in one process and under ZeRO-2 and ZeRO-3 with 2 processes (gradient
    checkpointing on), ZeRO-3 with the default ``zero3_generation: lockstep`` (rollouts and evaluation from the
    sharded weights, all ranks in step)."""
    root = tmp_path_factory.mktemp("zero-methods")
    out = {}
    for chain, (stages, _, extra) in METHOD_CHAINS.items():
        for name, config, more in [("single", None, SINGLE), ("zero2", "configs/accelerate/zero2.yaml", Z3),
                                   ("zero3", "configs/accelerate/zero3.yaml", Z3)]:
            tag = f"{chain}-{name}"
            p = _check(launch(config, root / f"{tag}-probe", root / tag, [*extra, *more],
                              stages=ZERO2_STAGES.get(chain, stages) if name == "zero2" else stages))
            WALL[tag] = p.wall
            out[chain, name] = (root / tag, root / f"{tag}-probe")
    print("wall times (s):", {k: round(v, 1) for k, v in WALL.items()})
    return out


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
@pytest.mark.parametrize("chain", list(METHOD_CHAINS))
def test_other_delta_methods_and_objectives_under_zero_match_one_process(method_runs, chain, zero):
    """IA3, prefix, prompt, bottleneck and LN deltas (ours, not peft's), and ORPO, GSPO and CISPO, under ZeRO-2 and
    ZeRO-3: the same losses and gradient norms as one process, saved deltas complete and equal to rank 0's memory
    and to the one-process run's, only rank 0 writes, the base bit-identical."""
    stages, methods, _ = METHOD_CHAINS[chain]
    stages = ZERO2_STAGES.get(chain, stages) if zero == "zero2" else stages
    (single, _), (run, probe) = method_runs[chain, "single"], method_runs[chain, zero]
    for stage in stages:
        a, b = train_rows(single, stage), train_rows(run, stage)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
        # ORPO's odds-ratio term, GSPO's sequence ratio (a mean over both passes: 1 on the first), CISPO's drift
        extra = [k for k in ("odds_ratio_loss", "nll_chosen", "ratio", "approx_kl") if k in a[0]]
        for ra, rb in zip(a, b):
            for key in COMPARED[stage] + extra:
                assert rb[key] == pytest.approx(ra[key], rel=REL.get((stage, key), 1e-5), abs=2e-6), (chain, stage, key,
                                                                                                   ra, rb)
        if chain == "prefix+ia3" and stage in ("dpo", "grpo"):  # ORPO ran; GSPO's ratios moved on the second pass
            assert "odds_ratio_loss" in extra if stage == "dpo" else any(r["ratio"] != 1 for r in b), (stage, b)
        if chain == "prompt+bottleneck+ln" and stage == "grpo":
            assert "loss: cispo" in (run / "grpo" / "config.yaml").read_text()
        folders = {stage: run / stage} | ({"critic": run / "ppo" / "critic"} if stage == "ppo" else {})
        mem = torch.load(probe / f"{stage}-rank0.pt", weights_only=False)
        for name, folder in folders.items():
            conf = json.loads((folder / "adapter_config.json").read_text())
            assert conf["deltalign_method"] == methods[name], (name, conf)
            saved = load_file(str(folder / "adapter_model.safetensors"))
            reference = load_file(str(single / folder.relative_to(run) / "adapter_model.safetensors"))
            held = mem["adapter" if name == stage else "critic_delta"]
            assert saved.keys() == reference.keys() == held.keys() and saved, name
            for k, v in saved.items():
                assert v.numel() > 0 and v.shape == reference[k].shape, (name, k, v.shape)
                assert torch.equal(v, held[k]), (name, k)
                torch.testing.assert_close(v, reference[k], atol=1e-4, rtol=1e-3)
    writes = [w for f in sorted(probe.glob("writes-rank1-*.json")) for w in json.loads(f.read_text())]
    assert writes and all("audit-canary-rank1" in w[1] for w in writes), writes  # rank 1: only the probe's canary
    assert_base_unchanged(probe, stages)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(batch):
    from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
    from deltalign.model.labelled import labelled_logits
    from deltalign.losses import sft_loss_sum

    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        bb = Backbone.load(ModelConfig(path="tiny", gradient_checkpointing=gc))
        bb.add_adapter("sft", AdapterConfig(r=4, alpha=8, dropout=0.0))
        bb.train()
        assert bb.causal_lm.is_activation_checkpointing == gc
        logits, targets, _ = labelled_logits(bb, bb, batch)
        sft_loss_sum(logits, targets)[0].backward()
        grads.append({n: p.grad.clone() for n, p in bb.adapter_parameters("sft").items() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_qlora_under_zero2_trains_sft_then_dpo_as_one_process(tmp_path):
    """QLoRA (an NF4 base) with 2 processes under ZeRO-2: the same losses as one process on the same global batch,
    saved adapters equal to rank 0's memory and to the one-process run's."""
    nf4 = ["--set", "model.quantization=nf4"]
    stages = ["sft", "dpo"]
    single = tmp_path / "single"
    _check(launch(None, tmp_path / "single-probe", single, [*nf4, *SINGLE], stages=stages))
    run, probe = tmp_path / "zero2", tmp_path / "zero2-probe"
    _check(launch("configs/accelerate/zero2.yaml", probe, run, [*nf4, *MULTI], stages=stages))
    for stage in stages:
        a, b = train_rows(single, stage), train_rows(run, stage)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
        for ra, rb in zip(a, b):
            for key in COMPARED[stage]:
                assert rb[key] == pytest.approx(ra[key], rel=REL.get((stage, key), 1e-5), abs=2e-6), (stage, key, ra, rb)
        saved = load_file(str(run / stage / "adapter_model.safetensors"))
        reference = load_file(str(single / stage / "adapter_model.safetensors"))
        held = torch.load(probe / f"{stage}-rank0.pt", weights_only=False)["adapter"]
        assert saved.keys() == reference.keys() == held.keys() and saved
        for k, v in saved.items():
            assert torch.equal(v, held[k]), k
            torch.testing.assert_close(v, reference[k], atol=1e-4, rtol=1e-3)


def test_qlora_under_zero3_is_refused_with_a_clear_error():
    from deltalign.zero import check_supported

    check_supported("nf4", 2)  # ZeRO-2 leaves parameters whole
    check_supported("none", 3)
    with pytest.raises(ValueError, match="QLoRA.*not supported under DeepSpeed ZeRO-3.*zero2.yaml"):
        check_supported("nf4", 3)
