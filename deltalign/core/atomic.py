"""Atomic writes: a reader (or a resumed run) sees the old content or the new, never half of either.

Files and folders written here honour the user's umask (``mkstemp``/``mkdtemp`` alone would make them 0600/0700,
so another user allowed to read the folder could not load an exported model).

Fault injection: every write or rename into a run directory first passes :func:`crash_point`. With
``DELTALIGN_CRASH_AT=N`` in the environment (or :data:`CRASH_AT` set in a forked test process) the N-th point ends
the process with ``os._exit(137)`` -- no exception, so no cleanup handler runs, as under ``kill -9`` or a power
cut. :data:`POINTS` lists the points passed so far (tests enumerate them from an uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CRASH_AT = int(os.environ.get("DELTALIGN_CRASH_AT", "0") or 0)
POINTS: list[str] = []


def crash_point(what: str | Path) -> None:
    """Call just before each write or rename into a run directory (``what`` names it, for the tests' reports)."""
    POINTS.append(str(what))
    if CRASH_AT and len(POINTS) == CRASH_AT:
        os._exit(137)


class WriteFailed(OSError):
    """A write into the run directory failed (a full disk, a read-only file system, no permission): the CLI prints
    it as one line naming the file, exit 2; what was written before stays, so the next ``run`` resumes."""


def failed(path: str | Path, e: BaseException) -> WriteFailed:
    reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
    return WriteFailed(getattr(e, "errno", None), f"cannot write {path} ({reason}); free space or fix "
                       "permissions there, then run the same command again (it resumes from the newest checkpoint)")


def save_tensors(tensors: dict, path: str | Path) -> None:
    """``safetensors`` ``save_file`` at a crash point, its I/O errors (which safetensors raises as its own
    ``SafetensorError``) as :class:`WriteFailed`."""
    from safetensors.torch import save_file

    crash_point(f"write {path}")
    try:
        save_file(tensors, str(path))
        os.chmod(path, 0o666 & ~umask())  # safetensors writes 0600 whatever the umask
    except Exception as e:
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise failed(path, e) from None
        raise


def write_tensors(tensors: dict, path: str | Path) -> None:
    """:func:`save_tensors` to a temporary beside ``path``, then renamed: a reader sees the old file or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP}{os.getpid()}")
    try:
        save_tensors(tensors, tmp)
        crash_point(f"rename {path}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TEMP = ".tmp-"
"""In the name of every temporary file and folder written here: ``.<name>.tmp-<random>``."""


def remove_temp(folder: str | Path) -> None:
    """Remove what a crashed write left in ``folder`` (and below): temporaries that never got their final name."""
    for p in sorted(Path(folder).rglob(f".*{TEMP}*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    crash_point(f"write {path}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP}", dir=path.parent)
    except OSError as e:
        raise failed(path, e) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        crash_point(f"rename {path}")
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise failed(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def directory(path: str | Path, replace: bool = False):
    """Yield a temp dir beside ``path``; on success it becomes ``path`` in one rename.

    An existing ``path`` is replaced only with ``replace=True`` (otherwise FileExistsError). On error the temp dir
    is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (ask for overwrite explicitly)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMP}", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in tmp.rglob("*"):  # what a library wrote inside (transformers' safetensors shards: 0600) as the umask says
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask())
    crash_point(f"rename {path}")
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        crash_point(f"rename {path} (old one set aside)")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
