"""Is a file the project wrote still whole? Read back what a run directory holds without trusting it.

A crash is not the only thing that damages a file (the writes themselves are atomic, :mod:`deltalign.core.atomic`):
a disk that fills, a copy cut short, a file edited by hand. What is read back goes through here: a safetensors
file is checked against its own header (the data ends where the largest tensor offset says) before any tensor
loads, a JSON file must parse as an object. What is not whole raises :class:`Damaged`, one line naming the file
(the CLI prints it, exit 2), or -- for what a stage keeps only to resume faster (a baseline measured once, a
cache) -- is renamed ``<name>.corrupt`` with one line (:func:`set_aside`) and computed again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CORRUPT = ".corrupt"
"""The suffix of a file or folder set aside because it could not be read (it is kept, never deleted)."""


class Damaged(ValueError):
    """A file the project wrote does not read back whole: one line naming it (exit 2 at the CLI)."""


def safetensors_problem(f: Path) -> str:
    """'' if ``f`` is a whole safetensors file (an 8-byte header length, a JSON header, as many data bytes as its
    largest tensor offset), else what is wrong. Reads the header only."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                return f"not a readable safetensors file (header of {n} bytes in a file of {size})"
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"not a readable safetensors file ({' '.join(str(e).split())[:120]})"
    if size != 8 + n + end:
        return f"truncated or padded safetensors file ({size} bytes, its header says {8 + n + end})"
    return ""


def json_problem(f: Path, obj: bool = True) -> str:
    """'' if ``f`` parses as JSON (an object, with ``obj``), else what is wrong."""
    try:
        value = json.loads(Path(f).read_text())
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except ValueError as e:
        return f"not readable JSON ({type(e).__name__}: {' '.join(str(e).split())[:80]})"
    return "" if isinstance(value, dict) or not obj else f"not a JSON object (a {type(value).__name__})"


HINT = "it was cut short or damaged; run the stage that wrote it again (`run` sets a damaged stage aside and reruns it)"


def damaged(f: Path, why: str) -> Damaged:
    return Damaged(f"{f}: {why}; {HINT}")


def read_json(f: str | Path) -> dict:
    """The JSON object in ``f``, or :class:`Damaged` naming it."""
    f = Path(f)
    if why := json_problem(f):
        raise damaged(f, why)
    return json.loads(f.read_text())


def load_tensors(f: str | Path) -> dict:
    """The tensors of a safetensors file checked whole first, or :class:`Damaged` naming it (never a traceback
    from inside safetensors)."""
    from safetensors.torch import load_file

    f = Path(f)
    if why := safetensors_problem(f):
        raise damaged(f, why)
    return load_file(str(f))


def set_aside(f: Path, why: str, log=print, then: str = "computing it again") -> Path:
    """Rename ``f`` to ``<name>.corrupt`` (replacing an older one) and say so in one line."""
    from deltalign.core import atomic

    dest = f.with_name(f.name + CORRUPT)
    atomic.crash_point(f"rename {f} (set aside)")
    os.replace(f, dest)
    log(f"[deltalign] {f}: {why}; set aside as {dest.name}, {then}")
    return dest


def resume_json(f: Path, main: bool = True, log=print, then: str = "computing it again") -> tuple[bool, object]:
    """``(True, value)`` for a JSON file a stage saved to resume with; ``(False, None)`` if absent or unreadable
    (then set aside by the ``main`` process: the stage computes it again; every process gets the same answer)."""
    try:
        return True, json.loads(f.read_text())
    except FileNotFoundError:
        return False, None
    except (OSError, ValueError) as e:
        if main and f.exists():
            set_aside(f, f"unreadable ({type(e).__name__})", log, then)
        return False, None


def resume_tensors(f: Path, shapes: dict[str, tuple], log=print) -> dict | None:
    """The tensors of a safetensors file a stage saved to resume with (a cache), if whole and of the ``shapes``
    expected; None if absent, or not whole (then set aside: the stage computes them again)."""
    from safetensors.torch import load_file

    if not f.exists():
        return None
    why = safetensors_problem(f)
    if not why:
        tensors = load_file(str(f))
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if all(got.get(k) == tuple(s) for k, s in shapes.items()):
            return tensors
        why = f"holds {got}, expected {shapes}"
    set_aside(f, why, log)
    return None
