"""Checks of a planned run, before any model loads and before the first stage trains.

:func:`preflight` runs after the config loaded (which already checked every key, type, choice and range) and
before :meth:`Pipeline.run`: it checks what a setting's type cannot -- the base model directory, the house rule
for references, user reward functions, and every data source a planned stage reads (it exists, its first rows
parse into the shape the stage needs). A problem raises a one-line :class:`ConfigError`, :class:`DataError` or
:class:`FileNotFoundError` naming the setting, or the file, row and field; nothing in the run directory is
touched. Each stage declares what it reads in its module: ``READS = {"data": "sft", "eval_data": "sft"}`` (the
setting, then the shape: ``sft``, ``pref`` or ``prompt``). Every row is validated (not tokenised), under the
stage's ``bad_rows`` rule, so a bad row in DPO's data stops the run before SFT trains, not after.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from deltalign import zero
from deltalign.data.formats import DataError, load_rows, preference_examples, prompt_examples, sft_examples
from deltalign.data.unpaired import unpaired_examples
from deltalign.core import verify
from deltalign.core.settings import ConfigError

SHAPES = {"sft": sft_examples, "pref": preference_examples, "prompt": prompt_examples, "kto": unpaired_examples}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def check_model(model_cfg) -> None:
    """``model.path`` is ``tiny`` or a local Hugging Face checkpoint with a readable config and safetensors; what
    the launch's ZeRO stage cannot run (:func:`deltalign.zero.check_supported`) is refused here."""
    zero.check_supported(model_cfg.quantization, zero.launched_zero_stage())
    if model_cfg.path == "tiny":
        return
    path = Path(model_cfg.path)
    hint = " (run `make model` to build the embedded default)" if "SmolLM2" in model_cfg.path else ""
    if not path.is_dir():
        raise FileNotFoundError(f"model.path {model_cfg.path!r} is not a local checkpoint directory{hint}")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path {model_cfg.path!r}: no readable config.json ({type(e).__name__})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"model.path {model_cfg.path!r}: no *.safetensors weights (deltalign loads weights "
                          "through safetensors only, never pickled .bin files)")
    for f in weights:
        check_safetensors(f)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model.path {model_cfg.path!r}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                          "copy them from the model's source beside config.json")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""A tokenizer's vocabulary in any of the forms ``AutoTokenizer`` reads (tokenizer_config.json alone is not one)."""


def check_safetensors(f: Path) -> None:
    """``f`` holds a whole safetensors file (:func:`deltalign.core.verify.safetensors_problem`: what an
    interrupted copy or download lacks). Reads the header only."""
    if why := verify.safetensors_problem(f):
        raise ConfigError(f"{f}: {why}; copy or download it again")


def weight_names(path: Path) -> list[str]:
    """The tensor names of a checkpoint directory, from its safetensors headers (no weights read)."""
    names = []
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            names += [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
    return names


def matches(target: list[str] | str, module: str) -> bool:
    """peft's rule (``check_target_module_exists``): a string is a regex the whole name must match; a list entry
    matches the name itself or its last components (``q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def check_target_modules(cfgs: dict, plan: list[str]) -> None:
    """Each planned stage's ``delta.target_modules`` (lora, dora, ia3) names modules the checkpoint has, checked
    on the names in its weight index before any weights load. A tied ``lm_head`` (absent from the index) counts."""
    from deltalign.model.backbone import resolve_path

    planned = [(f"{n}.{field}", a.target_modules) for n in plan for field in ("delta", "critic_delta")
               if getattr(a := getattr(cfgs[n], field, None), "method", "") in ("lora", "dora", "ia3")
               and a.target_modules != "all-linear"]
    if not planned:
        return
    path = resolve_path(cfgs["model"].path)
    modules = {k.rsplit(".", 1)[0] for k in weight_names(path)} | {"lm_head"}
    for setting, target in planned:
        key = f"{setting}.target_modules"
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error as e:
                raise ConfigError(f"{key}={target!r} is not a valid regular expression ({e})") from None
        missing = [t for t in ([target] if isinstance(target, str) else target) if not any(
            matches(t if isinstance(target, str) else [t], m) for m in modules)]
        if missing:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if "layers." in m})
            raise ConfigError(f"{key}: no module of {cfgs['model'].path} matches {', '.join(map(repr, missing))} "
                              f"(its layers' modules: {', '.join(leaves)}; or all-linear)")


def check_reference(cfgs: dict, plan: list[str], run_dir: Path) -> None:
    """The house rule: once an SFT delta exists, the reference policy is that delta, frozen -- never the bare
    base with adapters off. ``dpo.reference: base`` (or ``kto.reference: base``) is refused in a run that has (or
    will have) an SFT stage. PPO has no such setting: its reference is always the SFT adapter."""
    has_sft = "sft" in plan or (run_dir / "sft" / "manifest.json").exists()
    for name in ("dpo", "kto"):
        if name in plan and cfgs[name].reference == "base" and has_sft:
            raise ConfigError(f"{name}.reference=base, but this run has an SFT stage: once an SFT delta exists the "
                              f"reference is that delta, frozen (against the bare base, {name.upper()} would pull "
                              f"the policy away from what SFT taught); use {name}.reference=sft, or a run without "
                              "sft")


def check_rules(cfgs: dict, plan: list[str]) -> None:
    """Every rule-based reward of a planned stage imports and is callable."""
    from deltalign.rewards.composite import rule_function

    for name in plan:
        for spec in getattr(cfgs[name], "rules", None) or {}:
            try:
                rule_function(spec)
            except ValueError as e:
                raise ConfigError(f"{name}.rules: {e}") from None


def check_source(source: str, shape: str, key: str, split: str = "train", bad_rows: str = "error") -> None:
    """``source`` exists and its rows parse as ``shape`` (errors name ``key``, or the file/row/field); under
    ``bad_rows: skip`` only a source with no usable row fails (the stage logs each skipped row itself)."""
    p = Path(source)
    if p.suffix in LOCAL_SUFFIXES and not p.exists():
        raise FileNotFoundError(f"{key}: data file {source!r} does not exist")
    rows = load_rows(source, split)
    if not rows:
        raise DataError("no rows", source)
    SHAPES[shape](rows, source, bad_rows, lambda line: None)


def check_data(cfgs: dict, plan: list[str]) -> None:
    """Every data source a planned stage reads (its module's ``READS``), and the eval section's when asked."""
    from deltalign.pipeline.graph import stage_module

    for name in plan:
        cfg = cfgs[name]
        for field, shape in getattr(stage_module(name), "READS", {}).items():
            source = getattr(cfg, field)
            if source:
                split = cfg.split if field == "data" else "test"
                check_source(source, shape, f"{name}.{field}", split, getattr(cfg, "bad_rows", "error"))
                if shape != "prompt" and hasattr(cfg, "max_length"):
                    check_rows_left(name, cfg, cfgs["model"], shape, field, split)


def check_rows_left(name: str, cfg, model_cfg, shape: str, field: str = "data", split: str = "train") -> None:
    """The rows are tokenised here under the stage's ``max_length`` / ``truncation`` / ``bad_rows`` (the tokenizer
    only, no weights): a prompt too long to fit is named now, and a stage whose training rows are all dropped
    fails naming the settings -- not after its model loaded."""
    from deltalign.data.splits import load_split
    from deltalign.data.tokenize import load_tokenizer
    from deltalign.model.backbone import resolve_path

    tok = load_tokenizer(resolve_path(model_cfg.path), model_cfg.trust_remote_code)
    read = load_split(getattr(cfg, field), split, shape, tok, cfg.max_length, cfg.truncation, cfg.bad_rows,
                      lambda line: None)
    if field == "data" and not read.items and read.counts["dropped"]:
        raise DataError(f"{name}.truncation=drop leaves no row: all {read.counts['dropped']} rows are longer than "
                        f"{name}.max_length={cfg.max_length} tokens (raise it, or use truncation=completion)",
                        cfg.data)


def position_warnings(cfgs: dict, plan: list[str]) -> list[str]:
    """A planned ``max_length`` beyond the model's ``max_position_embeddings``: a warning on a RoPE model (it runs,
    on positions it never saw), a :class:`ConfigError` on one with learned positions (they do not exist)."""
    from deltalign.model.backbone import resolve_path

    conf = json.loads((resolve_path(cfgs["model"].path) / "config.json").read_text())
    n = conf.get("max_position_embeddings") or conf.get("n_positions")
    out = []
    for name in plan:
        length = getattr(cfgs[name], "max_length", 0)
        if not n or length <= n:
            continue
        what = f"{name}.max_length={length} is beyond the {n} positions of model.path {cfgs['model'].path!r}"
        if "rope_theta" not in conf and "rope_scaling" not in conf and "rope_parameters" not in conf:
            raise ConfigError(f"{what} (learned position embeddings: there are no more); use at most {n}")
        out.append(f"warning: {what} (RoPE: it runs, on positions the model never trained on)")
    return out


def check_deltas(cfgs: dict, plan: list[str]) -> None:
    """The deltas a planned stage reads from outside this run (``compose.sources`` that are folders) are whole
    and composable before any weights load (the ones in this run are verified as each stage starts: a damaged
    one is set aside and its stage reruns, :meth:`deltalign.pipeline.rundir.StageDir.damaged`)."""
    from deltalign.deltas import composable
    from deltalign.stages.compose import is_stage_name

    if "compose" not in plan:
        return
    for i, s in enumerate(cfgs["compose"].sources):
        if not is_stage_name(s):
            try:
                composable.inspect_source(Path(s), f"compose.sources[{i}] ({s})")
            except ValueError as e:
                raise ConfigError(str(e)) from None


def preflight(cfgs: dict, plan: list[str], run_dir: Path, log=None) -> None:
    """All of the above, cheapest first; warnings go to ``log`` (default: stderr)."""
    import sys

    check_model(cfgs["model"])
    for line in position_warnings(cfgs, plan):
        (log or (lambda m: print(m, file=sys.stderr)))(line)
    check_target_modules(cfgs, plan)
    check_reference(cfgs, plan, Path(run_dir))
    check_rules(cfgs, plan)
    check_deltas(cfgs, plan)
    check_data(cfgs, plan)
