"""Tokenise examples into ids with completion-only labels.

Conversational prompts are rendered with the tokenizer's chat template (with the generation prompt); the
response is what the template appends for an assistant turn, i.e. ``content`` plus the end-of-turn text
(``"<|im_end|>\\n"`` for ChatML). It is derived by rendering prompt + assistant message and taking the part
after the rendered prompt, so it works for any prefix-stable template. Plain-text examples are
``prompt + completion + eos`` with no bos (keep it simple: the same on training and generation).

Rendered strings are tokenised with ``add_special_tokens=False`` (templates already contain their specials);
prompt and response are tokenised separately, exactly as generation sees the prompt. Labels are ``-100`` on
prompt tokens only, chosen by position, never by token id: the end-of-turn / eos token is always labelled,
even when ``pad_token == eos_token``.

Truncation, when prompt + response is longer than ``max_length`` (:data:`TRUNCATION`; for a pair, the longer
response counts and both share one prompt):

- ``"completion"``: the response is cut from the right (a cut response has no end-of-turn, as it did not end);
  a prompt that alone leaves no room (``>= max_length`` tokens) is a bad row.
- ``"keep_end"`` (TRL's ``keep_end``): the prompt is cut from the left to its last
  ``max(max_length - len(response), max_length // 2)`` tokens (a shorter prompt stays whole), then the response
  is cut from the right to fill the rest. Never fails; the cut is on tokens, so a cut chat prompt may lose its
  first turns and their template text.
- ``"drop"``: the example is left out (``None``; counted by :func:`tokenize_all`), too-long prompts too.
- ``"error"``: a bad row (prompt and response alike).

A bad row raises :class:`DataError` naming source/row/field, or under ``bad_rows="skip"`` (:mod:`deltalign.data.rows`)
:func:`tokenize_all` leaves it out with one log line. Tokenizer problems (no chat template, no eos, a template that
is not prefix-stable) are :class:`TokenizerError` and always raise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from deltalign.data.formats import PrefExample, SFTExample
from deltalign.data.rows import DataError, Log, check_bad_rows, skip_or_raise, where as _where

TRUNCATION = ("completion", "keep_end", "drop", "error")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer and give it a pad token distinct from EOS, so EOS is never masked as padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        spare = [t for t in (tok.unk_token, "<|endoftext|>", "<pad>") if t in vocab and vocab[t] != tok.eos_token_id]
        if not spare:
            raise ValueError(f"{path}: tokenizer has pad == eos and no spare special token to pad with")
        tok.pad_token = spare[0]
    return tok


class TokenizerError(DataError):
    """The tokenizer cannot render this data (not a problem of the row): never skipped as a bad row."""


def _encode(text: str, tokenizer) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _need_template(tokenizer, loc: str, fld: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("conversational data needs a tokenizer with a chat_template, and this one has none",
                             loc, fld)


def render_prompt(prompt: list[dict] | str, tokenizer, conversational: bool, where: str = "",
                  field: str = "prompt") -> str:
    """The prompt as text: the chat template with the generation prompt, or the plain string itself."""
    if not conversational:
        return prompt
    _need_template(tokenizer, where, field)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def tokenize_prompt(prompt: list[dict] | str, tokenizer, conversational: bool) -> list[int]:
    """Prompt ids for generation (conversational prompts end with the assistant generation prompt)."""
    return _encode(render_prompt(prompt, tokenizer, conversational), tokenizer)


def _response_ids(prompt, rendered_prompt: str, response: str, tokenizer, conversational: bool, loc: str,
                  fld: str) -> list[int]:
    """Ids of the response including its end-of-turn (conversational) or eos (plain)."""
    if not conversational:
        if tokenizer.eos_token_id is None:
            raise TokenizerError("plain-text data needs a tokenizer with an eos token", loc, fld)
        return _encode(response, tokenizer) + [tokenizer.eos_token_id]
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                         add_generation_prompt=False, tokenize=False)
    if not full.startswith(rendered_prompt):
        raise TokenizerError("the chat template is not prefix-stable: rendering prompt + assistant message does "
                             "not start with the rendered prompt (with generation prompt), so the completion cannot "
                             "be separated from the prompt", loc, fld)
    return _encode(full[len(rendered_prompt):], tokenizer)


def _fit(prompt: list[int], responses: list[list[int]], max_length: int, truncation: str, loc: str,
         prompt_field: str, response_fields: list[str]) -> tuple[list[int], list[list[int]]] | None:
    """Apply the truncation policy to a prompt and its responses; None means "drop the example"."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    n = len(prompt)
    if truncation == "keep_end":
        keep = min(n, max(max_length - max(map(len, responses)), max_length // 2))
        return prompt[n - keep:], [r[: max_length - keep] for r in responses]
    if n >= max_length:
        if truncation == "drop":
            return None
        raise DataError(f"prompt has {n} tokens, max_length is {max_length} (truncation 'keep_end' keeps its end)",
                        loc, prompt_field)
    for fld, r in zip(response_fields, responses):
        if n + len(r) > max_length:
            if truncation == "drop":
                return None
            if truncation == "error":
                raise DataError(f"prompt + response has {n + len(r)} tokens, max_length is {max_length} (use "
                                "truncation 'completion', 'keep_end' or 'drop')", loc, fld)
    return prompt, [r[: max_length - n] for r in responses]


LOSS_ON = ("last", "all")


def tokenize_sft(ex: SFTExample, tokenizer, max_length: int, truncation: str = "completion",
                 where: str = "", loss_on: str = "last") -> dict | None:
    """``{"input_ids", "labels"}`` with ``labels == -100`` on the prompt; ``None`` if dropped.

    ``loss_on="all"`` labels every assistant turn of a conversational prompt too (each turn's text as the template
    renders it, end-of-turn included); ``"last"`` only the completion. ``where`` (``"<source>: row <i>"``) prefixes
    error messages.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    pf = ex.prompt_field
    rendered = render_prompt(ex.prompt, tokenizer, ex.conversational, where, pf)
    fld = pf if pf in ("messages", "chosen") else "completion"
    completion = _response_ids(ex.prompt, rendered, ex.completion, tokenizer, ex.conversational, where, fld)
    if loss_on == "all" and ex.conversational:
        prompt_ids, prompt_labels = _assistant_turns(ex.prompt, rendered, tokenizer, where, pf)
    else:
        prompt_ids = _encode(rendered, tokenizer)
        prompt_labels = [-100] * len(prompt_ids)
    fit = _fit(prompt_ids, [completion], max_length, truncation, where, pf, [fld])
    if fit is None:
        return None
    kept, (completion,) = fit
    return {"input_ids": kept + completion, "labels": prompt_labels[len(prompt_ids) - len(kept):] + completion}


def _assistant_turns(msgs: list[dict], rendered: str, tokenizer, loc: str, fld: str) -> tuple[list[int], list[int]]:
    """Ids of the rendered prompt, and labels that are the ids on its assistant turns and -100 elsewhere: each turn
    is the text that rendering ``msgs[:i + 1]`` adds to ``msgs[:i]`` with the generation prompt."""
    cuts = []  # (start, end) of each assistant turn in ``rendered``
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i == 0:
            continue
        before = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=False)
        upto = tokenizer.apply_chat_template(msgs[:i + 1], add_generation_prompt=False, tokenize=False)
        if not (upto.startswith(before) and rendered.startswith(upto)):
            raise TokenizerError("the chat template is not prefix-stable, so the assistant turns cannot be labelled "
                                 "apart (use loss_on: last)", loc, fld)
        cuts.append((len(before), len(upto)))
    ids, labels, pos = [], [], 0
    for start, end in cuts + [(len(rendered), len(rendered))]:
        plain, turn = _encode(rendered[pos:start], tokenizer), _encode(rendered[start:end], tokenizer)
        ids += plain + turn
        labels += [-100] * len(plain) + turn
        pos = end
    return ids, labels


def tokenize_pair(ex: PrefExample, tokenizer, max_length: int, truncation: str = "completion",
                  where: str = "") -> dict | None:
    """``{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}``; responses end with end-of-turn/eos.

    The prompt is rendered once; ``max_length`` bounds prompt + each response. ``None`` if dropped.
    """
    rendered = render_prompt(ex.prompt, tokenizer, ex.conversational, where, "prompt")
    fields = ["chosen", "rejected"]
    responses = [_response_ids(ex.prompt, rendered, text, tokenizer, ex.conversational, where, fld)
                 for fld, text in zip(fields, (ex.chosen, ex.rejected))]
    fit = _fit(_encode(rendered, tokenizer), responses, max_length, truncation, where, "prompt", fields)
    if fit is None:
        return None
    prompt_ids, (chosen, rejected) = fit
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "margin": ex.margin}


def tokenize_all(examples: list, fn: Callable, tokenizer, max_length: int, source: str,
                 truncation: str = "completion", bad_rows: str = "error",
                 log: Log | None = None) -> tuple[list[dict], int]:
    """Run ``fn`` (:func:`tokenize_sft` or :func:`tokenize_pair`) on every example; returns ``(items, n_dropped)``.

    Errors name the example's source row (``ex.row``; its index when unset). ``n_dropped`` counts truncation
    ``"drop"``; bad rows follow ``bad_rows`` (skipped ones are logged, not counted), so after the builders every
    source row is an item, dropped, or skipped: ``n_skipped = len(rows) - len(items) - n_dropped``.
    Raises :class:`DataError` if rows were skipped and none is left.
    """
    check_bad_rows(bad_rows)
    items, dropped, skipped = [], 0, 0
    for i, ex in enumerate(examples):
        loc = _where(source, i if ex.row is None else ex.row)
        try:
            item = fn(ex, tokenizer, max_length, truncation, loc)
        except TokenizerError:
            raise
        except DataError as e:
            skip_or_raise(e, bad_rows, log)
            skipped += 1
            continue
        if item is None:
            dropped += 1
        else:
            items.append(item)
    if skipped and not items:
        raise DataError(f"no usable rows: {skipped} bad, {dropped} dropped by truncation {truncation!r}", source)
    return items, dropped
