"""Training curves of each stage as PNG files: ``<run_dir>/plots/<stage>.png``.

A stage's ``metrics.jsonl`` holds rows with ``kind`` (``train``/``eval``/``setup``), ``step`` and metric keys. One
panel per group of keys that exists: losses, rewards and margins, accuracies and scores, KL. Training rows are
drawn as lines, evaluation rows as markers at their step. Keys are grouped by name, so new stages (PPO) plot
without changes here. matplotlib runs on the Agg backend (no display needed); each file is written atomically.

    plot_stage(run_dir / "dpo", run_dir / "plots" / "dpo.png")
    plot_run(run_dir)              # every finished stage with metrics; returns the paths written
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

PANELS = [  # (title, predicate on a metric name), in display order; a key goes to the first panel that takes it
    ("KL", lambda k: "kl" in re.split(r"[^a-z0-9]+", k.lower())),
    ("loss", lambda k: "loss" in k or "nll" in k),
    ("accuracy / score", lambda k: "accuracy" in k or "score" in k),
    ("reward / margin", lambda k: "reward" in k or "margin" in k or k.endswith("value") or "advantage" in k),
    ("clipping / entropy", lambda k: "clip" in k or "entropy" in k or "zero_std" in k),
]
ORDER = ("loss", "reward / margin", "accuracy / score", "KL", "clipping / entropy")  # display order, left to right
SKIP = {"step", "time", "kind", "lr", "grad_norm", "pad_share", "n"}


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i + 1}: not JSON ({e.msg})") from None
    return rows


def panel_of(key: str) -> str | None:
    leaf = key.rsplit("/", 1)[-1]
    if leaf in SKIP or "tokens" in leaf or leaf.startswith("time_"):
        return None
    for title, match in PANELS:
        if match(key):
            return title
    return None


def series(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """panel title -> ``"<kind>:<key>"`` -> (steps, values), for numeric train/eval metrics."""
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for r in rows:
        if r.get("kind") not in ("train", "eval") or "step" not in r:
            continue
        for k, v in r.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            title = panel_of(k)
            if title is not None:
                xs, ys = out.setdefault(title, {}).setdefault(f"{r['kind']}:{k}", ([], []))
                xs.append(r["step"])
                ys.append(v)
    return {t: out[t] for t in ORDER if t in out}


def plot_stage(stage_dir: str | Path, out_png: str | Path, title: str | None = None) -> Path | None:
    """Write ``out_png`` from ``stage_dir/metrics.jsonl``; None (nothing written) if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage_dir, out_png = Path(stage_dir), Path(out_png)
    metrics = stage_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    panels = series(read_metrics(metrics))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, (xs, ys) in lines.items():
            kind, key = label.split(":", 1)
            if kind == "train":
                ax.plot(xs, ys, label=key, linewidth=1.5)
            else:
                ax.plot(xs, ys, "o", label=f"{key} (held-out)", markersize=6)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or stage_dir.name)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".png", dir=out_png.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out_png


def plot_run(run_dir: str | Path) -> list[Path]:
    """One PNG per finished stage (a folder with ``manifest.json`` and ``metrics.jsonl``) in ``run_dir/plots``."""
    run_dir = Path(run_dir)
    written = []
    for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (stage_dir / "manifest.json").exists():
            png = plot_stage(stage_dir, run_dir / "plots" / f"{stage_dir.name}.png",
                             title=f"{run_dir.name} / {stage_dir.name}")
            if png is not None:
                written.append(png)
    return written
