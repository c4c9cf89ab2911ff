"""Unpaired rows for KTO: a prompt, one completion and a ``label`` (true: desirable, false: undesirable).

Accepted per row (shapes may mix in one file):

* ``{"prompt", "completion", "label"}`` -- the prompt a string or a list of messages, the completion a string or
  one assistant message; or ``{"messages", "label"}`` whose last message is the assistant's completion;
* a preference pair (any shape :func:`deltalign.data.formats.preference_examples` reads, HH-style included),
  split into one desirable row (``chosen``) and one undesirable row (``rejected``) with the same prompt.

A row that is neither (no ``label``, or a label that is not ``true``/``false``) is a :class:`DataError` naming
file, row and field, under the stage's ``bad_rows`` rule like every other bad row.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltalign.data.formats import SFTExample, _pref_row, _sft_row
from deltalign.data.rows import DataError, Log, check_bad_rows, has, skip_or_raise, where
from deltalign.data.tokenize import tokenize_sft

KTO_SHAPES = ("'prompt' + 'completion' + 'label' (true/false), or 'messages' + 'label'; or a preference pair "
              "('prompt'/'chosen'/'rejected', HH-style dialogues), split into a desirable and an undesirable row")


@dataclass
class UnpairedExample(SFTExample):
    """An :class:`SFTExample` with its label: ``desirable`` true for a thumbs-up completion."""

    desirable: bool = True


def unpaired_examples(rows: list[dict], source: str, bad_rows: str = "error",
                      log: Log | None = None) -> list[UnpairedExample]:
    """Validate rows into :class:`UnpairedExample` (pairs give two each, in the order chosen, rejected); bad rows
    raise or are skipped per ``bad_rows``. Every example's ``row`` is its row in the source."""
    check_bad_rows(bad_rows)
    out: list[UnpairedExample] = []
    for i, row in enumerate(rows):
        try:
            out += _unpaired_row(row, source, i)
        except DataError as e:
            skip_or_raise(e, bad_rows, log)
    if rows and not out:
        raise DataError(f"every row is bad ({len(rows)} skipped)", source)
    return out


def _unpaired_row(row: dict, source: str, i: int) -> list[UnpairedExample]:
    loc = where(source, i)
    if any(has(row, k) for k in ("chosen", "rejected")):
        pair = _pref_row(row, loc)
        return [UnpairedExample(pair.prompt, text, pair.conversational, desirable=good, extra=pair.extra, row=i)
                for text, good in ((pair.chosen, True), (pair.rejected, False))]
    if "label" not in row or row["label"] is None:
        raise DataError(f"missing field (KTO rows: {KTO_SHAPES})", loc, "label")
    if not isinstance(row["label"], bool):
        raise DataError(f"expected true or false, got {row['label']!r}", loc, "label")
    ex = _sft_row({k: v for k, v in row.items() if k != "label"}, loc)
    return [UnpairedExample(ex.prompt, ex.completion, ex.conversational, extra=ex.extra, prompt_field=ex.prompt_field,
                            desirable=row["label"], row=i)]


def tokenize_unpaired(ex: UnpairedExample, tokenizer, max_length: int, truncation: str = "completion",
                      where: str = "") -> dict | None:
    """:func:`tokenize_sft` plus ``prompt_ids``, ``completion_ids`` and ``desirable``; ``None`` if dropped."""
    item = tokenize_sft(ex, tokenizer, max_length, truncation, where)
    if item is None:
        return None
    n = sum(1 for x in item["labels"] if x == -100)
    return item | {"prompt_ids": item["input_ids"][:n], "completion_ids": item["input_ids"][n:],
                   "desirable": ex.desirable}
