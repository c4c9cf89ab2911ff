"""One data source as a stage reads it: rows -> validated examples -> tokenised items, with the counts.

Every stage reads its training and held-out data the same way, under the same rules (``max_length``,
``truncation``, ``bad_rows``), so held-out data never fails where training data would be cut or skipped::

    split = load_split(cfg.data, cfg.split, "pref", tok, cfg.max_length, cfg.truncation, cfg.bad_rows)
    split.items        # tokenised (tokenize_pair / tokenize_sft output); split.examples the validated examples
    split.counts       # {"rows": 600, "skipped": 2, "dropped": 0}: every row is an item, skipped or dropped

``kind`` is ``sft`` (:func:`tokenize_sft`; ``sft_all``: loss on every assistant turn), ``pref`` (:func:`tokenize_pair`) or ``prompt`` (examples only: prompt
stages tokenise prompts themselves). An empty ``source`` gives an empty split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from deltalign.data.formats import load_rows, preference_examples, prompt_examples, sft_examples
from deltalign.data.unpaired import tokenize_unpaired, unpaired_examples
from deltalign.data.rows import Log
from deltalign.data.sharing import PrefixSharing
from deltalign.data.tokenize import tokenize_all, tokenize_pair, tokenize_sft
from deltalign.core.settings import setting

BUILDERS = {"sft": (sft_examples, tokenize_sft), "sft_all": (sft_examples, partial(tokenize_sft, loss_on="all")),
            "pref": (preference_examples, tokenize_pair),
            "prompt": (prompt_examples, None), "kto": (unpaired_examples, tokenize_unpaired)}


@dataclass
class Sources:
    """Where a stage's rows come from, training and held-out (every stage with data inherits these settings; the
    row shapes each reads are its module's ``READS``, checked before the run)."""

    data: str = "embedded:pref_train"
    """Training rows: a .json/.jsonl/.parquet file, ``embedded:<split>``, or a `datasets` id. sft and compose
    (``method: gates``): demonstrations (``messages``, or ``prompt``/``completion``); rm, dpo: preference pairs
    (prompt/chosen/rejected, plain or conversational, or HH-style); kto: unpaired rows (prompt/completion/label)
    or pairs (each split into a desirable and an undesirable row); ppo, grpo: prompts (any of these shapes, the
    responses ignored)."""
    eval_data: str = "embedded:pref_eval"
    """Held-out rows in the same shapes ('' to skip held-out evaluation): prompts the trained delta answers after
    training (checker, KL, reward-model scores), and the held-out loss (sft, compose) or reward accuracy (rm, dpo)."""
    split: str = "train"
    """Split to read when ``data`` is a `datasets` id."""


@dataclass
class RowRules(Sources, PrefixSharing):
    """How a stage reads its rows, training and held-out alike (a stage's Config inherits these settings)."""

    max_length: int = setting(256, ge=2)
    """Maximum tokens per row: prompt + completion (for a pair, prompt + the longer response)."""
    truncation: Literal["completion", "keep_end", "drop", "error"] = "completion"
    """Too-long rows (training and held-out alike): ``completion`` (cut the response; a prompt that alone fills
    max_length is a bad row), ``keep_end`` (keep the end of a long prompt, then cut the response: never fails),
    ``drop`` (leave the row out, counted) or ``error`` (a bad row)."""
    bad_rows: Literal["error", "skip"] = "error"
    """A row with a problem of its own (missing or empty field, HH dialogues that differ before the last
    assistant turn, a prompt that cannot fit): ``error`` stops the stage naming file/row/field; ``skip`` leaves it
    out with one log line naming it, and counts it in the metrics (``data.*.skipped``)."""
    def read(self, source: str, split: str, kind: str, tokenizer) -> "Split":
        """:func:`load_split` under these rules."""
        return load_split(source, split, kind, tokenizer, self.max_length, self.truncation, self.bad_rows)


@dataclass
class Split:
    examples: list = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"rows": 0, "skipped": 0, "dropped": 0})


def load_split(source: str, split: str, kind: str, tokenizer=None, max_length: int = 0,
               truncation: str = "completion", bad_rows: str = "error", log: Log | None = None) -> Split:
    """Read, validate and (for ``sft``/``pref``) tokenise one source; see the module docstring."""
    if not source:
        return Split()
    return from_rows(load_rows(source, split), source, kind, tokenizer, max_length, truncation, bad_rows, log)


def from_rows(rows: list[dict], source: str, kind: str, tokenizer=None, max_length: int = 0,
              truncation: str = "completion", bad_rows: str = "error", log: Log | None = None) -> Split:
    """:func:`load_split` of rows already read (``source`` names them in messages)."""
    build, tokenize = BUILDERS[kind]
    examples = build(rows, source, bad_rows, log)
    items, dropped = [], 0
    if tokenize is not None:
        items, dropped = tokenize_all(examples, tokenize, tokenizer, max_length, source, truncation, bad_rows, log)
    kept = len(items) + dropped if tokenize is not None else len(examples)
    return Split(examples, items, {"rows": len(rows), "skipped": len(rows) - kept, "dropped": dropped})
