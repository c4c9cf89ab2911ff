"""Refresh the figures in README.md and docs/*.md from the result files the code wrote; nothing is typed in.

A generated block in a markdown file reads::

    <!-- generated: NAME -->
    ...                          (rewritten by this script)
    <!-- /generated -->

and NAME is one of :data:`GENERATORS`, each reading one kind of result file:

* ``demo``: ``docs/results/demo.json``, the record ``make demo`` writes into its run folder (``--record-demo
  RUN_DIR`` below: ``RUN_DIR/demo.json``), copied here by ``make docs DEMO=runs/demo`` (``--publish``): the held-out
  comparison table ``python -m deltalign eval`` printed, with stage wall times, machine and commit;
* ``rl``: ``docs/results/rl.json``, the same after ``make ppo grpo eval CONFIG=configs/demo.yaml RUN=runs/demo``
  on the demo run (``--record-demo runs/demo --name rl``, then ``--publish runs/demo --name rl``);
* ``bench``: the newest full (not QUICK) ``bench/results/*.json`` of ``make bench``: the table vs TRL;
* ``bench-hh`` / ``bench-0.5b``: ``bench/results/<workload>-*.json`` of ``make bench WORKLOAD=...``: the newest
  full run of each stage, then the newest QUICK one (marked as such) where it measured a stage no full run did;
* ``bench-steps``: the same file's seconds per optimizer step of our SFT and DPO;
* ``zero-memory``: the predicted memory per GPU under each ZeRO stage, computed from parameter counts;
* ``ppo-profile``: the newest ``bench/profile_ppo.py`` table (PPO time, FLOP/s share and peak memory by phase);
* ``methods`` / ``methods-capabilities``: the newest full ``make methods`` table and the capability table of the
  delta methods (``bench/methods.py``).

    python docs/refresh.py                       # rewrite every block
    python docs/refresh.py --check               # exit 1 if a block differs (tests/test_docs.py runs this)
    python docs/refresh.py --record-demo runs/demo --wall 1790   # after make demo: record, then rewrite
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deltalign.reports.evaluation import markdown_table
from deltalign.reports.stats import wilson

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def _commit_of(path: Path) -> str:
    """The commit that recorded a result file (for files that do not name their own)."""
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], cwd=ROOT, capture_output=True,
                         text=True)
    return out.stdout.strip() or "uncommitted"


def machine() -> str:
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() \
        else platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB, Python {platform.python_version()}"


# --- generators ------------------------------------------------------------------------------------------------

def demo(name: str = "demo") -> str:
    f = RESULTS / f"{name}.json"
    if not f.exists():
        return f"_No `{name}` results recorded yet._\n"
    d = json.loads(f.read_text())
    order = ["base", "sft", "dpo", "kto", "ppo", "grpo", "compose"]  # the pipeline's order (the JSON sorts keys)
    table = dict(sorted(d["table"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    for row in table.values():  # a record from before eval gave intervals: the checker's from its own count
        if row.get("checker_score") is not None and "checker_score_ci" not in row:
            row["checker_score_ci"] = list(wilson(row["checker_score"] * row["n"], row["n"]))
    lines = [markdown_table(table)]
    if not any("rm_score_ci" in row for row in table.values()):
        lines.append("Recorded before `eval` gave every score its interval: only the checker score's (Wilson, from "
                     "its count) is shown, and its KL is the earlier estimate (the mean log-ratio, not eval's k3); "
                     "the next `make demo` records them all.")
    stages = ", ".join(f"{s} {t / 60:.1f} min" for s, t in d["stage_wall_s"].items())
    total = f"; {d['wall_s'] / 60:.1f} min from the first stage to the eval table" if d.get("wall_s") else ""
    peaks = ", ".join(f"{s} {g:.2f} GiB" for s, g in d.get("stage_peak_gib", {}).items())
    peaks = f"; peak memory per stage (host): {peaks}" if peaks else ""
    return ("\n\n".join(lines) + f"\n\nGreedy decoding. Stage wall times: "
            f"{stages}{total}{peaks}. Machine: {d['machine']}; commit {d['commit']}, {d['date']} "
            f"(`docs/results/{name}.json`).\n")


def _bench_files(stage: str = "sft") -> list[Path]:
    """Full (not QUICK) ``make bench`` result files that measured ``stage``, oldest first."""
    full = [p for p in sorted((ROOT / "bench" / "results").glob("[0-9]*.json")) if not p.stem.endswith("quick")]
    return [p for p in full if stage in json.loads(p.read_text()).get("medians", {})]


def _bench_file() -> Path | None:
    found = _bench_files()
    return found[-1] if found else None


def _bench_table(f: Path) -> str:
    d = json.loads(f.read_text())
    m = d["machine"]
    commit = d.get("commit") or _commit_of(f)
    return (f"{d['table_markdown']}\n\n{d['runs']} runs per side, medians; {m['cpu']}, {m['usable_cpus']} CPUs, "
            f"{m['ram_gb']} GB; fp32 matmul peak {d['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; commit {commit}, "
            f"{d['started'][:10]} (`bench/results/{f.name}`).\n")


def bench() -> str:
    """The newest full ``make bench`` table; a stage it lacks (GRPO, measured later with ``--stages grpo``) is
    appended from the newest full file that has it, with its own provenance."""
    f = _bench_file()
    if f is None:
        return "_No full `make bench` result yet._\n"
    out = _bench_table(f)
    measured = set(json.loads(f.read_text())["medians"])
    for stage in ("grpo",):
        later = _bench_files(stage)
        if stage not in measured and later:
            out += "\n" + _bench_table(later[-1])
    return out


def workload(name: str) -> str:
    """The ``make bench WORKLOAD=name`` tables: the newest full run of each stage (newest file first), then the
    newest QUICK run (marked so) where it measured a stage no full run did."""
    files = sorted((ROOT / "bench" / "results").glob(f"{name}-[0-9]*.json"), reverse=True)
    if not files:
        return f"_No `make bench WORKLOAD={name}` result yet._\n"
    parts, covered = [], set()
    for f in [p for p in files if not p.stem.endswith("quick")]:
        stages = set(json.loads(f.read_text())["medians"])
        if stages - covered:
            parts.append(_bench_table(f))
            covered |= stages
    quick = [p for p in files if p.stem.endswith("quick")]
    if quick and set(json.loads(quick[0].read_text())["medians"]) - covered:
        parts.append(f"**QUICK run** (`make bench WORKLOAD={name} QUICK=1`: one run per side, batch 4, two timed "
                     "steps): indicative only.\n\n" + _bench_table(quick[0]))
    return "\n".join(parts)


def bench_steps() -> str:
    f = _bench_file()
    if f is None:
        return "_No full `make bench` result yet._\n"
    d = json.loads(f.read_text())
    med, s = d["medians"], d["settings"]
    return (f"SFT {med['sft']['ours']['s_per_step']:.1f} s and DPO {med['dpo']['ours']['s_per_step']:.1f} s per "
            f"optimizer step of {s['batch_size']} rows / pairs (`make bench`, `bench/results/{f.name}`)")


# Llama-2 parameter counts: total, LoRA r=16 on every linear layer, embedding + LM head (kept in bf16 by QLoRA)
LLAMA2 = {"7B": (6.74e9, 40.0e6, 2 * 32000 * 4096), "70B": (68.98e9, 207.1e6, 2 * 32000 * 8192)}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, an fp8 absmax per 64-block, an fp32 scale per 256 blocks


def zero_memory(gpus: int = 8) -> str:
    """Predicted GB per GPU for weights + training state (no activations): the formulas of docs/scaling.md."""
    lines = ["| base, method | frozen base | trainable state | DDP / single | ZeRO-2 | ZeRO-3 | "
             "ZeRO-3 + optimizer offload |", "|---|---|---|---|---|---|---|"]
    for name, (n, lora, embed) in LLAMA2.items():
        for method in ("LoRA", "QLoRA"):
            base = 2 * n if method == "LoRA" else 2 * embed + NF4_BYTES * (n - embed)
            cells = [base, 16 * lora, base + 16 * lora, base + lora * (4 + 12 / gpus), (base + 16 * lora) / gpus,
                     (base + 8 * lora) / gpus]
            lines.append(f"| {name} {method} | " + " | ".join(f"{c / 1e9:.1f} GB" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def compose() -> str:
    """The newest ``make compose-demo`` table (bench/results/compose-*.md, written by bench/compose_demo.py)."""
    found = [p for p in sorted((ROOT / "bench" / "results").glob("compose-*.md")) if not p.stem.endswith("quick")]
    if not found:
        return "_No `make compose-demo` result yet._\n"
    text = found[-1].read_text()
    table = text[text.index("| policy |"):].split("\n\n", 1)[0]
    d = json.loads(found[-1].with_suffix(".json").read_text())
    return (f"{table}\n\nHeld-out checker score per family; {d.get('model', 'SmolLM2-135M-Instruct')}, commit "
            f"{d.get('commit', _commit_of(found[-1]))}, {found[-1].stem[8:18]} (`bench/results/{found[-1].name}`, "
            "with the budget, the per-kind scores and the learned gates).\n")


def scale() -> str:
    """The newest ``make bench-scale`` table (bench/results/scale-*.md, written by bench/scale.py); a QUICK one only
    if there is no full one, labelled."""
    found = sorted((ROOT / "bench" / "results").glob("scale-*.md"))
    full = [p for p in found if not p.stem.endswith("quick")]
    if not found:
        return "_No `make bench-scale` result yet._\n"
    f = (full or found)[-1]
    text = f.read_text()
    table = text[text.index("| setting |"):].split("\n\n", 1)[0].rstrip("\n")
    d = json.loads(f.with_suffix(".json").read_text())
    label = "" if full else " **QUICK run (a ~0.23B model): a check, not the result.**"
    return (f"{table}\n\n{Path(d['model']).name} ({d['n_base'] / 1e9:.2f}B parameters, float32), {d['machine']}, "
            f"commit {d['commit']} (`bench/results/{f.name}`).{label} {d.get('note', '')}".rstrip() + "\n")


def ppo_profile() -> str:
    """The newest PPO phase profile (bench/results/ppo-profile-*.md, written by bench/profile_ppo.py)."""
    found = sorted((ROOT / "bench" / "results").glob("ppo-profile-*.md"))
    if not found:
        return "_No `python bench/profile_ppo.py` result yet._\n"
    text = found[-1].read_text()
    table = text[text.index("| variant |"):].split("\n\n", 1)[0].rstrip("\n")
    d = json.loads(found[-1].with_suffix(".json").read_text())
    return (f"{table}\n\nfp32 matmul peak {d['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; {d.get('machine', '')} "
            f"commit {d['commit']} (`bench/results/{found[-1].name}`).\n").replace("  ", " ")


def _bench_methods():
    """bench/methods.py, imported by path (registered in sys.modules: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench" / "methods.py")
    mod = sys.modules["bench_methods"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GENERATORS = {"demo": demo, "rl": lambda: demo("rl"), "bench": bench, "bench-steps": bench_steps,
              "bench-hh": lambda: workload("hh"), "bench-0.5b": lambda: workload("0.5b"),
              "zero-memory": zero_memory, "scale": scale, "compose": compose, "ppo-profile": ppo_profile,
              "methods": lambda: _bench_methods().results_block(),
              "methods-capabilities": lambda: _bench_methods().capability_table()}


# --- recording and rewriting ------------------------------------------------------------------------------------

def record_demo(run_dir: Path, wall_s: float | None, name: str = "demo") -> Path:
    """Write ``<run_dir>/<name>.json`` from a finished run directory on which ``eval`` ran; nothing outside the run
    directory changes (``make demo`` leaves ``git status`` clean). :func:`publish` copies it into the docs."""
    table = json.loads((run_dir / "eval_table.json").read_text())
    stage_wall, stage_peak = {}, {}
    for stage in ("sft", "rm", "dpo", "ppo", "grpo", "export"):
        m = run_dir / stage / "manifest.json"
        if m.exists():
            manifest = json.loads(m.read_text())
            stage_wall[stage] = manifest["wall_time_s"]
            if "host_gib" in manifest.get("peak_memory", {}):
                stage_peak[stage] = manifest["peak_memory"]["host_gib"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = {k: {x: v for x, v in row.items() if x != "samples"} for k, row in table.items()}
    out = run_dir / f"{name}.json"
    out.write_text(json.dumps({
        "table": rows, "n_prompts": next(iter(rows.values()))["n"], "stage_wall_s": stage_wall,
        "stage_peak_gib": stage_peak, "wall_s": wall_s,
        "machine": machine(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
    }, indent=1) + "\n")
    return out


def publish(run_dir: Path, name: str = "demo") -> None:
    """A maintainer's step (``make docs DEMO=<run>``): copy a run's record and its training curves into
    docs/results/, where the generated blocks read them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / f"{name}.json", RESULTS / f"{name}.json")
    for png in sorted((run_dir / "plots").glob("*.png")):  # the training curves the eval command drew
        shutil.copyfile(png, RESULTS / f"{name}-{png.name}")


def refresh(check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, compare) every generated block; returns the files that differ."""
    stale = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = md.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group(2)]().rstrip("\n") + "\n" + m.group(4), text)
        if new != text:
            stale.append(str(md.relative_to(ROOT)))
            if not check:
                md.write_text(new)
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a generated block is not current")
    p.add_argument("--record-demo", metavar="RUN_DIR",
                   help="write RUN_DIR/<name>.json from a finished demo run (and nothing else)")
    p.add_argument("--publish", metavar="RUN_DIR", help="copy RUN_DIR's record into docs/results/ first")
    p.add_argument("--wall", type=float, help="total wall seconds of the run (with --record-demo)")
    p.add_argument("--name", default="demo", help="results name: docs/results/<name>.json (with --record-demo)")
    args = p.parse_args(argv)
    if args.record_demo:
        print(f"recorded {record_demo(Path(args.record_demo), args.wall, args.name)} (`make docs DEMO="
              f"{args.record_demo}` puts it in the docs)")
        return 0
    if args.publish:
        publish(Path(args.publish), args.name)
    stale = refresh(check=args.check)
    if args.check and stale:
        print(f"generated blocks out of date in {', '.join(stale)}: run `make docs`", file=sys.stderr)
        return 1
    for f in stale:
        print(f"refreshed {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
