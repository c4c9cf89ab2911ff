"""Command line: ``python -m deltalign run STAGE [STAGE ...] [--config FILE] [--set k=v ...] [--run-dir DIR]``.

Also ``eval`` (held-out comparison + training-curve plots), ``export`` (``run export``: the export stage, re-run
when any stage it reads changed, and its copy to ``--out``), ``generate`` (responses of base, a stage or an
exported model to your prompts), ``plots``, ``doctor`` (checks before a run) and ``status`` (what ``run`` would do).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path

from deltalign.data.formats import DataError
from deltalign.data.rows import read_utf8
from deltalign.core import atomic, verify
from deltalign.core import settings as configs
from deltalign.reports.evaluation import POLICY_STAGES
from deltalign.pipeline.checks import check_model, check_source, preflight
from deltalign.pipeline.graph import STAGES, Pipeline, is_main_process, sections
from deltalign.pipeline.rundir import RunDirError, StageDir
from deltalign.pipeline.help import help_text

DEFAULT_CONFIG = "configs/default.yaml"


def stage_help(names: list[str]) -> str:
    secs = sections()
    parts = [help_text(s, secs[s]) for s in ["run", "model", *names]]
    return "settings (YAML section.key, or --set section.key=value):\n\n" + "\n\n".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deltalign",
        description="deltalign: SFT -> reward model -> DPO/PPO -> export, every stage a delta on one frozen "
                    "backbone. Stages: " + ", ".join(STAGES) + ".",
        epilog="`python -m deltalign run STAGE --help` lists every setting of that stage.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run stages (and whatever they need upstream that is missing or stale)",
                       add_help=False)
    r.add_argument("stages", nargs="*", help=f"one or more of: {', '.join(STAGES)}")
    r.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set sft.lr=1e-4 (repeatable)")
    r.add_argument("--run-dir", default=None, help="run directory (default: <run.root>/<run.name>)")
    r.add_argument("--force", action="store_true", help="rerun the named stages even if up to date "
                                                        "(the previous output is kept under .history/)")
    r.add_argument("-h", "--help", action="store_true", help="show the settings of the named stages")
    e = sub.add_parser("eval", help="compare base and every finished policy of a run on held-out prompts")
    e.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--run-dir", default=None, help="run directory (default: <run.root>/<run.name>)")
    e.add_argument("--limit", type=int, default=0,
                   help="use at most this many held-out prompts (default: eval.limit)")
    x = sub.add_parser("export", help="merge the policy (and reward model) into standalone HF model directories "
                                      "(the same as `run export`)")
    x.set_defaults(stages=["export"])
    g = sub.add_parser("generate", help="responses of base, a stage or an exported model to your prompts")
    pl = sub.add_parser("plots", help="write <run dir>/plots/<stage>.png training curves of every finished stage")
    d = sub.add_parser("doctor", help="check the environment, the model directory and the data of a config "
                                      "before a long run (loads no weights); exit 2 on a problem")
    d.add_argument("stages", nargs="*", help="stages to check (default: every training stage)")
    st = sub.add_parser("status", help="what `run` would do for these stages: each one done, stale, unfinished "
                                       "or missing, with wall time and peak memory (loads nothing)")
    st.add_argument("stages", nargs="*", help="stages (and what they need upstream; default: every stage)")
    for q in (x, g, pl, d, st):
        q.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        q.add_argument("--run-dir", default=None, help="run directory (default: <run.root>/<run.name>)")
    x.add_argument("--policy", choices=["auto", *POLICY_STAGES],
                   help="adapter to merge (default: auto, the most recently finished of ppo, grpo, dpo, kto; else sft)")
    x.add_argument("--out", help="also copy the export to this directory (outside the run directory; default: "
                                 "export.out)")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the exported weights")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    x.add_argument("--force", action="store_true", help="export again even if the export is up to date")
    g.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                   help=f"base, {', '.join(POLICY_STAGES)}, export (the run's merged model) or an exported model directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--prompts-file", help=".txt (one prompt a line) or .jsonl (`prompt` or `messages` per row)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; e.g. 0.7 to sample")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    return p


def load_prompts(args) -> list:
    """Prompts as chat message lists (or plain strings from a .jsonl ``prompt`` string field)."""
    if args.prompt is not None:
        return [[{"role": "user", "content": args.prompt}]]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path} does not exist")
    lines = read_utf8(path).splitlines()
    if path.suffix != ".jsonl":
        return [[{"role": "user", "content": ln.strip()}] for ln in lines if ln.strip()]
    prompts = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(f"not JSON ({e.msg})", f"{path}: row {i}") from None
        value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if isinstance(value, list) and value and value[-1].get("role") == "assistant":
            value = value[:-1]  # a whole dialogue: answer its last user turn anew
        if not (isinstance(value, str) and value.strip()) and not (isinstance(value, list) and value):
            raise DataError("needs a non-empty `prompt` (text or messages) or `messages`", f"{path}: row {i}",
                            "prompt")
        prompts.append(value)
    if not prompts:
        raise DataError("no prompts", str(path))
    return prompts


def generation_source(source: str, run_dir: Path, model_cfg):
    """(backbone, adapter name or None) for ``--from``."""
    from deltalign.model.backbone import Backbone, ModelConfig

    if source == "base":
        return Backbone.load(model_cfg), None
    if source in POLICY_STAGES:
        stage = run_dir / source
        if not (stage / "manifest.json").exists():
            raise FileNotFoundError(f"no finished {source} stage in {run_dir} (run `make {source}` first)")
        check_finished(run_dir, [source])
        backbone = Backbone.load(model_cfg)
        backbone.load_adapter(source, stage, trainable=False)
        return backbone, source
    if source == "rm":
        raise ValueError(f"rm is a reward model, not a policy: generate from base, {', '.join(POLICY_STAGES)} or "
                         "an export")
    path = run_dir / "export" if source == "export" else Path(source)
    if source == "export" and (path / "manifest.json").exists():
        check_finished(run_dir, ["export"])
    if (path / "adapter" / "base_model.json").exists() and not (path / "model" / "config.json").exists():
        # an export of a delta that cannot be merged (prefix, prompt, bottleneck): its base + the adapter
        base = json.loads((path / "adapter" / "base_model.json").read_text())
        backbone = Backbone.load(ModelConfig(path=base["path"]))
        backbone.load_adapter("export", path / "adapter", trainable=False)
        return backbone, "export"
    if (path / "model" / "config.json").exists():  # an export folder: its merged policy
        path = path / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--from {source!r}: not base, a policy stage or export, and not a model directory "
                                f"(no {path / 'config.json'})")
    check_model(ModelConfig(path=str(path)))  # whole, before its weights load
    return Backbone.load(ModelConfig(path=str(path))), None


def generate_command(args, cfgs) -> int:
    from deltalign.data.tokenize import tokenize_prompt
    from deltalign.sampling.generation import GenerationConfig, decode, generate

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    gen.validate()
    prompts = load_prompts(args)
    backbone, adapter = generation_source(args.source, Pipeline(cfgs, args.run_dir).run_dir, cfgs["model"])
    tok = backbone.tokenizer
    chat = bool(getattr(tok, "chat_template", None))  # no template: plain text, as training did for plain data

    def ids_of(p) -> list[int]:
        if isinstance(p, str) or not chat:
            return tokenize_prompt(p if isinstance(p, str) else "\n".join(m["content"] for m in p), tok, False)
        return tokenize_prompt(p, tok, True)

    ids = [ids_of(p) for p in prompts]
    with backbone.using(adapter):  # None: the base (or the merged export) as loaded
        out = generate(backbone, ids, gen, seed=args.seed)
    for i, (p, r) in enumerate(zip(prompts, decode(backbone, out))):
        shown = p if isinstance(p, str) else p[-1]["content"]
        print(f"### [{i + 1}] prompt\n{shown}\n### [{i + 1}] response ({args.source})\n{r}\n")
    return 0


def export_summary(metrics: dict, stage_dir: Path, out: Path | None) -> str:
    """What a run with the export stage says at its end: where the policy (and reward model) went."""
    if metrics["model"].get("merged") is False:  # prefix / prompt / bottleneck: the adapter and its base
        lines = [f"exported policy {metrics['policy']!r} to {stage_dir / 'adapter'}: {metrics['model']['message']}"]
    else:
        lines = [f"exported policy {metrics['policy']!r} to {stage_dir / 'model'} "
                 f"(max abs logit diff vs adapter model {metrics['model']['max_abs_logit_diff']:.3g})"]
    if "reward_model" in metrics:
        note = metrics["reward_model"].get("message", "")
        lines.append(f"exported reward model to {stage_dir / 'reward_model'}" + (f": {note}" if note else ""))
    if out is not None:
        lines.append(f"copied to {out}")
    return "\n".join(lines)


USER_ERRORS = (configs.ConfigError, DataError, FileNotFoundError, FileExistsError, RunDirError, atomic.WriteFailed,
               verify.Damaged)
"""Bad input: a one-line message and exit code 2, no traceback (DELTALIGN_TRACEBACK=1 shows it anyway)."""


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (so ``finally`` blocks and atomic writes clean up as on Ctrl-C)."""


def _terminate(signum, frame):
    raise Terminated()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def stopped_line(args, e: KeyboardInterrupt) -> str:
    """The one line an interrupted command ends with: where ``run`` stopped and that rerunning it resumes."""
    from deltalign.training import checkpoint

    what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    pipe = getattr(args, "pipeline", None)
    stage = getattr(pipe, "current", None)
    if stage is None:
        return f"{what}: nothing finished is lost; rerun the same command (finished stages are kept, an " \
               "unfinished one resumes from its newest checkpoint)"
    last = checkpoint.latest(pipe.run_dir / stage)
    at = f"its newest checkpoint is step {checkpoint.step_of(last)}" if last else "it had no checkpoint yet"
    return f"{what} during stage {stage} ({pipe.run_dir / stage}: {at}); rerun the same `run` command and it " \
           + ("resumes from there" if last else "resumes the stage from its start")


def main(argv: list[str] | None = None) -> int:
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        unknown = [s for s in args.stages if s not in STAGES]
        if unknown:
            print(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}", file=sys.stderr)
            return 2
        if args.help or not args.stages:
            print("usage: python -m deltalign run STAGE [STAGE ...] [--config FILE] [--set KEY=VALUE ...] "
                  "[--run-dir DIR] [--force]\n")
            print(stage_help(args.stages or list(STAGES)))
            return 0 if args.help else 2
    for flag in ("policy", "dtype"):
        if getattr(args, flag, None) is not None:
            args.overrides.append(f"export.{flag}={getattr(args, flag)}")
    if getattr(args, "overwrite", False) and not args.out:  # applies to export.out from the YAML
        args.overrides.append("export.overwrite=true")
    # the export stage and generate also report their own bad arguments as ValueError
    handled = USER_ERRORS + ((ValueError,) if args.command == "generate" or "export" in getattr(args, "stages", ())
                             else ())
    try:
        cfgs = configs.load(sections(), args.config, args.overrides)
        return COMMANDS[args.command](args, cfgs)
    except handled as e:
        if os.environ.get("DELTALIGN_TRACEBACK") == "1":
            raise
        kind = "config error" if isinstance(e, configs.ConfigError) else "error"
        print(f"{kind}: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only file system met by a library's own writes (an export, say)
        if e.errno not in WRITE_ERRNOS or os.environ.get("DELTALIGN_TRACEBACK") == "1":
            raise
        print(f"error: {_one_line(atomic.failed(e.filename or '?', e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if os.environ.get("DELTALIGN_TRACEBACK") == "1":
            raise
        print(stopped_line(args, e), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


def run_command(args, cfgs) -> int:
    """``run STAGE ...``, and ``export``, which is ``run export`` (its flags are export settings; ``--out``, or
    ``export.out``, gets a copy of the export as it stands after the run, fresh or up to date): one code path."""
    from deltalign.stages import export

    pipe = args.pipeline = Pipeline(cfgs, args.run_dir)  # args.pipeline: where an interrupted run stopped
    plan = pipe.plan(args.stages)
    preflight(cfgs, plan, pipe.run_dir)  # before any model loads or stage runs
    stage_dir, overwrite = pipe.run_dir / "export", getattr(args, "overwrite", False)
    # a destination in the way fails now, not after the stages before the export
    out = export.check_out(cfgs["export"], stage_dir, getattr(args, "out", None), overwrite) if "export" in plan \
        else None
    results = pipe.run(args.stages, force=args.force)
    if "export" in results and is_main_process():
        if out is not None:  # a copy of the export as it stands: no re-export, nothing archived
            export.copy_export(stage_dir, out, overwrite or cfgs["export"].overwrite)
        print(export_summary(results["export"], stage_dir, out))
    return 0


def check_finished(run_dir: Path, stages) -> None:
    """The finished stages a command reads are whole, before any model loads (one line naming the first damaged
    file; ``run`` sets that stage aside and reruns it)."""
    for name in stages:
        if broken := StageDir(run_dir, name).damaged():
            raise verify.Damaged(f"stage {name}: {broken[0]}; run `python -m deltalign run {name}` to set it "
                                 "aside and train it again")


def eval_command(args, cfgs) -> int:
    from deltalign.reports.evaluation import RM_TABLE, compare_run, finished_rm, markdown_table
    from deltalign.reports.plots import plot_run

    ev = cfgs["eval"]
    run_dir = Pipeline(cfgs, args.run_dir).run_dir
    check_model(cfgs["model"])
    check_source(ev.data, "prompt", "eval.data", "test", ev.bad_rows)
    check_finished(run_dir, STAGES)
    if ev.judge:  # the win rates need a finished judge and a finished baseline, known before any weights load
        why = finished_rm(ev.judge)
        if why:
            raise configs.ConfigError(f"eval.judge: {why}; give the folder of a finished rm stage (e.g. "
                                      "runs/<judge run>/rm), or '' for no win rates")
        if ev.baseline != "base" and (ev.baseline not in POLICY_STAGES
                                       or not (run_dir / ev.baseline / "manifest.json").exists()):
            raise configs.ConfigError(f"eval.baseline: no finished {ev.baseline!r} stage in {run_dir} (base or one "
                                      f"of {', '.join(POLICY_STAGES)})")
    for png in plot_run(run_dir):  # cheap, and useful even if the comparison below fails
        print(f"wrote {png}")
    table = compare_run(run_dir, cfgs["model"], ev.data, ev.generation, args.limit or ev.limit, ev.bad_rows,
                        judge=ev.judge, baseline=ev.baseline)
    rm_file = run_dir / RM_TABLE
    print(markdown_table(table, json.loads(rm_file.read_text()) if rm_file.exists() else None))
    print(f"written to {run_dir / 'eval_table.json'}" + (f" and {rm_file}" if rm_file.exists() else ""))
    if (run_dir / "export" / "model" / "config.json").exists():
        print(f"exported model (plain transformers loads it): {run_dir / 'export' / 'model'}")
    return 0


def plots_command(args, cfgs) -> int:
    from deltalign.reports.plots import plot_run

    for png in plot_run(Pipeline(cfgs, args.run_dir).run_dir):
        print(f"wrote {png}")
    return 0


def doctor_command(args, cfgs) -> int:
    from deltalign.pipeline.doctor import doctor

    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise configs.ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    pipe = Pipeline(cfgs, args.run_dir)
    return doctor(cfgs, pipe.plan(args.stages or [s for s in STAGES if s != "export"]), pipe.run_dir)


def status_command(args, cfgs) -> int:
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise configs.ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    for name, state, detail in Pipeline(cfgs, args.run_dir).status(args.stages or list(STAGES)):
        print(f"{name:<8} {state:<11} {detail}")
    return 0


COMMANDS = {"doctor": doctor_command, "run": run_command, "eval": eval_command, "export": run_command,
            "generate": generate_command, "plots": plots_command, "status": status_command}


if __name__ == "__main__":
    sys.exit(main())
