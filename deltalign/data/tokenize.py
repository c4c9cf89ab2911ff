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

Truncation (prompt + response longer than ``max_length``): ``"completion"`` cuts the response from the right
(a cut response has no end-of-turn, as it did not end); ``"error"`` raises :class:`DataError`; ``"drop"``
returns ``None``. A prompt that alone leaves no room (``>= max_length`` tokens) raises under ``"completion"``
and ``"error"``, and is dropped (``None``) under ``"drop"``.
"""

from __future__ import annotations

from typing import Callable

from deltalign.data.formats import DataError, PrefExample, SFTExample, where as _where

TRUNCATION = ("completion", "error", "drop")


def _encode(text: str, tokenizer) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _need_template(tokenizer, loc: str, fld: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational data needs a tokenizer with a chat_template, and this one has none",
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
            raise DataError("plain-text data needs a tokenizer with an eos token", loc, fld)
        return _encode(response, tokenizer) + [tokenizer.eos_token_id]
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                         add_generation_prompt=False, tokenize=False)
    if not full.startswith(rendered_prompt):
        raise DataError("the chat template is not prefix-stable: rendering prompt + assistant message does not "
                        "start with the rendered prompt (with generation prompt), so the completion cannot be "
                        "separated from the prompt", loc, fld)
    return _encode(full[len(rendered_prompt):], tokenizer)


def _fit(prompt_len: int, response: list[int], max_length: int, truncation: str, loc: str,
         prompt_field: str, response_field: str) -> list[int] | None:
    """Apply the truncation policy to one response; None means "drop the example"."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if prompt_len >= max_length:
        if truncation == "drop":
            return None
        raise DataError(f"prompt has {prompt_len} tokens, max_length is {max_length}", loc, prompt_field)
    if prompt_len + len(response) <= max_length:
        return response
    if truncation == "drop":
        return None
    if truncation == "error":
        raise DataError(f"prompt + response has {prompt_len + len(response)} tokens, max_length is {max_length}"
                        " (use truncation 'completion' or 'drop')", loc, response_field)
    return response[: max_length - prompt_len]


def tokenize_sft(ex: SFTExample, tokenizer, max_length: int, truncation: str = "completion",
                 where: str = "") -> dict | None:
    """``{"input_ids", "labels"}`` with ``labels == -100`` on the prompt; ``None`` if dropped.

    ``where`` (``"<source>: row <i>"``) prefixes error messages.
    """
    pf = ex.prompt_field
    rendered = render_prompt(ex.prompt, tokenizer, ex.conversational, where, pf)
    prompt_ids = _encode(rendered, tokenizer)
    fld = "messages" if pf == "messages" else "completion"
    completion = _response_ids(ex.prompt, rendered, ex.completion, tokenizer, ex.conversational, where, fld)
    completion = _fit(len(prompt_ids), completion, max_length, truncation, where, pf, fld)
    if completion is None:
        return None
    return {"input_ids": prompt_ids + completion, "labels": [-100] * len(prompt_ids) + completion}


def tokenize_pair(ex: PrefExample, tokenizer, max_length: int, truncation: str = "completion",
                  where: str = "") -> dict | None:
    """``{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}``; responses end with end-of-turn/eos.

    The prompt is rendered once; ``max_length`` bounds prompt + each response. ``None`` if dropped.
    """
    rendered = render_prompt(ex.prompt, tokenizer, ex.conversational, where, "prompt")
    prompt_ids = _encode(rendered, tokenizer)
    out = {"prompt_ids": prompt_ids}
    for fld, text in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        ids = _response_ids(ex.prompt, rendered, text, tokenizer, ex.conversational, where, fld)
        ids = _fit(len(prompt_ids), ids, max_length, truncation, where, "prompt", fld)
        if ids is None:
            return None
        out[f"{fld}_ids"] = ids
    out["margin"] = ex.margin
    return out


def tokenize_all(examples: list, fn: Callable, tokenizer, max_length: int, source: str,
                 truncation: str = "completion") -> tuple[list[dict], int]:
    """Run ``fn`` (:func:`tokenize_sft` or :func:`tokenize_pair`) on every example; returns ``(items, n_dropped)``.

    Example ``i`` is row ``i`` of ``source``, so errors name the file and row.
    """
    items, dropped = [], 0
    for i, ex in enumerate(examples):
        item = fn(ex, tokenizer, max_length, truncation, _where(source, i))
        if item is None:
            dropped += 1
        else:
            items.append(item)
    return items, dropped
