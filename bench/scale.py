"""make bench-scale: memory per process under ZeRO, measured on a random ~1B Llama built locally.

    python bench/scale.py                 # the four settings below, SFT then DPO, 2 optimizer steps each
    python bench/scale.py --quick         # a ~0.23B model (the same code path, a few minutes): a check
    python bench/scale.py --settings zero3 --quick

The model: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 key-value heads, MLP 5632) with SmolLM2's
tokenizer (vocabulary 49152, tied embeddings): 1.03B parameters, float32, random weights, written once to
``models/.cache/random-llama-1b`` as safetensors (no download). SFT (LoRA r=16 on every linear layer, batch 1,
128 tokens, activation checkpointing) and then DPO (the SFT delta as frozen reference, a trainable copy as
policy, 1 pair) run 2 optimizer steps each, evaluation off, in each setting:

* ``single``: one process;
* ``zero2``: ZeRO-2, 2 processes (``configs/accelerate/zero2.yaml``);
* ``zero3``: ZeRO-3, 2 processes, with the live-parameter limits of :data:`LIVE` over ``ds_zero3.json`` so that
  ZeRO-3 gathers a few layers at a time, never the whole model;
* ``zero3_offload``: the same plus optimizer CPU offload (``ds_zero3_offload.json``): reported, no goal (the
  "device" is the CPU here).

Each stage of each setting is a fresh launch. Every process runs this file as a wrapper around
``python -m deltalign run``: it samples its own ``/proc/self/status`` every 20 ms and records the RSS right
before the base is loaded (imports done), after loading, after ``engine.prepare`` (DeepSpeed initialised), and at
the end ``VmHWM``; the table shows per rank the peak above the pre-load RSS, anonymous and file-backed pages apart
(a memory-mapped safetensors file counts as RssFile), and s/step from the stage's own step log (step 2 minus
step 1). The model-state prediction is docs/scaling.md's formula with a float32 base: per process
``4 N_base + 16 N_trainable`` (one process), ``4 N_base + N_trainable (4 + 12 / 2)`` (ZeRO-2),
``(4 N_base + 16 N_trainable) / 2`` (ZeRO-3); it is compared with the anonymous memory added by loading and
preparing (before any activation) plus the file pages the run touched (transformers leaves the weights of a
one-process load memory-mapped, read in at the first forward).

``python bench/scale.py --rewrite bench/results/scale-<stamp>.json`` renders a result's table again from its
JSON (after a change to :func:`table`).

Writes ``bench/results/scale-<date>-<time>[-quick].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_random_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "quick": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=4),
}
# ZeRO-3 keeps at most this many parameters gathered (below one decoder layer of the 1B shape, 44M: a layer's
# weights are released as soon as its forward or backward has used them), prefetches nothing ahead and keeps
# nothing for reuse. (5e7 live with a 2e7 prefetch peaked ~7% higher per rank at the same s/step.)
LIVE = {"stage3_max_live_parameters": 2e7, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
        "reduce_bucket_size": 1e7,
        "stage3_param_persistence_threshold": 0}
SETTINGS = {
    "single": (None, None),
    "zero2": ("configs/accelerate/zero2.yaml", None),
    "zero3": ("configs/accelerate/zero3.yaml", "configs/accelerate/ds_zero3.json"),
    "zero3_offload": ("configs/accelerate/zero3_offload.yaml", "configs/accelerate/ds_zero3_offload.json"),
}
STAGES = ("sft", "dpo")
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


# --- the model ------------------------------------------------------------------------------------------------------

def build_model(shape: str) -> Path:
    """A random Llama of the given shape with SmolLM2's tokenizer, written once (safetensors)."""
    out = ROOT / "models" / ".cache" / f"random-llama-{shape}"
    if (out / "model.safetensors").is_file():
        return out
    write_random_llama(SHAPES[shape], out, seed=0)
    return out


def base_numel(path: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from deltalign.zero.loading import safetensors_index

    n = 0
    for _, _, _, _, shape in safetensors_index(path).values():
        k = 1
        for d in shape:
            k *= d
        n += k
    return n


# --- one process (the wrapper) ----------------------------------------------------------------------------------

def status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(rest.split()[0]) * 1024
    return out


def malloc_stats():
    """glibc's heap figures (mallinfo2, bytes): ``in_use`` (allocated from the heap), ``free`` (freed but kept by
    the allocator: fragmentation the RSS still counts), ``mmapped`` (large blocks, returned when freed); None
    where there is no glibc."""
    import ctypes

    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
             "keepcost")

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in names]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Info

    def read() -> dict[str, int]:
        i = fn()
        return {"in_use": i.uordblks, "free": i.fordblks, "mmapped": i.hblkhd}

    return read


def child(out_file: Path, argv: list[str]) -> int:
    """Run ``python -m deltalign <argv>`` in this process, recording its memory (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    rec: dict = {"rank": int(os.environ.get("RANK", "0")), "marks": {}}
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    heap = malloc_stats()

    def sample():
        while not stop.is_set():
            s = status()
            if s["RssAnon"] > peak["RssAnon"] and heap is not None:  # where the anonymous peak sits
                rec["heap_at_peak"] = heap() | {"RssAnon": s["RssAnon"], "t": round(time.time() - t_load, 2)}
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.02)

    from deltalign.model import backbone as backbone_mod
    from deltalign.training import engine as engine_mod
    from deltalign.pipeline.cli import main

    real_load, real_prepare = backbone_mod.load_base, engine_mod.Engine.prepare

    t_load = time.time()

    def load_base(cfg):
        nonlocal t_load
        t_load = time.time()
        rec["marks"].setdefault("before_load", status())
        peak.update(RssAnon=0, RssFile=0)  # peaks from here on
        result = real_load(cfg)
        rec["marks"].setdefault("after_load", status())
        if "load_peak" not in rec:  # the high-water marks while loading (the base being built), then after it
            rec["load_peak"] = dict(peak)
            peak.update(RssAnon=0, RssFile=0)
        return result

    def prepare(self, *a, **k):
        model = real_prepare(self, *a, **k)
        rec["marks"].setdefault("after_prepare", status())
        rec["trainable"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in self._params)
        return model

    backbone_mod.load_base, engine_mod.Engine.prepare = load_base, prepare
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        return main(argv)
    finally:
        stop.set()
        thread.join()
        rec["end"], rec["peak"] = status(), dict(peak)
        out_file.with_name(f"{out_file.stem}-rank{rec['rank']}.json").write_text(json.dumps(rec))


# --- the orchestrator -----------------------------------------------------------------------------------------------

def deepspeed_files(work: Path, setting: str) -> str | None:
    """The accelerate YAML for a setting; for ZeRO-3, copies of the YAML and JSON with :data:`LIVE` applied."""
    yaml_path, ds_path = SETTINGS[setting]
    if ds_path is None:
        return yaml_path
    import yaml

    ds = json.loads((ROOT / ds_path).read_text())
    ds["zero_optimization"].update(LIVE)
    (work / f"{setting}.json").write_text(json.dumps(ds, indent=2))
    acc = yaml.safe_load((ROOT / yaml_path).read_text())
    acc["deepspeed_config"]["deepspeed_config_file"] = str(work / f"{setting}.json")
    (work / f"{setting}.yaml").write_text(yaml.safe_dump(acc))
    return str(work / f"{setting}.yaml")


def overrides(model: Path) -> list[str]:
    sets = [f"model.path={model}", "model.dtype=float32", "model.gradient_checkpointing=true"]
    for s in STAGES:
        sets += [f"{s}.max_steps=2", f"{s}.batch_size=1", f"{s}.grad_accum=1", f"{s}.max_length=128",
                 f"{s}.eval_data=", f"{s}.eval_checker=false", f"{s}.checkpoint_every=0", f"{s}.log_every=1",
                 f"{s}.warmup_ratio=0", f"{s}.adapter.r=16", f"{s}.adapter.alpha=32", f"{s}.adapter.dropout=0"]
    return [x for s in sets for x in ("--set", s)]


def launch(setting: str, stage: str, model: Path, work: Path, timeout: float) -> dict:
    config = deepspeed_files(work, setting)
    run_dir, probe = work / setting / "run", work / setting / stage
    probe.parent.mkdir(parents=True, exist_ok=True)
    args = [str(Path(__file__).resolve()), "--child", str(probe), "run", stage, "--config",
            "configs/default.yaml", *overrides(model), "--run-dir", str(run_dir)]
    if config:
        cmd = [str(ROOT / ".venv/bin/accelerate"), "launch", "--config_file", config, "--num_processes", "2", *args]
        threads = "1"
    else:
        cmd, threads = [sys.executable, *args], str(os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (work / setting / f"{stage}.log").write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"[scale] {setting} {stage} failed (exit {p.returncode}); log: {work / setting}/{stage}.log\n"
                         + p.stderr[-3000:])
    ranks = [json.loads(f.read_text()) for f in sorted(probe.parent.glob(f"{stage}-rank*.json"))]
    steps = [json.loads(l) for l in (run_dir / stage / "metrics.jsonl").read_text().splitlines() if l.strip()]
    times = [r["time"] for r in steps if r["kind"] == "train"]
    return {"wall_s": round(time.time() - t0, 1), "s_per_step": round(times[-1] - times[-2], 2) if len(times) > 1
            else None, "ranks": ranks}


def predicted(n_base: int, n_trainable: int, setting: str) -> float:
    """docs/scaling.md's model-state formula per process (float32 base: 4 bytes per parameter)."""
    base, state = 4 * n_base, 16 * n_trainable
    if setting == "single":
        return base + state
    if setting == "zero2":
        return base + n_trainable * (4 + 12 / 2)
    return (base + state) / 2  # ZeRO-3; with optimizer offload the same host memory holds the offloaded state


def table(results: dict, n_base: int) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    lines = ["| setting | stage | rank | peak above pre-load RSS (VmHWM) | anon peak (loading / after) | file peak | "
             "model state measured / predicted | s/step |", "|---|---|---|---|---|---|---|---|"]
    single = {}
    for setting, stages in results.items():
        for stage, r in stages.items():
            for x in r["ranks"]:
                m = x["marks"]
                hwm = x["end"]["VmHWM"] - m["before_load"]["VmRSS"]
                if setting == "single":
                    single[stage] = hwm
                share = f" ({hwm / single[stage]:.2f}x one process)" if setting != "single" and stage in single else ""
                # anonymous memory added by loading and set-up, plus the file pages the run touched (transformers
                # leaves the weights of a one-process load memory-mapped: they are read in at the first forward)
                state = (m["after_prepare"]["RssAnon"] - m["before_load"]["RssAnon"]
                         + max(x["peak"]["RssFile"], x.get("load_peak", {}).get("RssFile", 0))
                         - m["before_load"]["RssFile"])
                pred = predicted(n_base, x["trainable"], setting)
                anon = gb(x["peak"]["RssAnon"] - m["before_load"]["RssAnon"])
                if "load_peak" in x:  # newer runs: the peak while the base was built, then after it
                    anon = f"{gb(x['load_peak']['RssAnon'] - m['before_load']['RssAnon'])} / {anon}"
                file_peak = max(x["peak"]["RssFile"], x.get("load_peak", {}).get("RssFile", 0))
                lines.append(f"| {setting} | {stage} | {x['rank']} | {gb(hwm)}{share} | {anon} | "
                             f"{gb(file_peak - m['before_load']['RssFile'])} | "
                             f"{gb(state)} / {gb(pred)} ({state / pred - 1:+.0%}) | {r['s_per_step']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if "--rewrite" in sys.argv:
        f = Path(sys.argv[sys.argv.index("--rewrite") + 1])
        d = json.loads(f.read_text())
        md = f.with_suffix(".md")
        text = md.read_text()
        md.write_text(text[:text.index("| setting |")] + table(d["results"], d["n_base"]))
        return 0
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        return child(Path(sys.argv[i + 1]), sys.argv[i + 2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~0.23B model instead of ~1B (a check, not the result)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--note", default="", help="a sentence for the result file (e.g. what else ran meanwhile)")
    args = ap.parse_args()
    model = build_model("quick" if args.quick else "1b")
    n_base = base_numel(model)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    work = ROOT / "runs" / "scale" / stamp
    work.mkdir(parents=True, exist_ok=True)
    print(f"[scale] {model.name}: {n_base / 1e9:.2f}B parameters; work dir {work}", flush=True)
    results: dict = {}
    t0 = time.time()
    for setting in args.settings.split(","):
        results[setting] = {}
        for stage in STAGES:
            results[setting][stage] = launch(setting, stage, model, work, args.timeout)
            print(f"[scale] {setting} {stage}: {results[setting][stage]['wall_s']} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    suffix = "-quick" if args.quick else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"# ZeRO scaling: memory per process, {model.name} ({n_base / 1e9:.2f}B parameters, float32) — "
            f"{stamp}{' (QUICK: a ~0.23B model)' if args.quick else ''}\n\nMachine: {machine}. Commit {commit}. "
            f"SFT then DPO, 2 optimizer steps each, batch 1 x 128 tokens, LoRA r=16 on every linear layer, "
            f"activation checkpointing; ZeRO-3 live-parameter limits {LIVE}. Total {time.time() - t0:.0f} s. "
            f"{args.note}\n\n"
            + table(results, n_base))
    (out / f"scale-{stamp}{suffix}.md").write_text(text)
    (out / f"scale-{stamp}{suffix}.json").write_text(json.dumps(
        {"model": str(model), "n_base": n_base, "commit": commit, "machine": machine, "live": LIVE, "note": args.note,
         "results": results}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
