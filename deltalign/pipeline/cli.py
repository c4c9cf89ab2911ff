"""Command line: ``python -m deltalign run STAGE [STAGE ...] [--config FILE] [--set k=v ...] [--run-dir DIR]``."""

from __future__ import annotations

import argparse
import sys

from deltalign.data.formats import DataError
from deltalign.pipeline import config as configs
from deltalign.pipeline.graph import STAGES, Pipeline, sections

DEFAULT_CONFIG = "configs/default.yaml"


def stage_help(names: list[str]) -> str:
    secs = sections()
    parts = [configs.help_text(s, secs[s]) for s in ["run", "model", *names]]
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
    e.add_argument("--limit", type=int, default=0, help="use at most this many held-out prompts (0: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "eval":
        from deltalign.evaluation import compare_run, markdown_table

        cfgs = configs.load(sections(), args.config, args.overrides)
        run_dir = Pipeline(cfgs, args.run_dir).run_dir
        dpo = cfgs["dpo"]
        print(markdown_table(compare_run(run_dir, cfgs["model"], dpo.eval_data, dpo.generation, args.limit)))
        print(f"written to {run_dir / 'eval_table.json'}")
        return 0
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
        try:
            cfgs = configs.load(sections(), args.config, args.overrides)
        except configs.ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        try:
            Pipeline(cfgs, args.run_dir).run(args.stages, force=args.force)
        except (DataError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
