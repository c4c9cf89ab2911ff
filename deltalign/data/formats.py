"""Load rows from files, the embedded set or `datasets`, and validate them into SFT and preference examples.

Every problem is a :class:`DataError` whose message names the source, the 0-based row and the field, e.g.
``data/x.jsonl: row 12: field 'chosen': empty text``. Rows are parsed 1:1 (row ``i`` of :func:`load_rows`
becomes example ``i``), so later stages can name rows with :func:`where` too.

Accepted shapes are listed in :data:`SFT_SHAPES` and :data:`PREF_SHAPES` (also quoted by the errors).
HH-style dialogues are split at the last ``"\\n\\nAssistant:"`` both share; the shared part becomes messages.
Columns a shape does not use are kept in ``extra`` on the example.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path("data/embedded")  # relative to the working directory (the repo root), like tiny.TINY_DIR
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_SFT_KEYS = ("messages", "prompt", "completion")
_PREF_KEYS = ("prompt", "chosen", "rejected", "margin")
SFT_SHAPES = ("'messages' (list of {role, content}, the last one assistant); 'prompt' + 'completion' (strings); "
              "'prompt' (messages) + 'completion' (a string or one assistant message)")
PREF_SHAPES = ("'prompt' + 'chosen' + 'rejected' (strings; or a messages prompt with string or message-list "
               "responses, which may repeat the prompt conversation); 'chosen' + 'rejected' whole conversations "
               "(message lists, or HH-style '\\n\\nHuman: ...\\n\\nAssistant: ...' strings); optional 'margin'")


class DataError(ValueError):
    """A data problem; the message reads ``<source>: row <i>: field '<name>': <what is wrong>``."""

    def __init__(self, message: str, where: str = "", field: str | None = None):
        self.where, self.field, self.detail = where, field, message
        text = message if field is None else f"field {field!r}: {message}"
        super().__init__(f"{where}: {text}" if where else text)


def where(source: str, row: int) -> str:
    """The location prefix used in every message: ``"<source>: row <row>"``."""
    return f"{source}: row {row}"


@dataclass
class SFTExample:
    """One supervised example: loss goes on ``completion`` only.

    ``prompt`` is a list of ``{role, content}`` messages when ``conversational`` else a plain string.
    ``prompt_field`` names the column the prompt came from (for error messages).
    """

    prompt: list[dict] | str
    completion: str
    conversational: bool
    extra: dict = field(default_factory=dict)
    prompt_field: str = "prompt"


@dataclass
class PrefExample:
    """One preference pair: the same ``prompt`` with a ``chosen`` and a ``rejected`` response (plain text)."""

    prompt: list[dict] | str
    chosen: str
    rejected: str
    conversational: bool
    margin: float | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ loading


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Read all rows of ``source`` as dicts.

    ``source`` is a local ``.json`` (a list of objects, or JSON Lines), ``.jsonl`` or ``.parquet`` file;
    ``embedded:<name>`` (``data/embedded/<name>.jsonl``, generated on first use); a directory written by
    ``Dataset.save_to_disk`` (read with ``load_from_disk``; ``split`` picks from a ``DatasetDict``); or anything
    ``datasets.load_dataset(source, split=split)`` accepts (a hub id or a local directory of data files).
    """
    source = str(source)
    if source.startswith(EMBEDDED_PREFIX):
        rows = _read_file(_embedded_path(source[len(EMBEDDED_PREFIX):]))
    else:
        path = Path(source)
        if path.is_file():
            rows = _read_file(path)
        elif path.suffix.lower() in (".json", ".jsonl", ".parquet"):
            raise DataError("file not found", source)
        else:
            rows = _read_datasets(source, split)
    if not rows:
        raise DataError("no rows (empty data set)", source)
    return rows


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"cannot read parquet: {e}", str(path)) from e
        return rows
    if suffix not in (".json", ".jsonl"):
        raise DataError("unsupported file type; use .json, .jsonl, .parquet, embedded:<name> or a datasets id/dir",
                        str(path))
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", str(path)) from e
        return _check_objects(rows, str(path))
    rows = []  # JSON Lines (also a .json file that is not a list)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON on line {lineno}: {e.msg}", where(str(path), len(rows))) from e
    return _check_objects(rows, str(path))


def _check_objects(rows: Any, source: str) -> list[dict]:
    if not isinstance(rows, list):
        raise DataError(f"expected a list of objects, got {type(rows).__name__}", source)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", where(source, i))
    return rows


def _embedded_path(name: str) -> Path:
    """Path of an embedded split, generating the whole embedded set first if that file is missing."""
    path = EMBEDDED_DIR / f"{name}.jsonl"
    if not path.is_file():
        from deltalign.data import embedded  # lazy: only embedded: sources need it

        tmp = EMBEDDED_DIR.with_name(f"{EMBEDDED_DIR.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        embedded.write(tmp)
        EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():  # per-file atomic: concurrent readers never see half a file
            os.replace(f, EMBEDDED_DIR / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
    if not path.is_file():
        names = sorted(p.stem for p in EMBEDDED_DIR.glob("*.jsonl"))
        raise DataError(f"no embedded split {name!r}; available: {names}", f"{EMBEDDED_PREFIX}{name}")
    return path


def _read_datasets(source: str, split: str) -> list[dict]:
    """A ``save_to_disk`` directory via ``load_from_disk``; anything else via ``load_dataset``."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"no split {split!r}; available: {sorted(ds)}", source)
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # hub/network/builder errors come in many types
        kind = "local data set" if path.exists() else "not a local file or directory; as a datasets id"
        raise DataError(f"{kind}: cannot load split {split!r}: {type(e).__name__}: {e}", source) from e
    return ds.to_list()


# --------------------------------------------------------------------------------------------- validation


def _has(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def _extra(row: dict, used: tuple[str, ...], known: tuple[str, ...]) -> dict:
    """Columns the shape did not use; known shape columns that are merely null (mixed schemas) are left out."""
    return {k: v for k, v in row.items() if k not in used and not (k in known and v is None)}


def _text(value: Any, loc: str, fld: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", loc, fld)
    if not value.strip():
        raise DataError("empty text", loc, fld)
    return value


def _messages(value: Any, loc: str, fld: str) -> list[dict]:
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
        out.append({"role": m["role"], "content": _text(m["content"], loc, f"{f}.content")})
    return out


def _required(row: dict, keys: tuple[str, ...], loc: str) -> None:
    for k in keys:
        if not _has(row, k):
            raise DataError("missing field", loc, k)


def _response(value: Any, loc: str, fld: str) -> tuple[list[dict], str]:
    """A response given as a string or as messages ending with the assistant one: ``(context, text)``."""
    if isinstance(value, str):
        return [], _text(value, loc, fld)
    if not isinstance(value, list):
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", loc, fld)
    msgs = _messages(value, loc, fld)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"the last message must be the assistant response, got role {msgs[-1]['role']!r}",
                        loc, fld)
    return msgs[:-1], msgs[-1]["content"]


def sft_examples(rows: list[dict], source: str) -> list[SFTExample]:
    """Validate rows into :class:`SFTExample` (row ``i`` -> example ``i``); raises :class:`DataError`."""
    return [_sft_row(row, where(source, i)) for i, row in enumerate(rows)]


def _sft_row(row: dict, loc: str) -> SFTExample:
    if _has(row, "messages"):
        msgs = _messages(row["messages"], loc, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"the last message must be the assistant completion, got role {msgs[-1]['role']!r}",
                            loc, "messages")
        if len(msgs) < 2:
            raise DataError("needs at least one prompt message before the assistant completion", loc, "messages")
        return SFTExample(msgs[:-1], msgs[-1]["content"], True, _extra(row, ("messages",), _SFT_KEYS), "messages")
    if _has(row, "prompt") or _has(row, "completion"):
        _required(row, ("prompt", "completion"), loc)
        extra = _extra(row, ("prompt", "completion"), _SFT_KEYS)
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            return SFTExample(_text(prompt, loc, "prompt"), _text(completion, loc, "completion"), False, extra)
        if isinstance(prompt, list):
            context, text = _response(completion, loc, "completion")
            if context:
                raise DataError("expected one assistant message (the prompt goes in 'prompt')", loc, "completion")
            return SFTExample(_messages(prompt, loc, "prompt"), text, True, extra)
        raise DataError(f"expected a string or a list of messages, got {type(prompt).__name__}", loc, "prompt")
    raise DataError(f"unrecognised row shape (columns {sorted(row)}); accepted SFT shapes: {SFT_SHAPES}", loc)


def preference_examples(rows: list[dict], source: str) -> list[PrefExample]:
    """Validate rows into :class:`PrefExample` (row ``i`` -> example ``i``); raises :class:`DataError`."""
    return [_pref_row(row, where(source, i)) for i, row in enumerate(rows)]


def _pref_row(row: dict, loc: str) -> PrefExample:
    if not any(_has(row, k) for k in ("prompt", "chosen", "rejected")):
        raise DataError(f"unrecognised row shape (columns {sorted(row)}); accepted preference shapes: {PREF_SHAPES}",
                        loc)
    _required(row, ("chosen", "rejected"), loc)
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(f"expected a finite number, got {margin!r}", loc, "margin")
        margin = float(margin)
    extra = _extra(row, ("prompt", "chosen", "rejected", "margin"), _PREF_KEYS)
    raw_c, raw_r = row["chosen"], row["rejected"]
    if not _has(row, "prompt") and isinstance(raw_c, str) and isinstance(raw_r, str):
        prompt, chosen, rejected = _split_hh(_text(raw_c, loc, "chosen"), _text(raw_r, loc, "rejected"), loc)
        conversational = True
    else:
        ctx_c, chosen = _response(raw_c, loc, "chosen")
        ctx_r, rejected = _response(raw_r, loc, "rejected")
        if ctx_c and ctx_r and ctx_c != ctx_r:
            raise DataError("the conversation before the final assistant message differs from 'chosen'",
                            loc, "rejected")
        any_list = isinstance(raw_c, list) or isinstance(raw_r, list)
        prompt, conversational = _pref_prompt(row.get("prompt"), ctx_c or ctx_r, any_list, loc)
    if chosen.strip() == rejected.strip():
        raise DataError("identical to 'rejected'", loc, "chosen")
    return PrefExample(prompt, chosen, rejected, conversational, margin, extra)


def prompt_examples(rows: list[dict], source: str) -> list[SFTExample | PrefExample]:
    """Prompts to generate from (PPO rollouts): prompt-only rows (``prompt``: a string or messages), or any SFT or
    preference row, whose responses are validated but not used. Each result has ``prompt`` and ``conversational``."""
    out: list[SFTExample | PrefExample] = []
    for i, row in enumerate(rows):
        loc = where(source, i)
        if any(_has(row, k) for k in ("chosen", "rejected")):
            out.append(_pref_row(row, loc))
        elif any(_has(row, k) for k in ("messages", "completion")):
            out.append(_sft_row(row, loc))
        elif _has(row, "prompt"):
            p = row["prompt"]
            prompt = _messages(p, loc, "prompt") if isinstance(p, list) else _text(p, loc, "prompt")
            out.append(SFTExample(prompt, "", isinstance(p, list), _extra(row, ("prompt",), _SFT_KEYS)))
        else:
            raise DataError(f"no prompt (columns {sorted(row)}); give 'prompt', or an SFT or preference row", loc)
    return out


def _pref_prompt(value: Any, ctx: list[dict], any_list: bool, loc: str) -> tuple[list[dict] | str, bool]:
    """The prompt from the ``prompt`` column and/or the conversation the responses repeat (``ctx``)."""
    if value is None:
        if not ctx:
            raise DataError("missing field (and 'chosen'/'rejected' hold no prompt conversation)", loc, "prompt")
        return ctx, True
    if isinstance(value, list):
        prompt = _messages(value, loc, "prompt")
        if ctx and ctx != prompt:
            raise DataError("the conversation before the final assistant message differs from 'prompt'",
                            loc, "chosen")
        return prompt, True
    text = _text(value, loc, "prompt")
    if ctx:  # UltraFeedback: a string prompt, and responses that repeat it as the last user message
        if ctx[-1]["role"] != "user" or ctx[-1]["content"].strip() != text.strip():
            raise DataError("does not match the last user message of the 'chosen' conversation", loc, "prompt")
        return ctx, True
    return ([{"role": "user", "content": text}], True) if any_list else (text, False)


def _split_hh(chosen: str, rejected: str, loc: str) -> tuple[list[dict], str, str]:
    """Split HH-style dialogues at the last ``"\\n\\nAssistant:"`` they share; the shared part becomes messages."""
    common = os.path.commonprefix([chosen, rejected])
    k = common.rfind(HH_ASSISTANT)
    if k < 0:
        raise DataError(f"no shared {HH_ASSISTANT!r} marker in 'chosen' and 'rejected' (HH-style rows without "
                        "'prompt' must be whole '\\n\\nHuman: ...\\n\\nAssistant: ...' dialogues)", loc, "chosen")
    cut = k + len(HH_ASSISTANT)
    responses = []
    for fld, text in (("chosen", chosen), ("rejected", rejected)):
        resp = text[cut:]
        if "\n\nHuman:" in resp or HH_ASSISTANT in resp:
            raise DataError("chosen and rejected differ before their final assistant turn", loc, fld)
        responses.append(_text(resp.strip(), loc, fld))
    return _hh_messages(chosen[:k], loc), responses[0], responses[1]


def _hh_messages(text: str, loc: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c"`` -> user/assistant/user messages."""
    parts = _HH_TURN.split(text)  # [lead, role, content, role, content, ...]
    msgs = []
    if parts[0].strip():
        msgs.append({"role": "system", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2]):
        role = "user" if role == "Human" else "assistant"
        msgs.append({"role": role, "content": _text(content.strip(), loc, f"chosen ({role} turn {len(msgs)})")})
    if not msgs:
        raise DataError("empty text before the final assistant turn", loc, "chosen")
    return msgs
