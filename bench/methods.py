"""Every delta method through SFT then DPO on the embedded default, at one budget: the comparison table.

    python bench/methods.py                    # make methods: every method, the full budget (~2 h 10 min here)
    python bench/methods.py --quick            # make methods QUICK=1: few steps, a few held-out rows (~16 min)
    python bench/methods.py --model tiny       # the whole thing on the tiny random Llama (QUICK budget): ~1 min
    python bench/methods.py --methods lora,prompt --quick     # some methods only (development)
    python bench/methods.py --estimate [--quick]              # print the time estimate and the plan, run nothing

For each method of ``deltalign.deltas.METHODS``: ``python -m deltalign run sft`` and then ``run dpo`` in two fresh
processes, in a run directory of its own (``runs/methods/<stamp>/<method>/``), with ``configs/default.yaml`` plus
the overrides of :func:`overrides`: the same steps, batches (seed 0, so the same rows and real tokens in the same
order) and evaluation for every method; only ``<stage>.adapter.method`` and the learning rate change (:data:`SFT_LR`,
with the literature it follows). DPO is the pipeline's default: the method's SFT delta, frozen, is the reference and
a trainable copy of it is the policy. One more process generates with the base model (every delta off) on the same
held-out prompts: the ``base`` row.

What each column is and where it comes from:

* trainable parameters: ``trainable_params`` of the SFT stage's setup line (``metrics.jsonl``); % of the base = over
  every parameter of the base checkpoint (counted from its safetensors headers, tied embeddings once);
* adapter on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` of the SFT stage;
* held-out SFT loss: the SFT stage's ``eval.json`` (mean token cross-entropy on the held-out completions);
* checker after SFT / after DPO: the DPO stage's ``eval.json``, rows ``reference`` (= the SFT delta) and ``dpo``:
  greedy generations on the SAME held-out preference prompts scored by the embedded checker, so the two columns
  are paired (``sft.eval_checker`` is off: the SFT stage would generate once more, on other prompts);
* s/step: from the ``time`` of each step's line in the stage's ``metrics.jsonl`` (``log_every=1``), over the
  window of ``bench/common.py``: from the end of the warm-up step(s) to the end of the last step; loading, data
  preparation, the DPO reference pass of later steps' pairs not excluded (it is part of each DPO step, as in
  ``make bench``), held-out evaluation excluded; checkpoints off (``checkpoint_every=0``);
* peak RSS: each stage process's own ``ru_maxrss`` (``os.wait4`` on that child): the whole process, evaluation
  included.

Writes ``bench/results/methods-<date>-<time>[-quick].md`` and ``.json`` (machine, commit, settings, every value, the
table). ``--model tiny`` / ``--config configs/tiny.yaml`` runs write into the work directory instead (a check, not a
measurement). :func:`results_block` and :func:`capability_table` are the generators docs/refresh.py uses.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, WARMUP_STEPS, parse_result, spawn  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "methods"
DEFAULT_CONFIG = "configs/default.yaml"
PREFIX = "methods-"

# SFT learning rate per method (AdamW with the engine's warm-up + cosine schedule). The literature each follows:
SFT_LR = {
    # configs/default.yaml's sft.lr, the shipped LoRA default. QLoRA (Dettmers et al. 2023) trains LoRA at 2e-4
    # (7B-13B; 1e-4 above), most LoRA recipes at 1e-4..3e-4; a short budget on a small model takes the top.
    "lora": 3e-4,
    # DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") compares against LoRA with LoRA's
    # hyperparameters, learning rate included.
    "dora": 3e-4,
    # (IA)^3 / T-Few (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
    # In-Context Learning"): 3e-3 (Adafactor).
    "ia3": 3e-3,
    # P-tuning v2 (Liu et al. 2022): the released run_script/*.sh train the prefix directly at 5e-3..1e-2 for most
    # tasks (up to 6e-2 for NER). Li & Liang's prefix-tuning trains through the reparameterisation MLP
    # (`prefix_projection`) at a far lower rate, ~5e-5; the default here is the P-tuning v2 form.
    "prefix": 1e-2,
    # Lester et al. 2021 ("The Power of Scale for Parameter-Efficient Prompt Tuning"): 0.3 with Adafactor; with
    # AdamW, peft's prompt-tuning causal-LM example uses 3e-2; 1e-2 as for the prefix.
    "prompt": 1e-2,
    # Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP") sweep {3e-5, 3e-4, 3e-3}; the
    # up-projection starts at zero and the budget is short: 1e-3, inside that range.
    "bottleneck": 1e-3,
    # BitFit (Ben Zaken et al. 2022), bias-only tuning, sweeps {1e-4, 4e-4, 7e-4, 1e-3} and mostly picks 1e-3;
    # LayerNorm tuning is its analogue for a model without biases.
    "ln": 1e-3,
}
# DPO's learning rate is the method's SFT rate times dpo.lr / sft.lr of the config (5e-5 / 3e-4 in default.yaml): the
# LoRA row then runs exactly the shipped DPO, and every method keeps the same SFT-to-DPO step-down (preference
# tuning runs ~10x below SFT in the literature: Zephyr, Tulu 2, TRL's DPO examples).


@dataclass(frozen=True)
class Budget:
    sft_steps: int
    """Optimizer steps of SFT (batch ``sft.batch_size`` of the config: 8 rows)."""
    dpo_steps: int
    """Optimizer steps of DPO (batch ``dpo.batch_size``: 8 pairs)."""
    heldout_rows: int
    """Held-out SFT rows for the loss (0: all of ``sft.eval_data``)."""
    heldout_pairs: int
    """Held-out preference rows: their prompts for the checker, their pairs for DPO's held-out accuracy (0: all)."""


# Full: the shipped pipeline's own budget (configs/default.yaml: one SFT epoch of the 600 rows = 75 steps of 8,
# half a DPO epoch = 38 steps of 8 pairs), every held-out row (100 SFT rows, 100 preference prompts / pairs).
FULL = Budget(sft_steps=75, dpo_steps=38, heldout_rows=0, heldout_pairs=0)
# QUICK=1: 5 SFT and 3 DPO steps (the first untimed), 16 held-out rows: numbers to develop with, not to compare.
QUICK = Budget(sft_steps=5, dpo_steps=3, heldout_rows=16, heldout_pairs=16)
# --model tiny (configs/tiny.yaml): a check that every piece runs, in about a minute on an idle machine.
TINY = Budget(sft_steps=4, dpo_steps=3, heldout_rows=8, heldout_pairs=8)
TINY_CONFIG = "configs/tiny.yaml"

# --- the time estimate (per-step costs measured on this 2-core machine: `make bench`, bench/results/) -------------
COST = {
    "sft_step": 4.0,       # s per SFT step of 8 rows x ~60 tokens, LoRA (make bench: 3.9)
    "dpo_step": 11.0,      # s per DPO step of 8 pairs, LoRA, reference pass included (make bench: 11.5)
    "fwd_row": 4.0 / 8 / 3,  # s per held-out row forward (~a third of its training step)
    "token_batch": 0.1,    # s per generated token of one generation batch (16 prompts)
    "prefill": 1.0,        # s per generation batch before its first token
    "startup": 20.0,       # s per process: imports, model load and hash, data, tokenisation
    "gen_batch": 16,       # GenerationConfig.batch_size
    "new_tokens": 48,      # generation.max_new_tokens of configs/default.yaml (every batch counted at the full 48)
    "heldout": 100,        # rows of embedded:sft_eval and embedded:pref_eval
}
# Cost of a training step relative to LoRA's (all-linear r=16): DoRA recomputes the base matmul of every adapted
# layer in training (peft, with dropout) and forms each weight's norm; prompt tuning adds 16 positions to ~60;
# prefix adds 16 key/value positions to every attention; ia3 / bottleneck / ln skip LoRA's extra matmuls.
FACTOR = {"lora": 1.0, "dora": 2.0, "ia3": 0.9, "prefix": 1.05, "prompt": 1.27, "bottleneck": 0.95, "ln": 0.9}


def estimate_seconds(budget: Budget, methods: list[str], cost: dict = COST) -> dict:
    """Wall seconds the run should take here, from the per-step costs above (every method, then the base)."""
    c = cost
    n_loss = budget.heldout_rows or c["heldout"]
    n_pairs = budget.heldout_pairs or c["heldout"]
    gen_policy = math.ceil(n_pairs / c["gen_batch"]) * (c["new_tokens"] * c["token_batch"] + c["prefill"])
    per = {}
    for m in methods:
        f = FACTOR.get(m, 1.0)
        per[m] = (2 * c["startup"] + 2 * gen_policy
                  + f * (budget.sft_steps * c["sft_step"] + budget.dpo_steps * c["dpo_step"]
                         + 2 * n_loss * c["fwd_row"]          # held-out loss: base, then the SFT delta
                         + 2 * n_pairs * c["fwd_row"]         # KL of the DPO policy's responses: policy + reference
                         + 4 * n_pairs * c["fwd_row"]))       # held-out pairs: chosen + rejected, policy + reference
    base = c["startup"] + gen_policy
    return {"per_method": per, "base": base, "total": sum(per.values()) + base}


# --- what each stage process is told ------------------------------------------------------------------------------

def lrs(method: str, cfgs: dict) -> tuple[float, float]:
    """(SFT, DPO) learning rate of ``method`` under the loaded config ``cfgs``."""
    sft = SFT_LR[method]
    return sft, float(f"{sft * cfgs['dpo'].lr / cfgs['sft'].lr:.4g}")


def overrides(method: str, budget: Budget, cfgs: dict, threads: int, sft_eval: str, pref_eval: str,
              model: str | None = None) -> list[str]:
    """``--set`` overrides for both stage processes of ``method`` (the same list for both, so the DPO process finds
    the SFT stage up to date by its hash and does not run it again)."""
    sft_lr, dpo_lr = lrs(method, cfgs)
    o = [f"model.path={model}"] if model else []
    o += ["model.gradient_checkpointing=false"]  # pinned: timings must not move with the machine's free memory
    o += [f"sft.delta.method={method}", f"sft.lr={sft_lr}", f"sft.max_steps={budget.sft_steps}",
          f"sft.eval_data={sft_eval}", "sft.eval_checker=false"]
    o += [f"dpo.lr={dpo_lr}", f"dpo.max_steps={budget.dpo_steps}", f"dpo.eval_data={pref_eval}",
          "dpo.reference=sft", "dpo.init=sft", "dpo.eval_checker=true", f"dpo.eval_limit={budget.heldout_pairs}"]
    for stage in ("sft", "dpo"):  # timing: one log line per step, no checkpoint inside the window
        o += [f"{stage}.log_every=1", f"{stage}.checkpoint_every=0", f"{stage}.threads={threads}"]
    return o


def load_configs(config: str, extra: list[str] = ()) -> dict:
    from deltalign.core import settings as configs
    from deltalign.pipeline.graph import sections

    return configs.load(sections(), str(ROOT / config) if not Path(config).is_absolute() else config, list(extra))


def heldout_file(source: str, n: int, kind: str, data_dir: Path) -> str:
    """``source`` itself (n == 0 or empty), else a JSONL file of its first ``n`` rows."""
    if not source or not n:
        return source
    from deltalign.data.formats import load_rows

    rows = load_rows(source, "test")[:n]
    data_dir.mkdir(parents=True, exist_ok=True)
    out = data_dir / f"{kind}-{n}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


# --- running and reading one stage process ------------------------------------------------------------------------

def run_child(cmd: list[str], log: Path, timeout: float) -> dict:
    """One fresh process: exit status, wall time, its own peak RSS (``os.wait4``), the BENCH_RESULT line if any."""
    rc, wall, rss_mb, text = spawn(cmd, log, timeout)
    out = {"rc": rc, "wall_s": round(wall, 1), "peak_rss_mb": round(rss_mb, 1), "log": str(log)}
    res = parse_result(text)
    if res is not None:
        out["result"] = res
    if rc != 0:
        out["error"] = f"exit {rc}" + (" (timeout)" if wall > timeout else "")
        out["log_tail"] = "\n".join(text.splitlines()[-15:])
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def step_window(rows: list[dict]) -> dict | None:
    """Seconds per optimizer step over the window of bench/common.py, from ``metrics.jsonl`` rows: the ``time`` of
    the last step's line minus that of the last warm-up step's, over the steps between. None if too few steps."""
    steps = {r["step"]: r["time"] for r in rows if r.get("kind") == "train"}
    last = max(steps, default=0)
    if last <= WARMUP_STEPS or WARMUP_STEPS not in steps:
        return None
    seconds = steps[last] - steps[WARMUP_STEPS]
    timed = last - WARMUP_STEPS
    return {"s_per_step": seconds / timed, "timed_steps": timed, "seconds": round(seconds, 2)}


def adapter_bytes(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors")
               if (folder / f).exists())


def base_parameters(model_dir: Path) -> int:
    """Every parameter of a checkpoint, from its safetensors headers (a tied LM head is stored, and counted, once)."""
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def model_dir(path: str) -> Path:
    if path == "tiny":
        from deltalign.core import tiny

        return ROOT / tiny.TINY_DIR
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def collect(run_dir: Path, base_params: int | None = None) -> dict:
    """The numbers of one method from its finished run directory (``sft/`` and ``dpo/``); missing parts are None."""
    sft_dir, dpo_dir = run_dir / "sft", run_dir / "dpo"
    sft_rows, dpo_rows = read_jsonl(sft_dir / "metrics.jsonl"), read_jsonl(dpo_dir / "metrics.jsonl")
    setup = next((r for r in sft_rows if r.get("kind") == "setup"), {})
    sft_eval = json.loads((sft_dir / "eval.json").read_text()) if (sft_dir / "eval.json").exists() else {}
    dpo_eval = json.loads((dpo_dir / "eval.json").read_text()) if (dpo_dir / "eval.json").exists() else {}
    trainable = setup.get("trainable_params")
    ref, pol = dpo_eval.get("reference", {}), dpo_eval.get("dpo", {})
    train_losses = [r["loss"] for r in sft_rows if r.get("kind") == "train"]
    return {
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / base_params if trainable is not None and base_params else None,
        "adapter_bytes": adapter_bytes(sft_dir) if (sft_dir / "adapter_model.safetensors").exists() else None,
        "sft": {"heldout_loss": sft_eval.get("sft", {}).get("heldout_loss"),
                "base_heldout_loss": sft_eval.get("base", {}).get("heldout_loss"),
                "final_train_loss": train_losses[-1] if train_losses else None,
                "window": step_window(sft_rows)},
        "dpo": {"checker_after_sft": ref.get("checker_score"), "checker_after_dpo": pol.get("checker_score"),
                "n_prompts": pol.get("n"), "kl_to_sft": pol.get("kl_to_reference"),
                "mean_response_tokens_sft": ref.get("mean_response_tokens"),
                "mean_response_tokens_dpo": pol.get("mean_response_tokens"),
                "heldout_pair_accuracy": dpo_eval.get("heldout_pairs", {}).get("reward_accuracy"),
                "heldout_pairs": dpo_eval.get("heldout_pairs", {}).get("n"),
                "window": step_window(dpo_rows)},
    }


# --- the base row: generation with every delta off, in a fresh process ------------------------------------------

def base_eval_child(config: str, sets: list[str]) -> int:
    """``--base-eval``: the base model's checker score on the DPO stage's held-out prompts, as DPO's report picks
    them (same config, same overrides, same generation settings); prints one BENCH_RESULT line."""
    import torch

    from common import emit
    from deltalign.model.backbone import Backbone
    from deltalign.data.splits import load_split
    from deltalign.sampling.generation import checker_eval

    cfgs = load_configs(config, sets)
    cfg = cfgs["dpo"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bb = Backbone.load(cfgs["model"])
    held = load_split(cfg.eval_data, "test", "pref", bb.tokenizer, cfg.max_length, cfg.truncation, cfg.bad_rows)
    examples = held.examples[: cfg.eval_limit or None]
    res = checker_eval(bb, examples, cfg.generation, None)
    emit({"checker_score": res["checker_score"], "n": res["n"], "mean_response_tokens": res["mean_response_tokens"]})
    return 0


# --- formatting ---------------------------------------------------------------------------------------------------

DASH = "—"


def _count(n) -> str:
    if n is None:
        return DASH
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _pct(p) -> str:
    return DASH if p is None else f"{p:.2g}%" if p < 1 else f"{p:.3g}%"


def _bytes(b) -> str:
    if b is None:
        return DASH
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if b >= div:
            return f"{b / div:.3g} {unit}"
    return f"{b} B"


def _num(v, digits: int = 3) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def _gb(mb) -> str:
    return DASH if mb is None else f"{mb / 1024:.2f} GB"


def _sps(window) -> str:
    return DASH if not window else f"{window['s_per_step']:.2f}"


HEADER = ["method", "trainable params", "% of base", "adapter on disk", "lr SFT / DPO", "held-out SFT loss",
          "checker after SFT", "checker after DPO", "DPO held-out pair acc.", "s/step SFT", "s/step DPO",
          "peak RSS SFT", "peak RSS DPO"]


def table(results: dict) -> str:
    """The markdown table of a results dict (``methods``: per method; ``base``: the base row)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    base = results.get("base") or {}
    if base:
        lines.append("| " + " | ".join(["base (no delta)", "0", "0%", DASH, DASH, _num(base.get("heldout_loss")),
                                          _num(base.get("checker_score"), 2), DASH, DASH, DASH, DASH, DASH, DASH])
                     + " |")
    for name, r in results["methods"].items():
        if r.get("error") and not r.get("sft", {}).get("heldout_loss"):
            cells = [name, f"failed: {r['error']}"] + [DASH] * (len(HEADER) - 2)
        else:
            s, d = r.get("sft", {}), r.get("dpo", {})
            cells = [name + (" (incomplete: " + r["error"] + ")" if r.get("error") else ""),
                     _count(r.get("trainable_params")), _pct(r.get("trainable_pct")), _bytes(r.get("adapter_bytes")),
                     f"{r['lr']['sft']:g} / {r['lr']['dpo']:g}" if r.get("lr") else DASH,
                     _num(s.get("heldout_loss")), _num(d.get("checker_after_sft"), 2),
                     _num(d.get("checker_after_dpo"), 2), _num(d.get("heldout_pair_accuracy"), 2),
                     _sps(s.get("window")), _sps(d.get("window")), _gb(s.get("peak_rss_mb")),
                     _gb(d.get("peak_rss_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(results: dict) -> str:
    """The settings paragraph under the table."""
    s, b = results["settings"], results["budget"]
    n_loss = f"{b['heldout_rows']}" if b["heldout_rows"] else "all"
    n_pairs = f"{b['heldout_pairs']}" if b["heldout_pairs"] else "all"
    return (f"{s['model']} ({s['dtype']}), `{s['config']}`; every method: SFT {b['sft_steps']} steps of "
            f"{s['sft_batch_size']} rows of `{s['sft_data']}`, then DPO {b['dpo_steps']} steps of "
            f"{s['dpo_batch_size']} pairs of `{s['dpo_data']}` (loss {s['dpo_loss']}, beta {s['dpo_beta']}, "
            f"nll_weight {s['dpo_nll_weight']}; reference = the method's SFT delta, frozen; policy = a trainable "
            f"copy), the same batches in the same order (seed {s['seed']}), max length {s['max_length']}, "
            f"{s['threads']} thread(s). Learning rate per method (sources in `bench/methods.py`), DPO's = SFT's x "
            f"{s['dpo_lr_ratio']:.3g}. Held-out SFT loss on {n_loss} `{s['sft_eval']}` rows; checker scores: greedy, "
            f"{s['max_new_tokens']} new tokens, on the same {n_pairs} `{s['dpo_eval']}` prompts after SFT (the DPO "
            f"reference) and after DPO; DPO held-out pair accuracy: implicit-reward accuracy on those pairs. "
            f"s/step: steps after the first ({WARMUP_STEPS} warm-up step untimed), from the stage's own step log. "
            f"Peak RSS: the stage process's high-water mark (fresh process per stage, evaluation included). "
            f"Base row: the frozen base with every delta off, on the same rows and prompts.")


# --- generators for docs/refresh.py --------------------------------------------------------------------------------

def newest_full(results_dir: Path = RESULTS, quick: bool = False) -> Path | None:
    """The newest ``methods-*.json`` of a full run on the default model (not tiny; QUICK only with ``quick``)."""
    found = []
    for p in sorted(results_dir.glob(f"{PREFIX}*.json")):
        try:
            d = json.loads(p.read_text())
        except ValueError:
            continue
        if not d.get("tiny") and bool(d.get("quick")) == quick:
            found.append(p)
    return found[-1] if found else None


def results_block(results_dir: Path = RESULTS) -> str:
    """``<!-- generated: methods -->``: the table of the newest full ``make methods`` run, with its settings; until
    there is one, the newest ``QUICK=1`` run, labelled as such."""
    f = newest_full(results_dir)
    if f is None and (f := newest_full(results_dir, quick=True)) is not None:
        return "**QUICK=1 budget (few steps: a smoke comparison, not the full one):**\n\n" + results_block_of(f)
    if f is None:
        return "_No `make methods` result yet._\n"
    return results_block_of(f)


def results_block_of(f: Path) -> str:
    d = json.loads(f.read_text())
    m = d["machine"]
    return (f"{d['table_markdown']}\n\n{describe(d)} {m['cpu']}, {m['usable_cpus']} CPUs, {m['ram_gb']} GB; "
            f"commit {d['commit']}, {d['started'][:10]}, {d['wall_s'] / 60:.0f} min in all "
            f"(`bench/results/{f.name}`).\n")


def capability_table() -> str:
    """``<!-- generated: methods-capabilities -->``: what each method can do, from ``deltalign.deltas.METHODS`` (and
    ``deltalign.deltas.composable.NOT_COMPOSABLE`` for the compose stage)."""
    from deltalign.deltas import METHODS
    from deltalign.deltas.composable import NOT_COMPOSABLE

    lines = ["| method | what it trains | implementation | export merges it | under a scalar head (RM, critic) | "
             "extra positions (prompt learning) | compose (merge, gates) |", "|---|---|---|---|---|---|---|"]
    for m in METHODS.values():
        impl = "peft" if m.impl == "peft" else f"ours (`deltalign/deltas/{m.builder.split(':')[0]}.py`)"
        lines.append(f"| `{m.name}` | {m.summary} | {impl} | {'yes' if m.mergeable else 'no: adapter + base'} | "
                     f"{'yes' if m.head else 'no'} | {'yes' if m.prompt_learning else 'no'} | "
                     f"{'no' if m.name in NOT_COMPOSABLE else 'yes'} |")
    return "\n".join(lines) + "\n"


# --- the run -------------------------------------------------------------------------------------------------------

def machine() -> dict:
    from importlib import metadata

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "ram_gb": round(mem / 1024 ** 2, 1), "python": platform.python_version(), "kernel": platform.release(),
            "versions": versions}


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True)
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.returncode == 1 else "")


def run_method(method: str, run_dir: Path, config: str, sets: list[str], timeout: float, log) -> dict:
    """SFT, then DPO, each in a fresh ``python -m deltalign run STAGE --force`` process (``--force``: measured anew
    even where an earlier attempt in this directory finished it); the numbers of both."""
    base_cmd = [sys.executable, "-m", "deltalign", "run"]
    tail = ["--config", config, "--run-dir", str(run_dir), "--force"] + [a for s in sets for a in ("--set", s)]
    out: dict = {}
    children = {}
    for stage in ("sft", "dpo"):
        t = time.time()
        child = run_child(base_cmd + [stage] + tail, run_dir / "logs" / f"{stage}.log", timeout)
        children[stage] = child
        text = Path(child["log"]).read_text(errors="replace")
        if stage == "dpo" and "[deltalign] sft: running" in text:
            child.setdefault("error", "the DPO process ran SFT again (its hash differed): timings are not clean")
        log(f"{method} {stage}: " + (child.get("error") or f"done in {time.time() - t:.0f}s, "
                                      f"peak RSS {child['peak_rss_mb'] / 1024:.2f} GB"))
        if "error" in child:
            out["error"] = f"{stage}: {child['error']}"
            if "log_tail" in child:
                out["log_tail"] = child["log_tail"]
            break
    out["children"] = children
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="few steps and held-out rows (QUICK above); tiny: always (TINY)")
    ap.add_argument("--model", default=None, help="model.path override; tiny = the tiny random Llama with "
                                                  f"{TINY_CONFIG} (1 thread, short generations) and the TINY budget")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--dpo-steps", type=int, default=None)
    ap.add_argument("--heldout", type=int, default=None, help="held-out rows and prompts (0: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: usable cores; "
                                                              "tiny: 1)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; tiny: the work directory)")
    ap.add_argument("--work", default=None, help="work directory (default runs/methods/<stamp>); an existing one "
                                                 "is resumed: methods with a finished result there are kept")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per process (default 3600; quick 900)")
    ap.add_argument("--estimate", action="store_true", help="print the plan and the time estimate, run nothing")
    ap.add_argument("--base-eval", action="store_true", help=argparse.SUPPRESS)  # the base row's child process
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="one more override for every stage process, after the script's own (recorded)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.base_eval:
        return base_eval_child(args.config, args.sets)

    from deltalign.deltas import METHODS

    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS or m not in SFT_LR]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; methods: {', '.join(METHODS)}")
    if args.model == "tiny" and args.config == DEFAULT_CONFIG:  # the tiny model's own config (it includes ours)
        args.config, args.model = TINY_CONFIG, None
    cfgs = load_configs(args.config, ([f"model.path={args.model}"] if args.model else []) + args.sets)
    model = cfgs["model"].path
    tiny = model == "tiny"
    quick = args.quick or tiny
    budget = TINY if tiny else QUICK if quick else FULL
    budget = replace(budget, **{k: v for k, v in (("sft_steps", args.sft_steps), ("dpo_steps", args.dpo_steps),
                                                  ("heldout_rows", args.heldout), ("heldout_pairs", args.heldout))
                                if v is not None})
    threads = args.threads or (1 if tiny else len(os.sched_getaffinity(0)))  # tiny: thread sync would dominate
    timeout = args.timeout or (900 if quick else 3600)
    started = dt.datetime.now(dt.timezone.utc)
    stamp = PREFIX + started.strftime("%Y-%m-%d-%H%M") + ("-quick" if quick else "") + ("-tiny" if tiny else "")
    work = Path(args.work) if args.work else WORK / stamp
    out_dir = Path(args.out) if args.out else (work if tiny else RESULTS)
    est = estimate_seconds(budget, methods)

    def log(msg: str) -> None:
        print(f"[methods] {msg}", flush=True)

    log(f"{model} via {args.config}; methods {', '.join(methods)}; SFT {budget.sft_steps} / DPO {budget.dpo_steps} "
        f"steps, held-out {budget.heldout_rows or 'all'} rows / {budget.heldout_pairs or 'all'} prompts; "
        f"{threads} thread(s); work dir {work}")
    if not tiny:
        log(f"estimated {est['total'] / 60:.0f} min here at make bench's per-step costs ("
            + ", ".join(f"{m} {s / 60:.1f}" for m, s in est["per_method"].items())
            + f", base {est['base'] / 60:.1f} min)")
    if args.estimate:
        for m in methods:
            print(f"  {m}: lr {lrs(m, cfgs)}")
        return 0

    sft_eval = heldout_file(cfgs["sft"].eval_data, budget.heldout_rows, "sft_eval", work / "data")
    pref_eval = heldout_file(cfgs["dpo"].eval_data, budget.heldout_pairs, "pref_eval", work / "data")
    load_before = os.getloadavg()
    loads: list[float] = []
    results: dict = {"methods": {}}
    n_base = base_parameters(model_dir(model)) if model_dir(model).is_dir() else None
    for i, m in enumerate(methods):
        run_dir = work / m
        saved = run_dir / "bench.json"
        if saved.exists():
            results["methods"][m] = json.loads(saved.read_text())
            log(f"{m}: kept the finished result in {saved}")
            continue
        sets = overrides(m, budget, cfgs, threads, sft_eval, pref_eval, args.model) + args.sets
        t = time.time()
        r = run_method(m, run_dir, args.config, sets, timeout, log)
        loads.append(os.getloadavg()[0])
        n_base = n_base or (base_parameters(model_dir(model)) if model_dir(model).is_dir() else None)
        r |= collect(run_dir, n_base)
        sft_lr, dpo_lr = lrs(m, cfgs)
        r["lr"] = {"sft": sft_lr, "dpo": dpo_lr}
        r["overrides"] = sets
        r["sft"]["peak_rss_mb"] = r["children"].get("sft", {}).get("peak_rss_mb")
        r["dpo"]["peak_rss_mb"] = r["children"].get("dpo", {}).get("peak_rss_mb")
        cfg_file = run_dir / "sft" / "config.yaml"
        if cfg_file.exists():
            import yaml

            r["adapter"] = yaml.safe_load(cfg_file.read_text())["sft"]["delta"]
        results["methods"][m] = r
        if "error" not in r:
            saved.write_text(json.dumps(r, indent=1, default=str) + "\n")
        elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
        log(f"{m}: {time.time() - t:.0f}s; {i + 1}/{len(methods)} methods after {elapsed / 60:.1f} min"
            + ("" if tiny else f" (estimate for these: {sum(est['per_method'][x] for x in methods[:i + 1]) / 60:.1f})"))

    # the base row: held-out loss from an SFT run's baseline (identical in every run), checker from one more process
    base: dict = {}
    first = next((r for r in results["methods"].values() if r.get("sft", {}).get("base_heldout_loss") is not None),
                 None)
    if first:
        base["heldout_loss"] = first["sft"]["base_heldout_loss"]
    sets = overrides(methods[0], budget, cfgs, threads, sft_eval, pref_eval, args.model) + args.sets
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--base-eval", "--config", args.config]
                      + [a for s in sets for a in ("--set", s)], work / "logs" / "base.log", timeout)
    base |= {"peak_rss_mb": child["peak_rss_mb"], **(child.get("result") or {})}
    if "error" in child:
        base["error"] = child["error"]
    base.pop("side", None)
    log("base: " + (child.get("error") or f"checker {base.get('checker_score')}"))
    results["base"] = base

    finished = dt.datetime.now(dt.timezone.utc)
    load_after = os.getloadavg()
    contended = max([load_before[0], *loads]) > threads + 0.75
    d, s = cfgs["dpo"], cfgs["sft"]
    results |= {
        "started": started.isoformat(), "finished": finished.isoformat(),
        "wall_s": round((finished - started).total_seconds(), 1), "quick": quick, "tiny": tiny,
        "commit": commit(), "machine": machine(), "load_before": load_before, "load_after": load_after,
        "load_after_each_method": loads, "contended": contended, "budget": asdict(budget),
        "estimate_s": None if tiny else est,
        "base_parameters": n_base, "work_dir": str(work), "extra_overrides": args.sets,
        "settings": {"model": model, "config": args.config, "dtype": cfgs["model"].dtype, "threads": threads,
                     "seed": s.seed, "sft_data": s.data, "dpo_data": d.data, "sft_eval": s.eval_data,
                     "dpo_eval": d.eval_data, "sft_eval_read": sft_eval, "dpo_eval_read": pref_eval,
                     "sft_batch_size": s.batch_size, "dpo_batch_size": d.batch_size,
                     "max_length": s.max_length, "dpo_loss": d.loss, "dpo_beta": d.beta,
                     "dpo_nll_weight": d.nll_weight, "max_new_tokens": d.generation.max_new_tokens,
                     "dpo_lr_ratio": d.lr / s.lr, "warmup_ratio": s.warmup_ratio, "sft_lr": SFT_LR},
    }
    results["table_markdown"] = table(results)
    write(results, out_dir, stamp)
    failed = [m for m, r in results["methods"].items() if r.get("error")] + (["base"] if "error" in base else [])
    log(f"written {out_dir / (stamp + '.md')} and .json in {results['wall_s'] / 60:.1f} min"
        + (f"; FAILED: {', '.join(failed)} (logs in {work})" if failed else ""))
    return 1 if failed else 0


def markdown(results: dict) -> str:
    m = results["machine"]
    started = results["started"][:16].replace("T", " ")
    mode = " (QUICK mode: not comparable)" if results["quick"] else ""
    mode += " (tiny random model: a check of the script, not a measurement)" if results["tiny"] else ""
    notes = [f"- {name}: {r['error']}" for name, r in results["methods"].items() if r.get("error")]
    if results.get("base", {}).get("error"):
        notes.append(f"- base: {results['base']['error']}")
    return "\n".join([
        f"# Delta methods: SFT then DPO, one budget — {started} UTC{mode}", "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs ({m['logical_cpus']} logical), {m['ram_gb']} GB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f". Commit {results['commit']}.",
        f"1-min load average before / highest after a method / after: {results['load_before'][0]:.2f} / "
        f"{max(results['load_after_each_method'], default=0):.2f} / {results['load_after'][0]:.2f}"
        + (" — **other work was running: the timings are contended**" if results["contended"] else "") + ".", "",
        describe(results), "",
        results["table_markdown"], "",
        *(["Failures:", *notes, ""] if notes else []),
        f"Finished {results['finished'][:16].replace('T', ' ')} UTC ({results['wall_s'] / 60:.1f} min"
        + (f"; estimated {results['estimate_s']['total'] / 60:.0f} min" if results.get("estimate_s") else "")
        + f"). Run directories: `{results['work_dir']}`.", ""])


def write(results: dict, out_dir: Path, stamp: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stamp}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = markdown(results)
    (out_dir / f"{stamp}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
