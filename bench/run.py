"""Benchmark orchestrator: deltalign vs TRL on the same model, data and settings; one markdown table.

    python bench/run.py [--quick] [--runs N] [--steps N] [--ppo-steps N] [--grpo-steps N] [--threads N]
                        [--stages sft,rm,dpo,ppo,grpo] [--device {cpu,cuda}] [--model PATH|random:SIZE] [--no-trl]

(``make bench`` / ``make bench QUICK=1``.) Every measurement is a fresh process; for each stage the sides alternate
(ours, TRL, ours, TRL, ...; for PPO ours, TRL, naive, ...), and each number is the median over the runs. Our side
runs with ``.venv/bin/python`` (deltalign's own environment), TRL's with ``.bench-venv/bin/python`` (the same torch /
transformers / peft / accelerate pins plus trl, from bench/requirements.txt), the naive four-model PPO with
``.venv``. Peak resident memory is each child's own ``ru_maxrss`` (from ``os.wait4`` on that child).

Writes ``bench/results/<date>-<time>[-quick].md`` (the table, the machine, the settings, the goals) and ``.json``
(everything, every run). Model FLOPs per token and the time window: see ``bench/common.py``.

``--device cuda`` runs every child on the GPU in bfloat16 (tokens/s, MFU = FLOP/s share of a measured bf16 matmul
peak, peak GPU memory next to RSS); ``--model random:SIZE`` builds a random Llama of about that size
(``common.random_shape``) once under ``bench/.cache``. A run that is not the default (cpu, SmolLM2) writes
``bench/results/<device>-<model>-<date>-<time>[-quick].md`` instead, a name docs/refresh.py never takes for the
main table. Where ``trl`` / ``datasets`` cannot be imported (a stock GPU machine), TRL's column reads "not run" and
the notes say why; our side runs alone. Interpreters: ``.venv/bin/python`` / ``.bench-venv/bin/python`` when they
exist, else this one (``BENCH_OURS_PY`` / ``BENCH_TRL_PY`` override).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (PLANNED, RANDOM_PREFIX, ROOT, WORKLOAD_STAGES, WORKLOADS, Settings, parse_result,  # noqa: E402
                    spawn)

BENCH = ROOT / "bench"


def _python(env_var: str, venv: str) -> str:
    """The interpreter for one side: ``$env_var``, else the repo's venv when it exists, else this interpreter (a
    machine with only stock packages and no venv)."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    return str(ROOT / venv) if (ROOT / venv).exists() else sys.executable


OURS_PY = _python("BENCH_OURS_PY", ".venv/bin/python")
TRL_PY = _python("BENCH_TRL_PY", ".bench-venv/bin/python")
DEFAULT_MODEL = Settings().model
STAGES = ["sft", "rm", "dpo", "ppo", "grpo"]
# headline metric of each stage (higher is better), and the unit shown
# QUICK=1 overrides of the shared settings (under 10 minutes on 2 cores; not comparable with the full table)
QUICK = {"steps": 3, "ppo_steps": 2, "batch_size": 4, "ppo_mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 32,
         "grpo_steps": 2, "grpo_batch_size": 2, "grpo_num_generations": 4, "grpo_epochs": 2}
METRIC = {"sft": ("tokens_per_s", "tokens/s"), "rm": ("pairs_per_s", "pairs/s"), "dpo": ("pairs_per_s", "pairs/s"),
          "ppo": ("samples_per_s", "samples/s"), "grpo": ("samples_per_s", "samples/s")}


# --- running children -------------------------------------------------------------------------------------------

def run_child(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run one fresh process; its result line, wall time and peak RSS (os.wait4), or an error with the log tail."""
    rc, wall, rss_mb, text = spawn(cmd, log, timeout)
    res = parse_result(text)
    if res is None or rc != 0:
        tail = "\n".join(text.splitlines()[-15:])
        res = dict(res or {}, error=f"exit {rc}" + (" (timeout)" if wall >= timeout else ""), log_tail=tail)
    res["wall_s"] = round(wall, 1)
    res["peak_rss_mb_wait4"] = round(rss_mb, 1)
    return res


def child_env() -> dict:
    """The environment of a probe: the repo root appended to any PYTHONPATH the caller set (as ``spawn``)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if x))


def sh(py: str, code: str) -> str:
    try:
        return subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120,
                              env=child_env()).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {e}"


def trl_unavailable() -> str | None:
    """Why TRL's side cannot run here (None when ``trl`` and ``datasets`` import with TRL_PY)."""
    if not Path(TRL_PY).exists():
        return f"{TRL_PY} not found (build it with `make .bench-venv/.installed`)"
    try:
        p = subprocess.run([TRL_PY, "-c", "import datasets, trl"], capture_output=True, text=True, timeout=300,
                           env=child_env())
    except Exception as e:  # noqa: BLE001
        return f"{TRL_PY} could not be started: {e}"
    if p.returncode == 0:
        return None
    last = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
    return f"trl / datasets cannot be imported with {TRL_PY} ({last})"


def machine(device: str = "cpu", trl: bool = True) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    versions = "import json,torch,transformers,peft,accelerate; v={'torch':torch.__version__," \
               "'transformers':transformers.__version__,'peft':peft.__version__,'accelerate':accelerate.__version__}"
    ours = sh(OURS_PY, versions + "; print(json.dumps(v))")
    theirs = (sh(TRL_PY, versions + "; import trl; v['trl']=trl.__version__; print(json.dumps(v))") if trl
              else "not run")
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "ram_gb": round(mem / 1024 ** 2, 1), "python": platform.python_version(),
            "kernel": platform.release(), "ours_env": _json(ours), "trl_env": _json(theirs)}
    if device == "cuda":
        info["gpu"] = _json(sh(OURS_PY, "import json,torch; p=torch.cuda.get_device_properties(0); print(json.dumps("
                               "{'name':p.name,'memory_gb':round(p.total_memory/2**30,1),'count':"
                               "torch.cuda.device_count(),'cuda':torch.version.cuda}))"))
    return info


def _json(text: str):
    try:
        return json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        return text


# --- aggregation ----------------------------------------------------------------------------------------------

def median_of(runs: list[dict], key: str):
    vals = [r[key] for r in runs if "error" not in r and isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def aggregate(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {"n_ok": len(ok), "n": len(runs)}
    if not ok:
        out["error"] = runs[0].get("error") if runs else "not run"
        return out
    for k in ("tokens_per_s", "pairs_per_s", "samples_per_s", "rows_per_s", "s_per_step", "flops_per_s",
              "peak_rss_mb", "peak_rss_mb_wait4", "peak_gpu_mb", "wall_s"):
        v = median_of(ok, k)
        if v is not None:
            out[k] = v
    return out


def fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def gb(mb) -> str:
    return "n/a" if mb is None else f"{mb / 1024:.2f} GB"


def table(agg: dict, peak: float | None, gpu: bool = False) -> str:
    """The markdown table; ``gpu``: two more columns, peak GPU memory (``torch.cuda.max_memory_allocated``)."""
    def share(a):
        f = a.get("flops_per_s")
        return "n/a" if f is None or not peak else f"{100 * f / peak:.1f}%"

    def cell(a, key):
        if "error" in a:
            err = str(a["error"])
            return "not available" if "not available" in err else "not run" if "not run" in err else "failed"
        return fmt(a.get(key))

    extra = " peak GPU mem ours | peak GPU mem TRL |" if gpu else ""
    rows = ["| stage | metric | ours | TRL | ours / TRL | peak RSS ours | peak RSS TRL | "
            "FLOP/s share of peak, ours | FLOP/s share of peak, TRL |" + extra,
            "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "")]

    def mem(a, b=None):
        return f" {gb(a.get('peak_gpu_mb'))} | {gb(b.get('peak_gpu_mb')) if b is not None else ''} |" if gpu else ""

    for stage in STAGES:
        if stage not in agg:
            continue
        a, b = agg[stage]["ours"], agg[stage]["trl"]
        key, unit = METRIC[stage]
        x, y = a.get(key), b.get(key)
        ratio = f"{x / y:.2f}x" if x and y and "error" not in a and "error" not in b else "n/a"
        rows.append(f"| {stage.upper()} | {unit} | {cell(a, key)} | {cell(b, key)} | {ratio} | "
                    f"{gb(a.get('peak_rss_mb'))} | {gb(b.get('peak_rss_mb'))} | {share(a)} | {share(b)} |"
                    + mem(a, b))
        if stage == "dpo":
            x, y = a.get("s_per_step"), b.get("s_per_step")
            ratio = f"{y / x:.2f}x faster" if x and y else "n/a"
            rows.append(f"| DPO | s/step | {cell(a, 's_per_step')} | {cell(b, 's_per_step')} | {ratio} | | | | |"
                        + (" | |" if gpu else ""))
        if stage == "ppo" and "naive" in agg[stage]:
            n = agg[stage]["naive"]
            rows.append(f"| PPO, naive 4 models (memory baseline) | samples/s | {cell(n, key)} | | | "
                        f"{gb(n.get('peak_rss_mb'))} | | {share(n)} | |" + mem(n))
    return "\n".join(rows)


def goals(agg: dict, peak: float | None = None) -> list[str]:
    """Issue 17's goals, checked against the medians (reported, not asserted)."""
    def g(stage, side, key):
        return agg.get(stage, {}).get(side, {}).get(key)

    out = []

    def line(text, value, ok):
        mark = "not measured" if ok is None else ("met" if ok else "NOT met")
        out.append(f"- {text}: {value} — {mark}")

    def ratio(text, stage, key, goal, memory=False):
        o, t = g(stage, "ours", key), g(stage, "trl", key)
        m_o, m_t = g(stage, "ours", "peak_rss_mb"), g(stage, "trl", "peak_rss_mb")
        r = o / t if o and t else None
        ok = None if r is None else r >= goal and (not memory or bool(m_o and m_t and m_o <= m_t))
        line(text, (f"{r:.2f}x" + (f" at {gb(m_o)} vs {gb(m_t)}" if memory else "")) if r else "n/a", ok)

    ratio("SFT tokens/s >= 1.6x TRL", "sft", "tokens_per_s", 1.6)
    ratio("RM pairs/s >= 1.5x TRL", "rm", "pairs_per_s", 1.5)
    ratio("DPO pairs/s >= 2.0x TRL at no more peak memory", "dpo", "pairs_per_s", 2.0, memory=True)
    p_o, naive = g("ppo", "ours", "samples_per_s"), g("ppo", "naive", "samples_per_s")
    line("PPO samples/s >= the naive four-model PPO's", f"{p_o / naive:.2f}x" if p_o and naive else "n/a",
         None if not (p_o and naive) else p_o >= naive)
    ratio("PPO samples/s >= 1.3x TRL", "ppo", "samples_per_s", 1.3)
    m_o, m_n = g("ppo", "ours", "peak_rss_mb"), g("ppo", "naive", "peak_rss_mb")
    r = m_o / m_n if m_o and m_n else None
    line("PPO peak memory <= 0.5x the naive four-model PPO", f"{r:.2f}x" if r else "n/a",
         None if r is None else r <= 0.5)
    for stage, goal in (("sft", 0.5), ("rm", 0.5), ("dpo", 0.5), ("ppo", 0.3)):
        f = g(stage, "ours", "flops_per_s")
        share = f / peak if f and peak else None
        line(f"{stage.upper()} FLOP/s share of the matmul peak >= {goal:.0%}"
             + (" (whole step; its phases: bench/profile_ppo.py)" if stage == "ppo" else ""),
             f"{share:.1%}" if share else "n/a", None if share is None else share >= goal)
    ratio("GRPO samples/s >= 1.3x TRL at <= its peak memory", "grpo", "samples_per_s", 1.3, memory=True)
    return out


def ppo_upstream(s: Settings) -> str:
    """The folder of untrained ``sft`` + ``rm`` deltas that ppo and grpo read, one per model, LoRA setting and
    (other than float32) dtype."""
    key = hashlib.sha256(json.dumps([s.model, s.lora_r, s.lora_alpha, s.lora_dropout, s.target_modules, s.seed]
                                    + ([s.dtype] if s.dtype != "float32" else [])).encode()).hexdigest()[:12]
    return str(BENCH / ".cache" / f"ppo-upstream-{key}")


def work_notes(raw: dict, s: Settings) -> list[str]:
    """Where the sides do different work for the same samples (the issue's rule: say so in the table's notes)."""
    out = []
    shares = []
    for stage in ("sft", "rm", "dpo"):
        runs = [r for r in raw.get(stage, {}).get("ours", []) if r.get("computed_tokens") and r.get("tokens")]
        if runs:
            shares.append(f"{stage.upper()} {statistics.median(r['computed_tokens'] / r['tokens'] for r in runs):.0%}")
    if shares:
        out.append("SFT, RM, DPO: ours computes every token prefix that rows of a batch share once (share_prefixes, "
                   "on by default: a pair's prompt, the common system prompt; packed rows with a tree attention "
                   "mask, or attention over the batch's own rows where that is cheaper, the same values); it ran "
                   "this share of the tokens TRL ran: " + ", ".join(shares) + "; "
                   "our FLOP/s share counts only the tokens it ran (bench/common.py tree_flops).")
    if "ppo" in raw or "grpo" in raw:
        out.append("PPO, GRPO: ours packs its training and scoring forwards the same way (a GRPO group's prompt, "
                   "the system prompt, once; generation is not packed); their FLOP/s shares charge every token of "
                   "every row on every side, so ours counts shared tokens it did not recompute.")
    if "ppo" in raw:
        n_mini = -(-s.batch_size // s.ppo_mini_batch_size)
        out.append("PPO: ours takes the old log-probs and old values of the first minibatch's rows from that "
                   "update's own policy and critic training forwards (nothing updated yet, dropout off: the same "
                   "functions, ratio 1; the old values only with full checkpointing, as here) and runs the "
                   "separate no-grad forwards only for the other rows (here "
                   f"{n_mini} minibatch(es) per rollout: "
                   f"{'no separate forwards' if n_mini == 1 else f'{n_mini - 1} of {n_mini}'}); TRL and the naive "
                   "PPO run both for every row; every side is charged the same model FLOPs (bench/common.py), so "
                   "our FLOP/s share counts forwards we did not run.")
    if "grpo" in raw:
        def ran(side: str, key: str):
            vals = {bool(r.get(key)) for r in raw["grpo"].get(side, []) if "error" not in r and key in r}
            return None if not vals else vals.pop() if len(vals) == 1 else "varies"

        what = {"old_logprobs": "a separate no-grad forward for the old log-probs",
                "reference": "a reference forward (beta > 0)"}
        for key, text in what.items():
            o, t = ran("ours", key), ran("trl", key)
            if o is None or t is None or o == t:
                continue
            who, other = ("TRL", "ours") if t is True else ("ours", "TRL")
            why = (" (ours takes them from the first pass's training forward: one minibatch per pass, dropout "
                   "off, so the ratio is 1 by construction; TRL runs it whenever gradient_accumulation_steps is "
                   "not a multiple of steps_per_generation x num_iterations: here 1 vs 1 x "
                   f"{s.grpo_epochs})") if key == "old_logprobs" and who == "TRL" else ""
            out.append(f"GRPO: {who} runs {text} every rollout and {other} does not{why}; "
                       f"{'our side does less work' if who == 'TRL' else 'TRL does less work'} per sample; "
                       f"each side's FLOP/s counts only the forwards it ran (bench/common.py).")
        n = s.grpo_batch_size * s.grpo_num_generations
        c = next((r["rollout_batch_size"] for r in raw["grpo"].get("ours", []) if "rollout_batch_size" in r), 16)
        out.append(f"GRPO: ours generates the {n} rows of a rollout in {-(-n // c)} chunk(s) of at most {c} "
                   f"(grpo.rollout.batch_size) with per-row seeded sampling, from length-grouped "
                   f"prompt batches; TRL generates all {n} rows at once (model.generate) from a random prompt order "
                   f"(RepeatSampler); reward = the embedded checker on both sides (no reward model).")
    return out


def data_label(s: Settings) -> str:
    src = s.sft_data if s.sft_data == s.pref_data else f"{s.sft_data} / {s.pref_data}"
    return src.replace("embedded:", "embedded ") + (", activation checkpointing in SFT / RM / DPO on both sides"
                                                     if s.train_gradient_checkpointing else "")


def plan_note(s: Settings) -> str:
    """One sentence on the batch plans this run used (bench/plan.py), for the result file."""
    stats = s.extra.get("plan_stats") or {}
    if not stats:
        return ""
    each = "; ".join(f"{k}: {v['steps']} x {v['batch']} rows of {v['rows_fit']} that fit {v['limit']} tokens "
                     f"(mean {v['mean_length']:.0f})" for k, v in stats.items())
    return (" Every side trains the same rows in the same batches in the same order (bench/plan.py; PPO: the same "
            f"prompts, TRL's own sampling order): {each}.")


def result_tag(workload: str, device: str, model: str) -> str:
    """The prefix of a run's result files: empty for the default run (embedded, cpu, SmolLM2: the main table's
    ``<date>-<time>``); ``<workload>-`` for another workload on its default model and the cpu; else
    ``[<workload>-]<device>-<model>-``. Only the empty prefix gives a name docs/refresh.py takes for the main table
    ([0-9]*.json); ``hh-[0-9]*.json`` is the hh table's."""
    wl = "" if workload == "embedded" else f"{workload}-"
    if device == "cpu" and model == WORKLOADS[workload].get("model", DEFAULT_MODEL):
        return wl
    slug = model.replace(RANDOM_PREFIX, "random-").strip("/").replace("/", "-")
    return f"{wl}{device}-{slug}-"


# --- main -------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="development mode: 1 run per side, fewer steps, batch 4, "
                                                         "lighter PPO and GRPO (see QUICK)")
    ap.add_argument("--runs", type=int, default=None, help="runs per side (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per SFT/RM/DPO process, the first "
                                                            "untimed (default 6)")
    ap.add_argument("--ppo-steps", type=int, default=None, help="PPO steps per process (default 3)")
    ap.add_argument("--grpo-steps", type=int, default=None, help="GRPO rollout steps per process, the first "
                                                                 "untimed (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all usable cores)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workload", choices=list(WORKLOADS), default="embedded",
                    help="what the stages train on: embedded (the synthetic task), hh (HH-harmless dialogues, "
                         "data/hh/train.jsonl) or 0.5b (the dialogues on a random ~0.5B Llama); bench/common.py")
    ap.add_argument("--stages", default=None, help="default: the workload's (bench/common.py WORKLOAD_STAGES)")
    ap.add_argument("--no-trl", action="store_true", help="run our side only")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where every child runs: cpu (float32, the default) or cuda (bfloat16 on both sides)")
    ap.add_argument("--model", default=None,
                    help=f"checkpoint directory (default {DEFAULT_MODEL}) or random:SIZE, a random Llama of about "
                         "SIZE parameters (tiny, 0.1b, 0.5b, ...) with SmolLM2's tokenizer, built once under "
                         "bench/.cache (rule: bench/common.py random_shape)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    args = ap.parse_args()
    wl = WORKLOADS[args.workload]
    args.model = args.model or wl.get("model", DEFAULT_MODEL)
    args.stages = args.stages or ",".join(WORKLOAD_STAGES[args.workload])

    runs = args.runs or (1 if args.quick else 3)
    s = Settings(threads=args.threads or len(os.sched_getaffinity(0)), device=args.device,
                 dtype="bfloat16" if args.device == "cuda" else "float32", model=args.model, model_name=args.model,
                 workload=args.workload, **{k: v for k, v in wl.items() if k != "model"})
    if args.quick:  # development: one run per side, a smaller batch and a lighter PPO step (both sides alike)
        s = dataclasses.replace(s, **QUICK)
    s.steps = args.steps or s.steps
    s.ppo_steps = args.ppo_steps or s.ppo_steps
    s.grpo_steps = args.grpo_steps or s.grpo_steps
    if args.batch_size:
        s.batch_size = args.batch_size
        s.ppo_mini_batch_size = min(s.ppo_mini_batch_size, s.batch_size)
    stages = [x for x in args.stages.split(",") if x]
    bad = [x for x in stages if x not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    if args.device == "cuda" and sh(OURS_PY, "import torch; print(torch.cuda.is_available())") != "True":
        print(f"--device cuda: torch.cuda.is_available() is not True with {OURS_PY}", file=sys.stderr)
        return 2
    trl_skip = "--no-trl" if args.no_trl else trl_unavailable()
    if trl_skip and not args.no_trl:
        print(f"[bench] TRL's side will not run: {trl_skip}", file=sys.stderr, flush=True)

    started = dt.datetime.now(dt.timezone.utc)
    tag = result_tag(args.workload, args.device, args.model)
    stamp = tag + started.strftime("%Y-%m-%d-%H%M") + ("-quick" if args.quick else "")
    logs = BENCH / ".cache" / "logs" / stamp
    load_before = os.getloadavg()
    if args.model.startswith(RANDOM_PREFIX):  # built (once) in a child, so that this process stays small
        built = run_child([OURS_PY, str(BENCH / "common.py"), "--build-random", args.model[len(RANDOM_PREFIX):],
                           "--seed", str(s.seed)], logs / "build-random.log", args.timeout)
        if "error" in built:
            print(f"[bench] could not build {args.model}: {built['error']}\n{built.get('log_tail', '')}",
                  file=sys.stderr)
            return 2
        s.model, s.model_params = built["path"], built["n_params"]
    planned = [x for x in stages if x in PLANNED]
    if planned:  # the rows and batches every side trains on (bench/plan.py), made once per settings
        made = run_child([OURS_PY, str(BENCH / "plan.py"), "--settings", s.to_json(), "--stages", ",".join(planned)],
                         logs / "plan.log", args.timeout)
        if "error" in made:
            print(f"[bench] could not make the batch plans: {made['error']}\n{made.get('log_tail', '')}",
                  file=sys.stderr)
            return 2
        s.extra["plans"] = {k: v["path"] for k, v in made["plans"].items()}
        s.extra["plan_stats"] = made["plans"]
    info = machine(args.device, trl=not trl_skip)
    print(f"[bench] {info['cpu']}, {info['usable_cpus']} cpus, {info['ram_gb']} GB"
          + (f", {info['gpu']}" if "gpu" in info else "") + f"; device={s.device}, model={model_label(s)}, "
          f"dtype={s.dtype}, threads={s.threads}, runs={runs}, steps={s.steps}, ppo_steps={s.ppo_steps}, "
          f"grpo_steps={s.grpo_steps}, batch={s.batch_size}; logs in {logs}", flush=True)

    loads: list[float] = []

    def child(tag: str, cmd: list[str], i: int) -> dict:
        t = time.time()
        res = run_child(cmd, logs / f"{tag}-{i}.log", args.timeout)
        what = res.get("error") or ", ".join(f"{k}={fmt(res[k])}" for k in ("tokens_per_s", "pairs_per_s",
                                             "samples_per_s", "s_per_step", "peak_rss_mb", "peak_flops") if k in res)
        print(f"[bench] {tag} #{i + 1}: {what} ({time.time() - t:.0f}s)", flush=True)
        loads.append(os.getloadavg()[0])  # 1-min load right after a child: ~threads when nothing else runs
        return res

    peak_runs = [child("matmul_peak", [OURS_PY, str(BENCH / "matmul_peak.py"), "--threads", str(s.threads),
                                       "--seconds", "1" if args.quick else "3", "--device", s.device,
                                       "--dtype", "bf16" if s.dtype == "bfloat16" else "fp32"], 0)]
    peak = max((r["peak_flops"] for r in peak_runs if "peak_flops" in r), default=None)

    raw: dict = {}
    for stage in stages:
        if stage in ("ppo", "grpo"):  # untrained sft (+ rm) folders, made once, shared by ppo and grpo
            s.extra["ppo_upstream"] = ppo_upstream(s)
        js = s.to_json()
        sides = {"ours": [OURS_PY, str(BENCH / "ours.py"), "--stage", stage, "--settings", js]}
        if not trl_skip:
            sides["trl"] = [TRL_PY, str(BENCH / "trl_side.py"), "--stage", stage, "--settings", js]
        if stage == "ppo":
            sides["naive"] = [OURS_PY, str(BENCH / "naive_ppo.py"), "--settings", js]
        if stage in ("ppo", "grpo") and (ROOT / "deltalign" / "stages" / f"{stage}.py").exists():
            child(f"{stage}_prepare", [OURS_PY, str(BENCH / "ours.py"), "--prepare-ppo", s.extra["ppo_upstream"],
                                       "--settings", js], 0)
        raw[stage] = {side: [] for side in sides}
        for i in range(runs):  # alternate: A, B(, C), A, B(, C), ...
            for side, cmd in sides.items():
                raw[stage][side].append(child(f"{stage}-{side}", cmd, i))
        raw[stage].setdefault("trl", [{"error": f"not run ({trl_skip})"}])

    agg = {stage: {side: aggregate(r) for side, r in sides.items()} for stage, sides in raw.items()}
    finished = dt.datetime.now(dt.timezone.utc)
    load_after = os.getloadavg()
    tbl = table(agg, peak, gpu=s.device == "cuda")
    goal_lines = goals(agg, peak)
    contended = max([load_before[0], *loads]) > s.threads + 0.75
    trl_v = info["trl_env"].get("trl") if isinstance(info["trl_env"], dict) else None
    notes = work_notes(raw, s)
    if trl_skip:
        notes.insert(0, f"TRL's side: not run ({trl_skip}); our side ran alone.")
    for stage, sides in raw.items():
        for side, rs in sides.items():
            bad = [r for r in rs if "error" in r]
            if side == "trl" and trl_skip:
                continue
            if bad:
                notes.append(f"{stage} ({side}): {len(rs) - len(bad)}/{len(rs)} runs succeeded; "
                             f"{bad[0]['error']}" + ("" if any(w in bad[0]["error"] for w in ("not available", "not run"))
                                                     else f" — log: {logs}"))

    gpu = info.get("gpu") if isinstance(info.get("gpu"), dict) else None
    peak_what = (f"bf16 matmul peak ({gpu['name'] if gpu else 'GPU'})" if s.device == "cuda"
                 else f"{'fp32' if s.dtype == 'float32' else s.dtype} matmul peak ({s.threads} thread(s))")
    md = [f"# deltalign vs TRL{' ' + trl_v if trl_v else ''} — {started:%Y-%m-%d %H:%M} UTC" + (" (QUICK mode)" if args.quick else "")
          + ("" if not tag else f" — {s.workload}, {s.device}, {model_label(s)}, {s.dtype}"),
          "",
          f"Workload: **{s.workload}** (bench/common.py WORKLOADS)." + plan_note(s),
          "",
          f"Device: **{s.device}**" + (f" ({gpu['name']}, {gpu['memory_gb']} GB)" if gpu else "")
          + f". Model: **{model_label(s)}** (`{s.model}`). Dtype: **{s.dtype}** (both sides).",
          "",
          f"Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs ({info['logical_cpus']} logical), "
          f"{info['ram_gb']} GB RAM, Linux {info['kernel']}, Python {info['python']}. "
          f"Ours: {_versions(info['ours_env'])}. TRL side: {_versions(info['trl_env'])}.",
          f"{peak_what}: {fmt(peak / 1e9 if peak else None)} GFLOP/s.",
          f"1-min load average before / highest after a child / after: {load_before[0]:.2f} / "
          f"{max(loads, default=0):.2f} / {load_after[0]:.2f}"
          + (" — **other work was running: these numbers are contended**" if contended else "") + ".",
          "",
          f"Same model ({model_label(s)}, {s.dtype}), data ({data_label(s)}), LoRA r={s.lora_r} "
          f"alpha={s.lora_alpha} dropout={s.lora_dropout} on {s.target_modules}, batch {s.batch_size} "
          f"(rows / pairs / prompts), max length {s.max_length}, {s.steps} steps per process "
          f"(PPO {s.ppo_steps}; the first step of each is warm-up, not timed), {s.threads} thread(s); "
          f"PPO: minibatch {s.ppo_mini_batch_size}, {s.ppo_epochs} epochs, {s.max_new_tokens} new tokens, "
          f"temperature {s.temperature}, activation checkpointing {'on' if s.ppo_gradient_checkpointing else 'off'} "
          f"(PPO only, every side). "
          f"GRPO: {s.grpo_batch_size} prompts x {s.grpo_num_generations} responses per step, {s.grpo_steps} steps "
          f"(first untimed), {s.grpo_epochs} passes per rollout (one update each), {s.max_new_tokens} new tokens, "
          f"temperature {s.temperature}, beta {s.grpo_beta}, checker reward, DAPO token loss, dropout off, "
          f"activation checkpointing {'on' if s.grpo_gradient_checkpointing else 'off'} on both sides; samples = "
          f"responses. Fresh process per run, sides alternating, median of {runs} run(s) each. "
          "Peak RSS = the whole process's resident high-water mark"
          + (" (peak GPU mem = torch.cuda.max_memory_allocated)" if s.device == "cuda" else "")
          + ". FLOP/s share: model FLOPs per real token "
          "(frozen-base LoRA: forward 2N + activation backward 2N, attention included; see bench/common.py) "
          "over the measured matmul peak" + (" (on cuda: the MFU)" if s.device == "cuda" else "") + ".",
          "",
          tbl,
          "",
          "Goals (shown, not asserted):",
          *goal_lines,
          *([""] + [f"Note: {n}" for n in notes] if notes else []),
          "",
          f"Finished {finished:%Y-%m-%d %H:%M} UTC ({(finished - started).total_seconds() / 60:.1f} min).",
          ""]
    text = "\n".join(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}.md").write_text(text)
    (out / f"{stamp}.json").write_text(json.dumps({
        "started": started.isoformat(), "finished": finished.isoformat(), "quick": args.quick, "runs": runs,
        "device": s.device, "model": s.model_name or s.model, "model_path": s.model, "model_params": s.model_params,
        "dtype": s.dtype, "trl_not_run": trl_skip,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "machine": info, "load_before": load_before, "load_after": load_after, "load_after_each_child": loads, "contended": contended,
        "settings": dataclasses.asdict(s), "matmul_peak_flops": peak, "matmul_runs": peak_runs,
        "medians": agg, "runs_raw": raw, "goals": goal_lines, "table_markdown": tbl}, indent=1, default=str))
    print("\n" + text)
    print(f"[bench] written {out / (stamp + '.md')} and .json")
    return 0


def model_label(s: Settings) -> str:
    """``random:0.5b (528M parameters, random init)`` or the checkpoint path."""
    name = s.model_name or s.model
    if name.startswith(RANDOM_PREFIX):
        return f"{name} ({s.model_params / 1e6:,.1f}M parameters, random init, seed {s.seed}, SmolLM2 tokenizer)"
    return name


def _versions(v) -> str:
    return ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else str(v)


if __name__ == "__main__":
    sys.exit(main())
