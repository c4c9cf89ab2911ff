"""Export: merge a trained delta into the base and write standalone Hugging Face model directories.

Output in the stage folder (``runs/<name>/export/``), each written to a temp dir and renamed into place:

- ``model/``: the policy adapter (``policy: auto`` = the last finished of ppo, dpo, sft) merged into a
  FULL-PRECISION copy of the base (always loaded in float32 without quantization, so a QLoRA adapter is never
  merged into 4-bit weights), cast to ``dtype``; safetensors (sharded with an index above ``max_shard_size``),
  config, tokenizer (its pad token and chat template), ``generation_config.json`` whose eos includes the chat
  end-of-turn token, and a ``README.md`` model card. Plain ``transformers`` loads it; peft is not needed.
- ``reward_model/``: the rm adapter merged the same way into an ``AutoModelForSequenceClassification``
  (``num_labels=1``; ``score.weight`` = the head's weight; ``pad_token_id`` set, so it scores the last non-pad
  token as :class:`deltalign.rewards.model.RewardModel` does), with ``reward_stats.json``.
- ``adapter/``: the policy adapter as trained (PEFT format for LoRA/DoRA; ours: safetensors + JSON naming the
  method).

Only methods that merge into plain weights are merged (lora, dora, ia3, ln: ``deltalign.deltas.METHODS``). A delta
that cannot be merged (prefix, prompt, bottleneck: extra attention positions, extra inputs, a non-linear block) is
NEVER turned into a silently wrong merged model: no ``model/`` (or ``reward_model/`` model) is written; the adapter
goes to ``adapter/`` (always) -- for a reward model to ``reward_model/`` with its head -- with ``base_model.json``
naming the base and a card saying how to load it with deltalign; the metrics say ``merged: false`` and why.

Each merge is checked in memory before saving: the exported model's logits (or scores), in the output dtype,
against the adapter model's in float32, on a few chat prompts; the max abs difference goes into the metrics.
Which stages are read: see ``Config.needs``.

The command line has one front door for it: ``deltalign export`` is ``deltalign run export`` (its flags are
``export.*`` settings), and after the run, fresh or up to date, ``out`` (``--out``) gets a copy of the three
directories (:func:`copy_export`; refused before any work if it exists, unless ``overwrite``).

Reading order: :func:`run`, then its steps in order -- 1. which stages, 2. the policy, 3. the reward model --,
then what those share: the merge and its check, the files beside a model, the copy outside the run.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from deltalign import deltas
from deltalign.core import atomic, verify
from deltalign.core.settings import ConfigError, setting
from deltalign.model.backbone import DTYPES, Backbone, ModelConfig, load_base, resolve_path
from deltalign.sampling.generation import stop_token_ids
from deltalign.pipeline.rundir import MANIFEST
from deltalign.core.fingerprints import model_fingerprint
from deltalign.rewards.model import HEAD_FILE, STATS_FILE, last_token_values


NAME = "export"
ALIGNED = ("ppo", "grpo", "dpo", "kto")  # ``policy: auto`` takes the most recently finished of these, else sft
SOURCES = ("sft", "rm", "dpo", "kto", "ppo", "grpo", "compose")
ADAPTER = "export"  # the name the exported delta gets on the export's own backbone
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECK_PROMPTS = ["What do bees make? Answer in all lowercase letters.",
                 "Name a primary colour. Answer in JSON format, as an object with the key \"answer\"."]


@dataclass
class Config:
    policy: Literal["auto", "sft", "dpo", "kto", "ppo", "grpo", "compose"] = "auto"
    """Policy to export: ``auto`` (the most recently finished of ppo, grpo and dpo; else sft), or a stage name."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the exported weights: float32, bfloat16 or float16 (the merge itself is always float32)."""
    max_shard_size: str = "2GB"
    """Safetensors files larger than this are split into shards with an index (e.g. 500MB, 2GB)."""
    reward_model: bool = True
    """Also export the reward model (as a sequence classifier) when the run has a finished rm stage."""
    copy_delta: bool = setting(True, formerly="adapter_only")
    """Also copy the policy's delta to ``adapter/`` (peft's format and folder name) beside the merged model."""
    out: str = ""
    """Extra destination outside the run directory: after ``deltalign export`` / ``deltalign run export`` (fresh
    or up to date) it holds a copy of model/, reward_model/ and adapter/ ('' for none; ``--out`` for one command)."""
    overwrite: bool = False
    """Allow replacing an existing ``out`` directory (without it, an existing one is an error)."""

    def needs(self) -> list[str]:
        """Stages the export needs (run first if missing, hashed): the named policy; none for ``auto``, which picks
        among whatever finished (passed as ``uses``). ``python -m deltalign export`` re-exports when any of those
        changed since the last export (the pipeline hashes them: ``Stage.hash_uses``)."""
        return [] if self.policy == "auto" else [self.policy]


# --- the stage ----------------------------------------------------------------------------------------------------

def run(cfg: Config, model_cfg: ModelConfig, out_dir: Path, upstream: dict[str, Path] | None = None) -> dict:
    """``model/`` (and ``adapter/``), ``reward_model/`` and ``export.json`` in ``out_dir``; returns the metrics."""
    out_dir = Path(out_dir)
    check_out(cfg, out_dir)  # the copy comes after the run (copy_export); a destination in the way fails now
    resolve_path(model_cfg.path)

    # 1. which stages: the finished ones this export reads, and the policy among them
    done = {s: p for s, p in finished(upstream or {}).items() if s in SOURCES}
    done = {s: done[s] for s in SOURCES if s in done}
    stage = choose_policy(cfg, done)
    metrics: dict = {"policy": stage, "sources": {s: json.loads((p / MANIFEST).read_text())["hash"]
                                                  for s, p in done.items()}}
    notes = []
    if model_cfg.quantization != "none":
        notes.append(f"- trained on a {model_cfg.quantization}-quantized base (QLoRA); the adapter was merged into "
                     "the full-precision base, so outputs differ slightly from the quantized training model")

    # 2. the policy; 3. the reward model, when the run has one
    metrics["model"] = write_policy(cfg, model_cfg, stage, done, out_dir, notes)
    if cfg.reward_model and "rm" in done:
        metrics["reward_model"] = write_reward_model(cfg, model_cfg, done, out_dir, notes)
    atomic.write_json(out_dir / "export.json", metrics)
    return metrics


# --- 1. which stages ----------------------------------------------------------------------------------------------

def finished(dirs: dict[str, Path]) -> dict[str, Path]:
    return {s: Path(p) for s, p in dirs.items() if (Path(p) / MANIFEST).exists()}


def choose_policy(cfg: Config, done: dict[str, Path]) -> str:
    if cfg.policy != "auto":
        if cfg.policy not in done:
            raise FileNotFoundError(f"export.policy is {cfg.policy!r} but the run has no finished {cfg.policy} stage")
        return cfg.policy
    aligned = [p for p in ALIGNED if p in done]
    if aligned:  # the most recently finished alignment stage
        return max(aligned, key=lambda p: json.loads((done[p] / MANIFEST).read_text()).get("finished_at", ""))
    if "sft" in done:
        return "sft"
    raise FileNotFoundError("nothing to export: the run has no finished policy stage (sft, dpo, ppo or grpo); "
                            "run `make sft` or `make dpo` first")


# --- 2. the policy: model/ (merged) and adapter/ ------------------------------------------------------------------

def write_policy(cfg: Config, model_cfg: ModelConfig, stage: str, done: dict[str, Path], out_dir: Path,
                 notes: list[str]) -> dict:
    """``model/`` (merged) and ``adapter/`` (if asked); for a delta that cannot merge, ``adapter/`` alone."""
    src = done[stage]
    if not mergeable(src):
        shutil.rmtree(out_dir / "model", ignore_errors=True)  # a stale merged model from an earlier export: wrong
        metrics, lines = not_merged(f"policy `{stage}`", src, model_cfg)
        copy_adapter(src, out_dir / "adapter", model_card(f"Policy `{stage}` (adapter)", stage, model_cfg, cfg, done,
                                                          notes + lines, merged=False), base=base_reference(model_cfg))
        warnings.warn(f"export: {metrics['message']}; see {out_dir / 'adapter'}", stacklevel=2)
        return metrics
    card = model_card(f"Policy `{stage}`", stage, model_cfg, cfg, done, notes + [
        "- load: `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`; the "
        "chat template and end-of-turn eos are included"])
    metrics = merged_policy(cfg, model_cfg, src, out_dir / "model", card)
    if cfg.copy_delta:
        load = "- load: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base>), dir)`" \
            if deltas.spec(deltas.method_of(src)).impl == "peft" else \
            "- load with deltalign: `Backbone.load(ModelConfig(path=<base>)).load_adapter(name, dir)`"
        copy_adapter(src, out_dir / "adapter", model_card(f"Adapter `{stage}`", stage, model_cfg, cfg, done,
                                                          notes + [load]))
    return metrics


@torch.no_grad()
def merged_policy(cfg: Config, model_cfg: ModelConfig, adapter_dir: Path, dest: Path, card: str) -> dict:
    """``dest`` (``model/``): the policy delta merged into the float32 base, cast to ``cfg.dtype``, checked
    against the adapter model's logits, saved with its tokenizer, generation config and card."""
    bb = adapter_backbone(model_cfg, adapter_dir)
    tok = bb.tokenizer
    batch = check_batch(tok)
    mask = batch["attention_mask"].bool()
    before = bb.lm_logits(bb(batch["input_ids"], batch["attention_mask"]))[mask]
    model = cast(merge(bb), cfg.dtype)
    after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask].float()
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic.directory(dest, replace=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tok.save_pretrained(tmp)
        atomic.write_text(tmp / "README.md", card)
    return {"max_abs_logit_diff": float((after - before).abs().max()), "dtype": cfg.dtype,
            "files": sorted(p.name for p in dest.iterdir())}


# --- 3. the reward model: reward_model/ ---------------------------------------------------------------------------

def write_reward_model(cfg: Config, model_cfg: ModelConfig, done: dict[str, Path], out_dir: Path,
                       notes: list[str]) -> dict:
    """``reward_model/``: a merged sequence classifier, or for a delta that cannot merge the adapter + head."""
    src = done["rm"]
    if not mergeable(src):
        metrics, lines = not_merged("reward model", src, model_cfg)
        card = model_card("Reward model (adapter + head)", "rm", model_cfg, cfg, done, notes + lines + [
            f"- the score is the head (`{HEAD_FILE}`) at the last non-pad token: "
            "`deltalign.rewards.model.RewardModel.load(bb, dir)`"], merged=False)
        copy_adapter(src, out_dir / "reward_model", card, (HEAD_FILE, STATS_FILE), base_reference(model_cfg))
        return metrics
    bias = float(_head_bias(src))
    rm_notes = ["- load: `AutoModelForSequenceClassification.from_pretrained(dir)`; the score is `logits[:, 0]` "
                "at the last non-pad token; `reward_stats.json` has the mean/std of training-response scores"]
    if bias:
        rm_notes.append(f"- the reward head's bias ({bias:.6g}) has no place in HF's bias-free `score` layer: "
                        "it is stored as `deltalign_score_bias` in config.json; add it to the logits to get "
                        "deltalign's raw scores (rankings and Bradley-Terry differences do not need it)")
    card = model_card("Reward model", "rm", model_cfg, cfg, done, notes + rm_notes)
    return merged_reward_model(cfg, model_cfg, src, out_dir / "reward_model", card)


def _head_bias(rm_dir: Path) -> float:
    from safetensors.torch import load_file

    return float(load_file(str(rm_dir / HEAD_FILE))["proj.bias"].item())


@torch.no_grad()
def merged_reward_model(cfg: Config, model_cfg: ModelConfig, rm_dir: Path, dest: Path, card: str) -> dict:
    """``dest`` (``reward_model/``): the rm delta merged into the float32 base as a sequence classifier whose
    ``score`` is the head, checked against the adapter model's scores, saved with its tokenizer, stats and card."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    bb = adapter_backbone(model_cfg, rm_dir)
    tok = bb.tokenizer
    head = load_file(str(rm_dir / HEAD_FILE))
    w, b = head["proj.weight"].float(), head["proj.bias"].float()
    batch = check_batch(tok)
    hidden = bb(batch["input_ids"], batch["attention_mask"])
    before = last_token_values((hidden @ w.T).squeeze(-1) + b, batch["attention_mask"])
    causal = merge(bb)
    conf = copy.deepcopy(causal.config)
    conf.num_labels, conf.pad_token_id, conf.architectures = 1, tok.pad_token_id, None
    bias = float(b.item())
    if bias != 0.0:  # HF's score layer has no bias: keep it next to the weights, documented in the card
        conf.deltalign_score_bias = bias
    seq = AutoModelForSequenceClassification.from_config(conf, trust_remote_code=model_cfg.trust_remote_code)
    if not isinstance(getattr(seq, "score", None), torch.nn.Linear) or seq.score.bias is not None:
        raise ValueError(f"{type(seq).__name__} has no bias-free linear `score` layer; cannot export the reward model")
    getattr(seq, seq.base_model_prefix).load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
    seq.score.weight.copy_(w.to(seq.score.weight.dtype))
    seq = cast(seq.eval(), cfg.dtype)
    after = seq(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
    with atomic.directory(dest, replace=True) as tmp:
        seq.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tok.save_pretrained(tmp)
        if (rm_dir / STATS_FILE).exists():
            shutil.copy2(rm_dir / STATS_FILE, tmp / STATS_FILE)
        atomic.write_text(tmp / "README.md", card)
    return {"max_abs_score_diff": float((after + bias - before).abs().max()), "score_bias": bias,
            "files": sorted(p.name for p in dest.iterdir())}


# --- merging, checked against the adapter model (2 and 3) ---------------------------------------------------------

def mergeable(adapter_dir: Path) -> bool:
    return deltas.spec(deltas.method_of(adapter_dir)).mergeable


def adapter_backbone(model_cfg: ModelConfig, adapter_dir: Path) -> Backbone:
    """A float32, unquantized copy of the base with the adapter loaded (frozen, active), in eval mode."""
    full = ModelConfig(path=model_cfg.path, dtype="float32", quantization="none",
                       trust_remote_code=model_cfg.trust_remote_code)
    base, tok = load_base(full)
    bb = Backbone(base, tok, full)
    bb.load_adapter(ADAPTER, adapter_dir, trainable=False)
    return bb.eval()


def merge(bb: Backbone):
    """The plain transformers model with the active delta folded into its weights (mergeable methods only)."""
    if ADAPTER in bb.deltas:
        delta = bb.deltas[ADAPTER]
        delta.merge(bb.causal_lm)
        delta.detach()
        return bb.causal_lm
    return bb.model.merge_and_unload()


def check_batch(tok) -> dict:
    """A few chat prompts with short answers, right-padded (pad id at padding only)."""
    from deltalign.data.batching import pad_batch
    from deltalign.data.tokenize import tokenize_prompt

    chats = [[{"role": "user", "content": p}] for p in CHECK_PROMPTS]
    conv = bool(getattr(tok, "chat_template", None))
    seqs = [tokenize_prompt(c if conv else c[0]["content"], tok, conv) + tok("yes", add_special_tokens=False)[
        "input_ids"] for c in chats]
    return pad_batch(seqs, tok.pad_token_id)


def cast(model, dtype: str):
    return model.to(DTYPES[dtype])


# --- what goes beside a model: the adapter, its base, the card ----------------------------------------------------

def copy_adapter(adapter_dir: Path, dest: Path, card: str, extra: tuple[str, ...] = (),
                 base: dict | None = None) -> None:
    """The adapter files (and ``extra`` ones that exist, e.g. a reward head), the card and, for a delta that was not
    merged, ``base_model.json`` naming the base it needs."""
    with atomic.directory(dest, replace=True) as tmp:
        for f in (*ADAPTER_FILES, *extra):
            if f in ADAPTER_FILES or (adapter_dir / f).exists():
                shutil.copy2(adapter_dir / f, tmp / f)
        if base is not None:
            atomic.write_json(tmp / "base_model.json", base)
        atomic.write_text(tmp / "README.md", card)


def not_merged(kind: str, adapter_dir: Path, model_cfg: ModelConfig) -> tuple[dict, list[str]]:
    """Metrics and card lines for a delta that cannot be merged into plain weights (never a wrong merged model)."""
    method = deltas.method_of(adapter_dir)
    message = (f"the {kind} is a {method} delta, which cannot be merged into plain weights "
               f"({deltas.METHODS[method].summary}): exported as the adapter plus a reference to its base "
               f"(`{model_cfg.path}`), not as a standalone model")
    load = ("- load with deltalign: `bb = Backbone.load(ModelConfig(path=<base>)); bb.load_adapter(name, dir)`, "
            "then use `bb` (forward, `deltalign.sampling.generation.generate`); plain transformers cannot run it")
    return {"merged": False, "method": method, "message": message}, [f"- **not merged**: {message}", load]


def base_reference(model_cfg: ModelConfig) -> dict:
    return {"path": model_cfg.path, "sha256": model_fingerprint(model_cfg.path)}


def _scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def model_card(kind: str, stage: str, model_cfg: ModelConfig, cfg: Config, done: dict[str, Path],
               notes: list[str], merged: bool = True) -> str:
    run_dir = done[stage].parent
    how = [f"- merged adapter: stage `{stage}` from `{done[stage]}`",
           f"- weights dtype: {cfg.dtype} (merged in float32 into an unquantized copy of the base)"] if merged else \
        [f"- adapter ({deltas.method_of(done[stage])}, not merged): stage `{stage}` from `{done[stage]}`"]
    lines = ["---", "library_name: transformers" if merged else "library_name: deltalign", "tags: [deltalign]", "---",
             "", f"# {kind} exported by deltalign", "",
             f"- base model: `{model_cfg.path}` (files sha256 `{model_fingerprint(model_cfg.path)[:16]}`)",
             *how, *notes, "",
             "## Stages of the run", "", "| stage | content hash | upstream | finished |", "|---|---|---|---|"]
    for s, d in done.items():
        m = json.loads((d / MANIFEST).read_text())
        ups = ", ".join(f"{u} {h[:12]}" for u, h in m.get("inputs", {}).get("upstream", {}).items()) or "—"
        mark = (" (merged)" if merged else " (exported)") if s == stage else ""
        lines.append(f"| {s}{mark} | `{m['hash'][:16]}` | {ups} | {m.get('finished_at', '?')} |")
    lines += ["", "## Held-out metrics", ""]
    for s, d in done.items():
        if (d / "eval.json").exists():
            flat = _scalars(json.loads((d / "eval.json").read_text()))
            lines += [f"{s} (`{s}/eval.json`): " + ", ".join(f"{k} {v:.4g}" for k, v in flat.items()), ""]
    found, table = verify.resume_json(run_dir / "eval_table.json", then="left out of the card (`eval` writes it)")
    if found:
        from deltalign.reports.evaluation import markdown_table

        lines += ["Policy comparison (`eval_table.json`):", "", markdown_table(table)]
    return "\n".join(lines) + "\n"


# --- the copy outside the run (export.out, --out) -----------------------------------------------------------------

def check_out(cfg: Config, stage_dir: Path | None = None, out: str | None = None,
              overwrite: bool = False) -> Path | None:
    """The destination of the copy (``out``, the command line's ``--out``, else ``export.out``; None: no copy),
    or a clear error if it exists and neither ``overwrite`` nor ``export.overwrite`` is on, or lies inside the
    stage folder."""
    given = out or cfg.out
    if not given:
        return None
    dest = Path(given).resolve()
    if stage_dir is not None and dest.is_relative_to(Path(stage_dir).resolve()):
        raise ConfigError(f"export.out {given!r} is inside the export stage folder; choose a path outside it")
    if dest.exists() and not (overwrite or cfg.overwrite):
        raise FileExistsError(f"export destination {given} already exists; refusing to overwrite it "
                              "(pass --overwrite / export.overwrite=true to replace it)")
    return dest


def copy_export(stage_dir: Path, out: Path, overwrite: bool) -> Path:
    """Copy model/, reward_model/ and adapter/ of a finished export to ``out`` in one rename (refused if it exists
    unless ``overwrite``)."""
    with atomic.directory(out, replace=overwrite) as tmp:
        for sub in ("model", "reward_model", "adapter"):
            if (Path(stage_dir) / sub).is_dir():
                shutil.copytree(Path(stage_dir) / sub, tmp / sub)
    return out
