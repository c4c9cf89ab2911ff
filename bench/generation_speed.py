"""Rollout generation speed: deltalign's ``generate`` against transformers' ``generate`` on the same delta model.

GRPO's rollout on the HH prompts (``data/hh/train.jsonl``, prompts up to GRPO's ``max_prompt_length`` 192): each
call samples G responses for each of ``--prompts`` prompts (the rows one GRPO step generates, in one batch), at
temperature 1 and top-p 1, on SmolLM2-135M-Instruct with a LoRA delta (r=16 on every linear layer, its B matrices
drawn at random so the delta acts). transformers' side: ``model.generate`` on the same rows (each prompt G times,
left-padded), ``do_sample=True, top_k=0``, the same temperature/top-p, the pad token suppressed as ours does, the
same stop tokens, the dynamic KV cache. Tokens are real ones: up to and including each row's first stop token.
The two sides alternate call by call; the figure is total tokens / total seconds per side. Before timing, one
batch is decoded greedily by both and must give the same tokens.

    PYTHONPATH=. .venv/bin/python bench/generation_speed.py [--new 128 256] [--calls 3] [--label after]

writes ``bench/results/generation-<date>.json`` and ``.md``. ``PYTHONPATH`` chooses whose ``deltalign`` runs
(a checkout of an older commit measures "before"). Run it under ``quiet-run``: it times.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent


def load(model: str, seed: int = 0):
    from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig

    b = Backbone.load(ModelConfig(path=model))
    torch.manual_seed(seed)
    b.add_adapter("policy", AdapterConfig(r=16, dropout=0.0), trainable=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in b.adapter_parameters("policy").items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
    b.activate("policy")
    return b


def hh_prompts(tok, n: int, max_prompt_length: int = 192) -> list[list[int]]:
    from deltalign.sampling.rollout import load_prompts

    cfg = SimpleNamespace(data=str(ROOT / "data/hh/train.jsonl"), eval_data="", split="train",
                          max_prompt_length=max_prompt_length, bad_rows="skip")
    data = load_prompts(cfg, tok, with_eval=False)
    return [data["prompt_ids"][i] for i in data["keep"][:n]]


def cut(rows: list[list[int]], stops: list[int]) -> list[list[int]]:
    out = []
    for r in rows:
        k = next((i for i, t in enumerate(r) if t in stops), None)
        out.append(r if k is None else r[:k + 1])
    return out


def hf_generate(b, rows: list[list[int]], new: int, sample: bool, seed: int) -> list[list[int]]:
    from deltalign.sampling.generation import stop_token_ids

    tok = b.tokenizer
    width = max(map(len, rows))
    x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0) if sample else \
        dict(do_sample=False, top_k=None, top_p=None, temperature=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        y = b.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, eos_token_id=stop_token_ids(tok),
                             pad_token_id=tok.pad_token_id, suppress_tokens=[tok.pad_token_id],
                             cache_implementation="dynamic", **kw)
    return cut(y[:, width:].tolist(), stop_token_ids(tok))


def ours_generate(b, rows: list[list[int]], new: int, sample: bool, seed: int) -> list[list[int]]:
    from deltalign.sampling.generation import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new, temperature=1.0 if sample else 0.0, top_p=1.0, batch_size=len(rows))
    return generate(b, rows, cfg, row_seeds=[seed * 1000 + i for i in range(len(rows))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--new", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per call (GRPO's batch_size)")
    ap.add_argument("--groups", type=int, default=8, help="G, samples per prompt")
    ap.add_argument("--calls", type=int, default=3, help="timed calls per side and length (other prompts each)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    b = load(args.model)
    prompts = hh_prompts(b.tokenizer, args.prompts * (args.calls + 1))
    # each call: every prompt G times in a row, as GRPO lays out a step's rollout
    batches = [[q for q in prompts[i * args.prompts:(i + 1) * args.prompts] for _ in range(args.groups)]
               for i in range(args.calls + 1)]
    check = batches[0][::2]
    greedy_equal = ours_generate(b, check, 32, False, 0) == hf_generate(b, check, 32, False, 0)
    print(f"greedy tokens equal to transformers' generate: {greedy_equal}", flush=True)
    rows_out = []
    for new in args.new:
        sides = {"ours": [0, 0.0], "transformers": [0, 0.0]}
        ours_generate(b, batches[0][:args.groups], 8, True, 0)  # warm-up (allocator, threads)
        for i, batch in enumerate(batches[1:]):
            for side, fn in (("ours", ours_generate), ("transformers", hf_generate))[::1 if i % 2 == 0 else -1]:
                t0 = time.perf_counter()
                out = fn(b, batch, new, True, i + 1)
                dt = time.perf_counter() - t0
                sides[side][0] += sum(map(len, out))
                sides[side][1] += dt
                print(f"new={new} call {i} {side}: {sum(map(len, out))} tokens in {dt:.1f} s", flush=True)
        row = {"max_new_tokens": new, "rows_per_call": len(batches[1]), "calls": args.calls}
        for side, (tokens, seconds) in sides.items():
            row[side] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
        row["speedup"] = round(row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"], 2)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    result = {"label": args.label, "commit": commit, "machine": platform.processor() or platform.machine(),
              "cpu": _cpu(), "threads": torch.get_num_threads(), "model": args.model, "groups": args.groups,
              "prompts": args.prompts, "greedy_equal": greedy_equal, "rows": rows_out}
    stamp = time.strftime("%Y-%m-%d-%H%M")
    out = Path(args.out or ROOT / "bench/results" / f"generation-{stamp}{'-' + args.label if args.label else ''}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Rollout generation, {args.prompts} prompts x G={args.groups} per call ({result['cpu']}, "
             f"{result['threads']} threads, commit {commit}{', ' + args.label if args.label else ''})", "",
             f"Greedy tokens equal to transformers' generate: {greedy_equal}", "",
             "| max new tokens | ours tokens/s | transformers tokens/s | ratio |", "|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['max_new_tokens']} | {r['ours']['tokens_per_s']} | {r['transformers']['tokens_per_s']} | "
                     f"{r['speedup']}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    main()
