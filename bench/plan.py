"""The batch plan: the same rows in the same batches in the same order on every side of the bench.

    python bench/plan.py --settings JSON --stages sft,rm,dpo,ppo,grpo    # run.py's child: writes the plans

For each stage the plan is a JSON Lines file under ``bench/.cache/plans/``: one conversational row per line, in
the order the steps consume them, ``batch`` rows per step (``steps`` steps), and a ``.json`` beside it with the
source row of every line and our tokenised length of it. Every side reads the rows of that file in file order:

* ours: the stage reads the file as its data; ``bench/ours.py`` replaces the stage's length-grouped shuffle by
  "consecutive batches of the file" (:func:`consecutive_batches`), so step k trains lines ``k*B .. k*B+B-1``;
* TRL: the same file as a ``datasets.Dataset``, sampled in order (``train_sampling_strategy="sequential"``; PPO's
  dataloader and GRPO's sampler unshuffled), ``B`` rows per step;
* the naive PPO: the prompts of the same file in the same order.

Which rows: the workload's source (``embedded:*`` or an HH file) read with our validators (bad rows skipped, as
``bad_rows: skip`` would), keeping only rows that fit whole -- prompt + the longer response within ``max_length``
(SFT, RM, DPO), or the prompt within ``max_prompt_length`` (PPO, GRPO) -- so that no side truncates anything and
the tokens each side computes are the same rows' tokens. The batches are then the ones our own stage would form
from those rows (:func:`deltalign.data.batching.length_grouped_batches` with the bench's seed, epoch 0, full
batches only, the first ``steps``), as ``make methods`` fixes them: length-grouped for both sides alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Settings, emit  # noqa: E402

PLANS = ROOT / "bench" / ".cache" / "plans"
KIND = {"sft": "sft", "rm": "pref", "dpo": "pref", "ppo": "prompt", "grpo": "prompt"}
PLAN_VERSION = 1  # bump when the rule above changes (old cached plans are then not reused)


def shape(stage: str, s: Settings) -> tuple[int, int]:
    """(rows per step, steps) of a stage's plan."""
    if stage == "ppo":
        return s.batch_size, s.ppo_steps
    if stage == "grpo":
        return s.grpo_batch_size, s.grpo_steps
    return s.batch_size, s.steps


def source_of(stage: str, s: Settings) -> str:
    return s.sft_data if stage == "sft" else s.pref_data


def plan_path(stage: str, s: Settings) -> Path:
    """Where a stage's plan lives: keyed by everything that decides its rows."""
    B, steps = shape(stage, s)
    limit = s.max_prompt_length if KIND[stage] == "prompt" else s.max_length
    src = source_of(stage, s)
    src_file = ROOT / src
    digest = hashlib.sha256(src_file.read_bytes()).hexdigest()[:12] if src_file.is_file() else src
    tok = ROOT / s.model / "tokenizer.json"
    tok_digest = hashlib.sha256(tok.read_bytes()).hexdigest()[:12] if tok.is_file() else s.model
    key = json.dumps([PLAN_VERSION, KIND[stage], src, digest, tok_digest, limit, B, steps, s.seed])
    return PLANS / f"{s.workload}-{stage}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"


def conversational_rows(stage: str, source: str, tokenizer) -> list[tuple[int, dict, int]]:
    """``(source row, row, length)`` for every valid row of ``source`` in the stage's shape: SFT ``messages``
    (an HH or preference row gives its prompt + the chosen answer), preference / prompt rows ``prompt`` +
    ``chosen`` + ``rejected`` as message lists; length = our tokenised length that the 'fits' rule and the length
    grouping use (SFT: the whole row; RM/DPO: prompt + the longer response; PPO/GRPO: the prompt)."""
    from deltalign.data.formats import load_rows, preference_examples, sft_examples
    from deltalign.data.tokenize import tokenize_pair, tokenize_prompt, tokenize_sft

    rows = load_rows(source)
    skipped: list[str] = []  # bad rows: left out (as bad_rows: skip), counted in the plan's meta
    big = 10 ** 9
    out = []
    is_sft_source = any(k in rows[0] for k in ("messages", "completion"))
    if stage == "sft" and is_sft_source:
        for i, ex in _numbered(sft_examples(rows, source, "skip", log=skipped.append), rows):
            if not ex.conversational:
                continue
            item = tokenize_sft(ex, tokenizer, big, "error")
            out.append((i, {"messages": ex.prompt + [{"role": "assistant", "content": ex.completion}]},
                        len(item["input_ids"])))
        return out
    for i, ex in _numbered(preference_examples(rows, source, "skip", log=skipped.append), rows):
        if not ex.conversational:
            continue
        if stage == "sft":
            from deltalign.data.formats import SFTExample

            sft = SFTExample(ex.prompt, ex.chosen, True, prompt_field="prompt")
            item = tokenize_sft(sft, tokenizer, big, "error")
            out.append((i, {"messages": ex.prompt + [{"role": "assistant", "content": ex.chosen}]},
                        len(item["input_ids"])))
            continue
        row = {"prompt": ex.prompt, "chosen": [{"role": "assistant", "content": ex.chosen}],
               "rejected": [{"role": "assistant", "content": ex.rejected}]}
        if KIND[stage] == "prompt":
            n = len(tokenize_prompt(ex.prompt, tokenizer, True))
        else:
            item = tokenize_pair(ex, tokenizer, big, "error")
            n = len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"]))
        out.append((i, row, n))
    return out


def _numbered(examples: list, rows: list[dict]):
    """Examples with their source row (``ex.row``, as the validators set it)."""
    return [(ex.row if ex.row is not None else k, ex) for k, ex in enumerate(examples)]


def build(stage: str, s: Settings, tokenizer=None) -> Path:
    """Write (once) and return the plan of ``stage`` under the settings ``s``."""
    from deltalign.data.batching import length_grouped_batches

    path = plan_path(stage, s)
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    if tokenizer is None:
        from deltalign.data.tokenize import load_tokenizer

        tokenizer = load_tokenizer(ROOT / s.model)
    B, steps = shape(stage, s)
    limit = s.max_prompt_length if KIND[stage] == "prompt" else s.max_length
    source = source_of(stage, s)
    rows = conversational_rows(stage, source, tokenizer)
    fit = [r for r in rows if r[2] <= limit]
    batches = [b for b in length_grouped_batches([r[2] for r in fit], B, s.seed, 0) if len(b) == B][:steps]
    if len(batches) < steps:
        raise SystemExit(f"bench plan {stage}: {source} has {len(fit)} rows within {limit} tokens, "
                         f"{len(batches)} full batches of {B}; {steps} steps need {steps * B}")
    order = [fit[i] for b in batches for i in b]
    meta = {"stage": stage, "workload": s.workload, "source": source, "batch": B, "steps": steps, "limit": limit,
            "rows_valid": len(rows), "rows_fit": len(fit), "source_rows": [r[0] for r in order],
            "lengths": [r[2] for r in order]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r[1]) + "\n" for r in order))
    path.with_suffix(".json").write_text(json.dumps(meta))
    tmp.rename(path)
    return path


def read_meta(path: str | Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())


def step_rows(path: str | Path) -> list[list[int]]:
    """The plan's source rows, one list per step (what every side trains on at that step)."""
    m = read_meta(path)
    rows = m["source_rows"]
    return [rows[k * m["batch"]:(k + 1) * m["batch"]] for k in range(m["steps"])]


def consecutive_batches(n: int, batch_size: int) -> list[list[int]]:
    """Our stage's batches over a plan file: consecutive lines, ``batch_size`` a step, in file order."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def follow(stage: str) -> None:
    """Make our ``stage`` train the plan's batches: its length-grouped shuffle (``shuffle=True`` calls only; the
    unshuffled ones batch statistics and evaluation) becomes :func:`consecutive_batches` of the plan file."""
    import importlib

    mod = importlib.import_module(f"deltalign.stages.{stage}")
    orig = mod.length_grouped_batches

    def planned(lengths, batch_size, seed, epoch, shuffle=True):
        if not shuffle:
            return orig(lengths, batch_size, seed, epoch, shuffle=False)
        return consecutive_batches(len(lengths), batch_size)

    mod.length_grouped_batches = planned


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", required=True)
    ap.add_argument("--stages", required=True)
    a = ap.parse_args()
    s = Settings.from_json(a.settings)
    from deltalign.data.tokenize import load_tokenizer

    tok = load_tokenizer(ROOT / s.model)
    plans = {}
    for stage in a.stages.split(","):
        p = build(stage, s, tok)
        m = read_meta(p)
        plans[stage] = {"path": str(p.relative_to(ROOT)), "rows_valid": m["rows_valid"], "rows_fit": m["rows_fit"],
                        "batch": m["batch"], "steps": m["steps"], "limit": m["limit"],
                        "mean_length": sum(m["lengths"]) / len(m["lengths"])}
    emit({"stage": "plan", "plans": plans})
    return 0


if __name__ == "__main__":
    sys.exit(main())
