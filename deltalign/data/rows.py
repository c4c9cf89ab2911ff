"""Checking one row: the error that names source/row/field, the field validators, and the ``bad_rows`` policy.

A *bad row* is one whose problem is its own: a missing, empty or mistyped field, HH dialogues that differ before
the last assistant turn, an empty final response, a prompt that cannot fit ``max_length``. ``bad_rows``
(:data:`BAD_ROWS`) decides what it does: ``"error"`` (default) raises its :class:`DataError`; ``"skip"`` leaves
it out and passes ONE line naming it to ``log`` (default :func:`log_stderr`)::

    skipped bad row: data/hh.jsonl: row 12: field 'chosen': chosen and rejected differ before their final ...

Problems of a whole source (unreadable, not JSON, no rows, every row bad) or of the tokenizer always raise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

ROLES = ("system", "user", "assistant")
BAD_ROWS = ("error", "skip")
Log = Callable[[str], None]


class DataError(ValueError):
    """A data problem; the message reads ``<source>: row <i>: field '<name>': <what is wrong>``."""

    def __init__(self, message: str, where: str = "", field: str | None = None):
        self.where, self.field, self.detail = where, field, message
        text = message if field is None else f"field {field!r}: {message}"
        super().__init__(f"{where}: {text}" if where else text)


def read_utf8(path: str | Path) -> str:
    """A text file's content (a UTF-8 BOM dropped); a byte that is not UTF-8 raises :class:`DataError` naming the
    file and its row (the row counts non-empty lines from 0, as the JSON Lines rows do) and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        before = data[:e.start].split(b"\n")
        row = sum(1 for ln in before[:-1] if ln.strip())
        raise DataError(f"byte 0x{data[e.start]:02x} at line {len(before)} column {len(before[-1]) + 1} is not "
                        "UTF-8 (save the file as UTF-8)", where(str(path), row)) from None


def where(source: str, row: int) -> str:
    """The location prefix used in every message: ``"<source>: row <row>"``."""
    return f"{source}: row {row}"


# ------------------------------------------------------------------------------------------- bad_rows


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_bad_rows(bad_rows: str) -> None:
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")


def skip_or_raise(error: DataError, bad_rows: str, log: Log | None) -> None:
    """Under ``"error"`` raise ``error``; under ``"skip"`` log it as one line (the caller leaves the row out)."""
    if bad_rows != "skip":
        raise error
    (log or log_stderr)(f"skipped bad row: {error}")


def parse_rows(rows: list[dict], source: str, parse: Callable[[dict, str], Any], bad_rows: str,
               log: Log | None) -> list:
    """``parse(row, where(source, i))`` for every row, each result's ``row`` set to ``i``; bad rows per ``bad_rows``.

    Raises :class:`DataError` when there are rows and every one of them is bad.
    """
    check_bad_rows(bad_rows)
    out = []
    for i, row in enumerate(rows):
        try:
            ex = parse(row, where(source, i))
        except DataError as e:
            skip_or_raise(e, bad_rows, log)
            continue
        ex.row = i
        out.append(ex)
    if rows and not out:
        raise DataError(f"every row is bad ({len(rows)} skipped)", source)
    return out


# ---------------------------------------------------------------------------------------- field checks


def has(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def extra_columns(row: dict, used: tuple[str, ...], known: tuple[str, ...]) -> dict:
    """Columns the shape did not use; known shape columns that are merely null (mixed schemas) are left out."""
    return {k: v for k, v in row.items() if k not in used and not (k in known and v is None)}


def require(row: dict, keys: tuple[str, ...], loc: str) -> None:
    for k in keys:
        if not has(row, k):
            raise DataError("missing field", loc, k)


def check_text(value: Any, loc: str, fld: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", loc, fld)
    if not value.strip():
        raise DataError("empty text", loc, fld)
    return value


def check_messages(value: Any, loc: str, fld: str) -> list[dict]:
    """Validate a list of ``{role, content}`` messages; returns copies holding only role and content."""
    if not isinstance(value, list):
        raise DataError(f"expected a list of {{role, content}} messages, got {type(value).__name__}", loc, fld)
    if not value:
        raise DataError("empty list of messages", loc, fld)
    out = []
    for j, m in enumerate(value):
        f = f"{fld}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"expected a {{role, content}} object, got {type(m).__name__}", loc, f)
        for key in ("role", "content"):
            if m.get(key) is None:
                raise DataError("missing field", loc, f"{f}.{key}")
        if m["role"] not in ROLES:
            raise DataError(f"unknown role {m['role']!r}; expected one of {list(ROLES)}", loc, f"{f}.role")
        out.append({"role": m["role"], "content": check_text(m["content"], loc, f"{f}.content")})
    return out


def check_response(value: Any, loc: str, fld: str) -> tuple[list[dict], str]:
    """A response given as a string or as messages ending with the assistant one: ``(context, text)``."""
    if isinstance(value, str):
        return [], check_text(value, loc, fld)
    if not isinstance(value, list):
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", loc, fld)
    msgs = check_messages(value, loc, fld)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"the last message must be the assistant response, got role {msgs[-1]['role']!r}",
                        loc, fld)
    return msgs[:-1], msgs[-1]["content"]
