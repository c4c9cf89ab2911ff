"""The run directory, its manifests, and the content hashes that decide whether a stage can be skipped.

Layout: ``<root>/<run name>/<stage>/`` holds one stage's adapter (PEFT format), head, ``metrics.jsonl``,
``config.yaml`` (the resolved config) and ``manifest.json``. The manifest is written last and atomically: a
directory without one is an unfinished run, which the next run of the same inputs resumes from its checkpoint.

The content hash of a stage covers its config, the base model, its data and the hashes of its upstream stages.
A finished stage whose hash matches is skipped. When the inputs changed, the old output is not overwritten: it is
moved to ``<run>/.history/<stage>-<old hash>/`` and the stage runs again (and so does everything downstream,
since their upstream hash changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from deltalign import atomic

MANIFEST = "manifest.json"
STARTED = "inputs.json"
_file_hash_cache: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _file_hash_cache[key] = h.hexdigest()
    return _file_hash_cache[key]


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(path: str) -> str:
    """Hash of a base model: every file of the checkpoint (weights, config, tokenizer)."""
    if path == "tiny":
        from deltalign import tiny

        p = tiny.ensure()
    else:
        p = Path(path)
    if not p.is_dir():
        return f"missing:{path}"
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return sha256_json({f.name: sha256_file(f) for f in files})


def data_fingerprint(source: str) -> str:
    """Hash of a data source: a local file's bytes, the embedded generator's code, or a `datasets` id."""
    if not source:
        return "none"
    if source.startswith("embedded:"):
        import deltalign.data.embedded as gen
        import deltalign.rewards.checker as chk

        return sha256_json([source, sha256_file(Path(gen.__file__)), sha256_file(Path(chk.__file__))])
    p = Path(source)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return sha256_json({str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()})
    return f"datasets:{source}"  # a hub id: pinned by name (and revision, if given in the id)


class StageDir:
    """One stage's folder in a run."""

    def __init__(self, run_dir: Path, stage: str):
        self.path = Path(run_dir) / stage
        self.stage = stage

    def manifest(self) -> dict | None:
        f = self.path / MANIFEST
        return json.loads(f.read_text()) if f.exists() else None

    def is_done(self, content_hash: str) -> bool:
        m = self.manifest()
        return m is not None and m.get("hash") == content_hash

    def prepare(self, content_hash: str, inputs: dict, config_yaml: str, log=print) -> None:
        """Make the folder ready to (re)run: archive a finished or unfinished run of other inputs; keep a
        matching unfinished run (it resumes from its checkpoint)."""
        if self.path.exists():
            m = self.manifest()
            started = self.path / STARTED
            old_hash = (m or {}).get("hash") or (json.loads(started.read_text())["hash"] if started.exists() else "")
            if old_hash != content_hash or m is not None:
                self.archive(old_hash or "unknown", log)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path / "config.yaml", config_yaml)
        atomic.write_json(self.path / STARTED, {"hash": content_hash, "inputs": inputs})

    def archive(self, old_hash: str, log=print) -> Path:
        dest = self.path.parent / ".history" / f"{self.stage}-{old_hash[:12]}-{int(time.time())}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dest)
        log(f"[deltalign] {self.stage}: inputs changed; previous output kept in {dest}")
        return dest

    def finish(self, content_hash: str, inputs: dict, metrics: dict, wall_time: float) -> None:
        atomic.write_json(self.path / MANIFEST, {
            "stage": self.stage, "hash": content_hash, "status": "done", "inputs": inputs,
            "metrics": metrics, "wall_time_s": round(wall_time, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
