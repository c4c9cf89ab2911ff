"""Content fingerprints: the sha256 of a file's bytes (cached per inode and mtime within the process), of a JSON
value, and of a base model's folder. Run directories (pipeline/rundir.py) and composed deltas hash with these."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

_file_hash_cache: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, cached per (path, inode, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
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
        from deltalign.core import tiny

        p = tiny.ensure()
    else:
        p = Path(path)
    if not p.is_dir():
        return f"missing:{path}"
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return sha256_json({f.name: sha256_file(f) for f in files})
