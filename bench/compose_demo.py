"""Composition demo: two DPO deltas trained on disjoint constraint families, composed, scored on both families.

    python bench/compose_demo.py [--model models/SmolLM2-135M-Instruct] [--quick] [--run-dir runs/compose-demo]
                                 [--out bench/results] [--threads N] [--set KEY=VALUE ...]

1. Data: the embedded constraint task split into two disjoint families of constraint kinds -- ``formatting``
   (lowercase, capitals, bullets, JSON) and ``wording`` (include / avoid a word, end phrase, start word, max words)
   -- written as filtered jsonl files, train and held-out per family, into ``<run-dir>/data/`` (the held-out
   questions are unseen in training: the embedded split is by question).
2. One SFT delta on the embedded SFT rows (both families), then two DPO deltas from it, one per family
   (deltalign's stage APIs: ``sft.run``, ``dpo.run``, ``compose.run``, exactly what ``python -m deltalign run``
   calls).
3. Compositions of the two DPO deltas with the ``compose`` stage: ``cat`` with weights 0.5/0.5 (the exact average:
   the shared SFT part once, half of each DPO change), ``cat`` as task arithmetic (``dpo_f + dpo_w - sft``: the
   shared SFT part once, each DPO change in full; weights 1, 1, -1) and learned per-layer ``gates`` (softmax, started
   at the average) trained with the SFT loss on a small mix of both families' demonstrations.
4. The held-out checker score (greedy decoding) of SFT, each DPO delta alone and each composition on BOTH
   families, per kind too; the table goes to ``<out>/compose-<date>-<time>[-quick].md`` and ``.json`` with the
   machine, the commit and every setting.

The default budget (SmolLM2-135M, float32, 2 CPU cores) is sized to finish in about 20 minutes; ``--quick`` is a
smoke run (a few steps, a few prompts: the numbers mean nothing); ``--model tiny --quick`` runs end to end in well
under a minute on the tiny random model (the check that the script works).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = {
    "formatting": ("lowercase", "uppercase", "bullets", "json_key"),
    "wording": ("include_keyword", "forbidden_word", "end_phrase", "start_word", "max_words"),
}
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
FOLDERS = {"cat 0.5/0.5": "compose-cat-average", "cat 1/1/-1 (task arithmetic)": "compose-cat-task-arithmetic",
           "gates (learned, softmax)": "compose-gates"}


@dataclass
class Budget:
    """Steps, learning rates and evaluation sizes of one demo run."""
    sft_steps: int = 24
    sft_lr: float = 3e-4
    dpo_steps: int = 24
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    dpo_nll_weight: float = 1.0
    batch_size: int = 8
    gates_steps: int = 16
    gates_lr: float = 0.1
    gates_rows_per_family: int = 64
    eval_per_family: int = 0  # 0: every held-out row of the family
    max_new_tokens: int = 48
    max_length: int = 256
    lora_r: int = 16
    lora_alpha: int = 32


QUICK = dict(sft_steps=4, dpo_steps=3, gates_steps=3, gates_rows_per_family=8, eval_per_family=8, batch_size=4,
             max_new_tokens=16)
TINY = dict(max_new_tokens=8, lora_r=4, lora_alpha=8)


def log(msg: str) -> None:
    print(f"[compose-demo {dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# --- data ---------------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def balanced(rows: list[dict], n: int) -> list[dict]:
    """The first ``n`` rows taking the constraint kinds in turn (0: every row, in their order)."""
    if not n:
        return rows
    queues: dict[str, list[dict]] = {}
    for r in rows:
        queues.setdefault(r["constraint"]["kind"], []).append(r)
    out: list[dict] = []
    while len(out) < n and any(queues.values()):
        for q in queues.values():
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def family_data(data_dir: Path, budget: Budget) -> dict:
    """Filtered jsonl files per family (train and held-out), and the gates' mixed demonstrations."""
    from deltalign.data.formats import load_rows
    from deltalign.rewards.checker import KINDS

    kinds = [k for fam in FAMILIES.values() for k in fam]
    if sorted(kinds) != sorted(KINDS):
        raise SystemExit(f"the families {FAMILIES} no longer split the checker's kinds {KINDS} exactly")
    splits = {s: load_rows(f"embedded:{s}") for s in ("sft_train", "pref_train", "pref_eval")}
    files: dict = {"families": {}}
    gates_rows = []
    for fam, fam_kinds in FAMILIES.items():
        pick = {s: [r for r in rows if r["constraint"]["kind"] in fam_kinds] for s, rows in splits.items()}
        held = balanced(pick["pref_eval"], budget.eval_per_family)
        files["families"][fam] = {
            "kinds": list(fam_kinds),
            "pref_train": str(write_jsonl(data_dir / f"{fam}_pref_train.jsonl", pick["pref_train"])),
            "heldout": str(write_jsonl(data_dir / f"{fam}_heldout.jsonl", held)),
            "sft_train": str(write_jsonl(data_dir / f"{fam}_sft_train.jsonl", pick["sft_train"])),
            "rows": {"pref_train": len(pick["pref_train"]), "heldout": len(held), "sft_train": len(pick["sft_train"])},
        }
        gates_rows += balanced(pick["sft_train"], budget.gates_rows_per_family)
    files["gates_train"] = str(write_jsonl(data_dir / "gates_train.jsonl", gates_rows))
    files["gates_rows"] = len(gates_rows)
    return files


# --- training -----------------------------------------------------------------------------------------------------

def train(run_dir: Path, model_cfg, budget: Budget, files: dict, threads: int) -> dict:
    """SFT, one DPO per family, then the compositions; returns {label: adapter folder} and the stage metrics."""
    from deltalign.model.backbone import AdapterConfig
    from deltalign.stages import compose, dpo, sft

    common = dict(batch_size=budget.batch_size, checkpoint_every=0, log_every=max(1, budget.dpo_steps // 4),
                  threads=threads, max_length=budget.max_length)
    adapter = AdapterConfig(r=budget.lora_r, alpha=budget.lora_alpha, dropout=0.05)
    stages: dict = {}
    folders: dict[str, Path] = {}
    walls: dict[str, float] = {}

    def timed(label, fn):
        t0 = time.time()
        log(f"{label} ...")
        out = fn()
        walls[label] = round(time.time() - t0, 1)
        log(f"{label} done in {walls[label]:.0f}s")
        gc.collect()  # the stage's backbone (one copy of the base) is not needed any more
        return out

    folders["sft"] = run_dir / "sft"
    stages["sft"] = timed("sft", lambda: sft.run(
        sft.Config(data="embedded:sft_train", eval_data="", eval_checker=False, lr=budget.sft_lr,
                   max_steps=budget.sft_steps, delta=adapter, **common),
        model_cfg, folders["sft"], {}))
    for fam, info in files["families"].items():
        label = f"dpo-{fam}"
        folders[label] = run_dir / label
        stages[label] = timed(label, lambda: dpo.run(
            dpo.Config(data=info["pref_train"], eval_data="", eval_checker=False, lr=budget.dpo_lr,
                       beta=budget.dpo_beta, nll_weight=budget.dpo_nll_weight, max_steps=budget.dpo_steps,
                       reference="sft", init="sft", **common),
            model_cfg, folders[label], {"sft": folders["sft"]}))
    fmt, word = str(folders["dpo-formatting"]), str(folders["dpo-wording"])
    recipes = {  # label -> compose settings (FOLDERS names their folders)
        "cat 0.5/0.5": dict(sources=[fmt, word], method="cat", weights=[0.5, 0.5]),
        "cat 1/1/-1 (task arithmetic)": dict(sources=[fmt, word, str(folders["sft"])], method="cat",
                                             weights=[1.0, 1.0, -1.0]),
        "gates (learned, softmax)": dict(sources=[fmt, word], method="gates", gate="softmax",
                                         data=files["gates_train"], lr=budget.gates_lr, max_steps=budget.gates_steps,
                                         **common),
    }
    for label, settings in recipes.items():
        folders[label] = run_dir / FOLDERS[label]
        stages[label] = timed(label, lambda: compose.run(
            compose.Config(eval_data="", eval_checker=False, **settings), model_cfg, folders[label], {}))
    return {"folders": folders, "stages": stages, "recipes": recipes, "wall_s": walls}


# --- evaluation ---------------------------------------------------------------------------------------------------

def evaluate(model_cfg, folders: dict[str, Path], files: dict, budget: Budget) -> dict:
    """Held-out checker score of every policy on each family (greedy), per kind too, on one backbone."""
    from deltalign.model.backbone import Backbone
    from deltalign.data.formats import load_rows, prompt_examples
    from deltalign.sampling.generation import GenerationConfig, checker_eval

    bb = Backbone.load(model_cfg)
    names = {}
    for i, (label, folder) in enumerate(folders.items()):
        names[label] = f"policy{i}"
        bb.load_adapter(names[label], folder, trainable=False)
    gen = GenerationConfig(max_new_tokens=budget.max_new_tokens, batch_size=16)
    results: dict = {}
    for fam, info in files["families"].items():
        rows = load_rows(info["heldout"])
        examples = prompt_examples(rows, info["heldout"])
        kinds = [r["constraint"]["kind"] for r in rows]
        for label, name in names.items():
            t0 = time.time()
            res = checker_eval(bb, examples, gen, name)
            per_kind = {}
            for k in dict.fromkeys(kinds):
                s = [x for x, kk in zip(res["scores"], kinds) if kk == k and x is not None]
                per_kind[k] = sum(s) / len(s) if s else None
            results.setdefault(label, {})[fam] = {
                "checker_score": res["checker_score"], "n": res["checker_n"], "per_kind": per_kind,
                "mean_response_tokens": res["mean_response_tokens"], "samples": res["samples"][:2],
                "wall_s": round(time.time() - t0, 1)}
            log(f"eval {label} on {fam}: {res['checker_score']:.3f} (n={res['checker_n']})")
    return results


# --- report -------------------------------------------------------------------------------------------------------

def machine() -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    mem = 0
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
        mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal")), 0)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "ram_gb": round(mem / 1024 ** 2, 1), "python": platform.python_version(), "kernel": platform.release(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "torch_threads": torch.get_num_threads()}


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    fams = list(FAMILIES)
    res, m, s = report["results"], report["machine"], report["settings"]
    lines = [f"# Composing deltas: two DPO deltas on disjoint constraint families — {report['started'][:16].replace('T', ' ')} UTC", "",
             f"Model `{report['model']}`, commit `{report['commit']}`{' — QUICK smoke run: the numbers mean nothing' if report['quick'] else ''}.",
             f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, {m['ram_gb']} GB RAM, Python {m['python']}, "
             f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, {m['torch_threads']} torch "
             "threads.", "",
             "Families (disjoint sets of constraint kinds of the embedded task; held-out questions unseen in "
             "training): " + "; ".join(f"**{f}** = {', '.join(FAMILIES[f])} "
                                       f"({report['data']['families'][f]['rows']['pref_train']} training pairs, "
                                       f"{report['data']['families'][f]['rows']['heldout']} held-out prompts)"
                                       for f in fams) + ".", "",
             f"Budget: SFT {s['sft_steps']} steps (both families, lr {s['sft_lr']:g}); each DPO {s['dpo_steps']} "
             f"steps from the SFT delta on its family's pairs (lr {s['dpo_lr']:g}, beta {s['dpo_beta']:g}, "
             f"RPO NLL weight {s['dpo_nll_weight']:g}); batch {s['batch_size']}, LoRA r={s['lora_r']} on all "
             f"linear layers. Gates: {s['gates_steps']} steps (lr {s['gates_lr']:g}) of SFT loss on "
             f"{report['data']['gates_rows']} demonstrations ({s['gates_rows_per_family']} per family), base and "
             f"both DPO deltas frozen. Greedy decoding, at most {s['max_new_tokens']} new tokens.", "",
             "Held-out checker score (share of responses that satisfy the prompt's constraint):", "",
             "| policy | " + " | ".join(fams) + " | mean of both | rank |",
             "|---|" + "---|" * (len(fams) + 2)]
    for label, row in res.items():
        scores = [row[f]["checker_score"] for f in fams]
        mean = sum(scores) / len(scores) if None not in scores else None
        lines.append(f"| {label} | " + " | ".join(fmt(x) for x in scores) + f" | {fmt(mean)} | "
                     f"{report['ranks'].get(label, '')} |")
    lines += ["", "Per kind (held-out checker score):", "",
              "| policy | " + " | ".join(k for f in fams for k in FAMILIES[f]) + " |",
              "|---|" + "---|" * sum(len(v) for v in FAMILIES.values())]
    for label, row in res.items():
        lines.append(f"| {label} | " + " | ".join(fmt(row[f]["per_kind"].get(k)) for f in fams for k in FAMILIES[f])
                     + " |")
    gates = next((st for label, st in report["stages"].items() if label.startswith("gates")), None)
    if gates:
        w = gates["gates"]["weights"]
        lines += ["", f"Learned gates (softmax over [dpo-formatting, dpo-wording] per decoder layer; started at "
                      f"0.50/0.50): mean {gates['gates']['mean'][0]:.3f} / {gates['gates']['mean'][1]:.3f}; "
                      f"per layer, dpo-formatting's weight: "
                      + ", ".join(f"{row[0]:.2f}" for row in w) + "."]
    walls = report["wall_s"]
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items()) + ".", "",
              "Compositions are made by the `compose` stage (deltalign/stages/compose.py); every composed delta is "
              "a plain LoRA adapter folder. `cat` is exact (the composed module outputs are the weighted sums of "
              "the sources'); task arithmetic subtracts the SFT delta once because both DPO deltas start from it.",
              "", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    """``["dpo_steps=40", "dpo_lr=5e-5"]`` -> typed Budget settings (an unknown key or a bad value exits)."""
    out = {}
    fields = Budget.__dataclass_fields__
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(getattr(Budget(), key))
        try:
            out[key] = kind(float(raw)) if kind is int and raw.replace(".", "", 1).isdigit() else kind(raw)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"base model folder, or tiny (default {DEFAULT_MODEL})")
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few steps and prompts (numbers meaningless)")
    ap.add_argument("--run-dir", default="runs/compose-demo", help="where the deltas and data go (replaced)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the .md and .json table")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: every usable CPU; 1 for tiny)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change one budget setting, e.g. --set dpo_steps=40 (repeatable; keys: "
                         + ", ".join(Budget.__dataclass_fields__) + ")")
    args = ap.parse_args(argv)

    os.chdir(ROOT)  # model and data paths are repo-relative
    for var, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(var, value)  # local model folders only
    import torch

    from deltalign.model.backbone import ModelConfig

    # the tiny model is dominated by thread synchronisation: one thread is fastest there (as in the tests)
    threads = args.threads or (1 if args.model == "tiny" else len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    budget = Budget(**{**(QUICK if args.quick else {}), **(TINY if args.model == "tiny" else {}),
                       **parse_overrides(args.overrides)})
    model_cfg = ModelConfig(path=args.model)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    run_dir = Path(args.run_dir)
    for sub in ("data", "sft", "dpo-formatting", "dpo-wording", *FOLDERS.values()):
        shutil.rmtree(run_dir / sub, ignore_errors=True)  # a fresh run: no stale checkpoint is resumed
    log(f"model {args.model}, {'quick' if args.quick else 'full'} budget, {threads} threads -> {run_dir}")

    files = family_data(run_dir / "data", budget)
    trained = train(run_dir, model_cfg, budget, files, threads)
    folders = {"sft": trained["folders"]["sft"], "dpo-formatting": trained["folders"]["dpo-formatting"],
               "dpo-wording": trained["folders"]["dpo-wording"],
               **{label: trained["folders"][label] for label in trained["recipes"]}}
    t_eval = time.time()
    results = evaluate(model_cfg, folders, files, budget)
    walls = trained["wall_s"] | {"evaluation": round(time.time() - t_eval, 1), "total": round(time.time() - t0, 1)}

    ranks = {label: json.loads((Path(f) / "adapter_config.json").read_text())["r"] for label, f in folders.items()}
    command = "python bench/compose_demo.py" + (f" --model {args.model}" if args.model != DEFAULT_MODEL else "") + \
        (" --quick" if args.quick else "") + "".join(f" --set {o}" for o in args.overrides)
    report = {"started": started.isoformat(), "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
              "model": args.model, "quick": args.quick, "commit": commit(), "machine": machine(),
              "settings": asdict(budget), "families": {k: list(v) for k, v in FAMILIES.items()}, "data": files,
              "recipes": trained["recipes"], "ranks": ranks, "results": results,
              "stages": {k: {kk: vv for kk, vv in v.items() if kk != "eval"} for k, v in trained["stages"].items()
                         if k.startswith(("cat", "gates"))},
              "wall_s": walls, "run_dir": str(run_dir), "command": command}
    text = markdown(report)
    report["table_markdown"] = text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"compose-{started:%Y-%m-%d-%H%M}" + ("-quick" if args.quick else "") + \
        ("-tiny" if args.model == "tiny" else "")
    (out / f"{stamp}.md").write_text(text)
    (out / f"{stamp}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("\n" + text)
    log(f"written {out / (stamp + '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
