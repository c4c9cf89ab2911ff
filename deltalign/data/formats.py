"""Load rows from files, the embedded set or `datasets`, and validate them into SFT and preference examples.

Every problem is a :class:`DataError` whose message names the source, the 0-based row and the field, e.g.
``data/x.jsonl: row 12: field 'chosen': empty text``. Every example carries ``row``, its row in the source, so
later stages name rows with :func:`where` too.

Bad rows (see :mod:`deltalign.data.rows`): the builders take ``bad_rows="error"`` (the first bad row raises) or
``"skip"`` (each bad row is left out with one line to ``log``, stderr by default). They return the list of
examples; the number skipped is ``len(rows) - len(examples)``. A source whose rows are all bad still raises.

Accepted shapes are listed in :data:`SFT_SHAPES` and :data:`PREF_SHAPES` (also quoted by the errors).
HH-style dialogues are split by :mod:`deltalign.data.hh`. Columns a shape does not use are kept in ``extra``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltalign.data.hh import hh_dialogue, split_hh
from deltalign.data.rows import (DataError, Log, check_messages, check_response, check_text, extra_columns, has,
                                 parse_rows, read_utf8, require, where)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path("data/embedded")  # relative to the working directory (the repo root), like tiny.TINY_DIR
_SFT_KEYS = ("messages", "prompt", "completion")
_PREF_KEYS = ("prompt", "chosen", "rejected", "margin")
SFT_SHAPES = ("'messages' (list of {role, content}, the last one assistant); 'prompt' + 'completion' (strings); "
              "'prompt' (messages) + 'completion' (a string or one assistant message); 'chosen' (a preference row: "
              "an HH-style '\\n\\nHuman: ...\\n\\nAssistant: ...' dialogue or a message list, trained on as a "
              "conversation; 'rejected' is ignored)")
PREF_SHAPES = ("'prompt' + 'chosen' + 'rejected' (strings; or a messages prompt with string or message-list "
               "responses, which may repeat the prompt conversation); 'chosen' + 'rejected' whole conversations "
               "(message lists, or HH-style '\\n\\nHuman: ...\\n\\nAssistant: ...' strings); optional 'margin'")


@dataclass
class SFTExample:
    """One supervised example: loss goes on ``completion`` only.

    ``prompt`` is a list of ``{role, content}`` messages when ``conversational`` else a plain string.
    ``prompt_field`` names the column the prompt came from (for error messages); ``row`` is the source row.
    """

    prompt: list[dict] | str
    completion: str
    conversational: bool
    extra: dict = field(default_factory=dict)
    prompt_field: str = "prompt"
    row: int | None = None


@dataclass
class PrefExample:
    """One preference pair: the same ``prompt`` with a ``chosen`` and a ``rejected`` response (plain text)."""

    prompt: list[dict] | str
    chosen: str
    rejected: str
    conversational: bool
    margin: float | None = None
    extra: dict = field(default_factory=dict)
    row: int | None = None


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
    text = read_utf8(path)
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
    """Path of an embedded split, (re)generating the whole embedded set first if that file is missing or was
    generated by other code (:func:`deltalign.data.embedded.materialise`)."""
    from deltalign.data import embedded  # lazy: only embedded: sources need it

    path = embedded.materialise(EMBEDDED_DIR, name)
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


def sft_examples(rows: list[dict], source: str, bad_rows: str = "error", log: Log | None = None) -> list[SFTExample]:
    """Validate rows into :class:`SFTExample`; bad rows raise or are skipped per ``bad_rows`` (module docstring)."""
    return parse_rows(rows, source, _sft_row, bad_rows, log)


def _sft_row(row: dict, loc: str) -> SFTExample:
    if has(row, "messages"):
        msgs = check_messages(row["messages"], loc, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"the last message must be the assistant completion, got role {msgs[-1]['role']!r}",
                            loc, "messages")
        if len(msgs) < 2:
            raise DataError("needs at least one prompt message before the assistant completion", loc, "messages")
        return SFTExample(msgs[:-1], msgs[-1]["content"], True, extra_columns(row, ("messages",), _SFT_KEYS),
                          "messages")
    if has(row, "prompt") or has(row, "completion"):
        require(row, ("prompt", "completion"), loc)
        extra = extra_columns(row, ("prompt", "completion"), _SFT_KEYS)
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            return SFTExample(check_text(prompt, loc, "prompt"), check_text(completion, loc, "completion"), False,
                              extra)
        if isinstance(prompt, list):
            context, text = check_response(completion, loc, "completion")
            if context:
                raise DataError("expected one assistant message (the prompt goes in 'prompt')", loc, "completion")
            return SFTExample(check_messages(prompt, loc, "prompt"), text, True, extra)
        raise DataError(f"expected a string or a list of messages, got {type(prompt).__name__}", loc, "prompt")
    if has(row, "chosen"):  # a preference row (HH-RLHF): SFT on the chosen dialogue, its last turn the completion
        raw = row["chosen"]
        if isinstance(raw, str):
            msgs = hh_dialogue(check_text(raw, loc, "chosen"), loc)
        else:
            msgs = check_messages(raw, loc, "chosen")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DataError("expected a conversation ending with the assistant's answer", loc, "chosen")
        return SFTExample(msgs[:-1], msgs[-1]["content"], True, extra_columns(row, ("chosen",), _SFT_KEYS), "chosen")
    raise DataError(f"unrecognised row shape (columns {sorted(row)}); accepted SFT shapes: {SFT_SHAPES}", loc)


def preference_examples(rows: list[dict], source: str, bad_rows: str = "error",
                        log: Log | None = None) -> list[PrefExample]:
    """Validate rows into :class:`PrefExample`; bad rows raise or are skipped per ``bad_rows`` (module docstring)."""
    return parse_rows(rows, source, _pref_row, bad_rows, log)


def _pref_row(row: dict, loc: str) -> PrefExample:
    if not any(has(row, k) for k in ("prompt", "chosen", "rejected")):
        raise DataError(f"unrecognised row shape (columns {sorted(row)}); accepted preference shapes: {PREF_SHAPES}",
                        loc)
    require(row, ("chosen", "rejected"), loc)
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(f"expected a finite number, got {margin!r}", loc, "margin")
        margin = float(margin)
    extra = extra_columns(row, ("prompt", "chosen", "rejected", "margin"), _PREF_KEYS)
    raw_c, raw_r = row["chosen"], row["rejected"]
    if not has(row, "prompt") and isinstance(raw_c, str) and isinstance(raw_r, str):
        prompt, chosen, rejected = split_hh(check_text(raw_c, loc, "chosen"), check_text(raw_r, loc, "rejected"), loc)
        conversational = True
    else:
        ctx_c, chosen = check_response(raw_c, loc, "chosen")
        ctx_r, rejected = check_response(raw_r, loc, "rejected")
        if ctx_c and ctx_r and ctx_c != ctx_r:
            raise DataError("the conversation before the final assistant message differs from 'chosen'",
                            loc, "rejected")
        any_list = isinstance(raw_c, list) or isinstance(raw_r, list)
        prompt, conversational = _pref_prompt(row.get("prompt"), ctx_c or ctx_r, any_list, loc)
    if chosen.strip() == rejected.strip():
        raise DataError("identical to 'rejected'", loc, "chosen")
    return PrefExample(prompt, chosen, rejected, conversational, margin, extra)


def prompt_examples(rows: list[dict], source: str, bad_rows: str = "error",
                    log: Log | None = None) -> list[SFTExample | PrefExample]:
    """Prompts to generate from (PPO rollouts): prompt-only rows (``prompt``: a string or messages), or any SFT or
    preference row, whose responses are validated but not used. Each result has ``prompt``, ``conversational``
    and ``row``; bad rows raise or are skipped per ``bad_rows`` (module docstring)."""
    return parse_rows(rows, source, _prompt_row, bad_rows, log)


def _prompt_row(row: dict, loc: str) -> SFTExample | PrefExample:
    if any(has(row, k) for k in ("chosen", "rejected")):
        return _pref_row(row, loc)
    if any(has(row, k) for k in ("messages", "completion")):
        return _sft_row(row, loc)
    if has(row, "prompt"):
        p = row["prompt"]
        prompt = check_messages(p, loc, "prompt") if isinstance(p, list) else check_text(p, loc, "prompt")
        return SFTExample(prompt, "", isinstance(p, list), extra_columns(row, ("prompt",), _SFT_KEYS))
    raise DataError(f"no prompt (columns {sorted(row)}); give 'prompt', or an SFT or preference row", loc)


def _pref_prompt(value: Any, ctx: list[dict], any_list: bool, loc: str) -> tuple[list[dict] | str, bool]:
    """The prompt from the ``prompt`` column and/or the conversation the responses repeat (``ctx``)."""
    if value is None:
        if not ctx:
            raise DataError("missing field (and 'chosen'/'rejected' hold no prompt conversation)", loc, "prompt")
        return ctx, True
    if isinstance(value, list):
        prompt = check_messages(value, loc, "prompt")
        if ctx and ctx != prompt:
            raise DataError("the conversation before the final assistant message differs from 'prompt'",
                            loc, "chosen")
        return prompt, True
    text = check_text(value, loc, "prompt")
    if ctx:  # UltraFeedback: a string prompt, and responses that repeat it as the last user message
        if ctx[-1]["role"] != "user" or ctx[-1]["content"].strip() != text.strip():
            raise DataError("does not match the last user message of the 'chosen' conversation", loc, "prompt")
        return ctx, True
    return ([{"role": "user", "content": text}], True) if any_list else (text, False)
