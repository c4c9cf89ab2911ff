"""HH-style dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings) split into a prompt and two responses.

``chosen`` and ``rejected`` are split at the last ``"\\n\\nAssistant:"`` they share; the shared part becomes
user/assistant messages (text before the first turn becomes a system message). Dialogues that differ before
their final assistant turn, or an empty final response, are a :class:`DataError` of the row. A whole dialogue
(an SFT row's ``chosen``) is split by :func:`hh_dialogue` into messages ending with the assistant's answer.
"""

from __future__ import annotations

import os
import re

from deltalign.data.rows import DataError, check_text

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def split_hh(chosen: str, rejected: str, loc: str) -> tuple[list[dict], str, str]:
    """``(prompt messages, chosen response, rejected response)``; ``loc`` prefixes error messages."""
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
        responses.append(check_text(resp.strip(), loc, fld))
    return hh_messages(chosen[:k], loc), responses[0], responses[1]


def hh_messages(text: str, loc: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c"`` -> user/assistant/user messages."""
    parts = _HH_TURN.split(text)  # [lead, role, content, role, content, ...]
    msgs = []
    if parts[0].strip():
        msgs.append({"role": "system", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2]):
        role = "user" if role == "Human" else "assistant"
        msgs.append({"role": role, "content": check_text(content.strip(), loc, f"chosen ({role} turn {len(msgs)})")})
    if not msgs:
        raise DataError("empty text before the final assistant turn", loc, "chosen")
    return msgs


def hh_dialogue(text: str, loc: str, fld: str = "chosen") -> list[dict]:
    """A whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` dialogue -> messages ending with its final assistant
    answer, which must be non-empty (an SFT row trains on it)."""
    k = text.rfind(HH_ASSISTANT)
    if k < 0:
        raise DataError(f"no {HH_ASSISTANT!r} turn (an HH-style row is a whole '\\n\\nHuman: ...\\n\\nAssistant: "
                        "...' dialogue)", loc, fld)
    answer = text[k + len(HH_ASSISTANT):]
    if "\n\nHuman:" in answer:
        raise DataError("the dialogue ends with a human turn, not the assistant's answer", loc, fld)
    if not answer.strip():
        raise DataError("the final assistant answer is empty", loc, fld)
    return hh_messages(text[:k], loc) + [{"role": "assistant", "content": answer.strip()}]
