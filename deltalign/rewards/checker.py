"""Deterministic checker for the verifiable-instruction constraints of the embedded data set.

Each prompt is a question followed by one constraint sentence whose wording is fixed per kind (see
:data:`TEMPLATES`), so the constraint can be recovered from the prompt text alone by :func:`parse_constraint`
and verified by :func:`check`. A constraint is a JSON-able dict: ``{"kind": KIND, **params}``.

====================  =========================================================  ==============================
kind                  prompt sentence                                            satisfied when (``s`` = stripped)
====================  =========================================================  ==============================
``lowercase``         Answer in all lowercase letters.                           ``s == s.lower()``, has a letter
``uppercase``         Answer in all capital letters.                             ``s == s.upper()``, has a letter
``max_words``         Answer in fewer than {n} words.                            ``0 < len(s.split()) < n``
``end_phrase``        End your response with the exact phrase "{phrase}"         ``s.endswith(phrase)`` (exact case)
``include_keyword``   Include the word "{keyword}" in your response.             whole word present, any case
``forbidden_word``    Do not use the word "{word}" in your response.             non-empty, whole word absent
``bullets``           Answer with exactly {k} bullet points, ... "- ".           exactly k lines, all ``"- text"``
``json_key``          Answer in JSON format, as an object with the key "{key}".  ``json.loads(s)[key]`` non-empty str
``start_word``        Start your response with the word "{word}".                first word == word, any case
====================  =========================================================  ==============================

Rules: the only leniency is surrounding whitespace (the response is stripped; bullet lines are stripped too).
A *word* is a whitespace-separated token (``str.split()``). "Whole word" means the text is not directly
preceded or followed by a word character (``\\w``), matched case-insensitively. For ``start_word`` the first
token is compared after stripping ASCII punctuation from its ends (``"Sure!"`` starts with ``Sure``).
Blank lines are ignored for ``bullets``; every other line must start with ``"- "`` followed by text.
"""

from __future__ import annotations

import json
import re
import string

CHECKER_NAME = "constraint-checker-v1"

TEMPLATES: dict[str, str] = {
    "lowercase": "Answer in all lowercase letters.",
    "uppercase": "Answer in all capital letters.",
    "max_words": "Answer in fewer than {n} words.",
    "end_phrase": 'End your response with the exact phrase "{phrase}"',  # no final '.': phrases end in punctuation
    "include_keyword": 'Include the word "{keyword}" in your response.',
    "forbidden_word": 'Do not use the word "{word}" in your response.',
    "bullets": 'Answer with exactly {k} bullet points, each on its own line starting with "- ".',
    "json_key": 'Answer in JSON format, as an object with the key "{key}".',
    "start_word": 'Start your response with the word "{word}".',
}
KINDS: tuple[str, ...] = tuple(TEMPLATES)
_INT_PARAMS = ("n", "k")  # every other parameter is a string without '"' or newlines


def _params(kind: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", TEMPLATES[kind])


def _pattern(template: str) -> re.Pattern:
    """Regex matching a rendered template; parameters become named groups."""
    parts = re.split(r"\{(\w+)\}", template)
    out = [re.escape(p) if i % 2 == 0 else (rf"(?P<{p}>\d+)" if p in _INT_PARAMS else rf'(?P<{p}>[^"\n]+)')
           for i, p in enumerate(parts)]
    return re.compile("".join(out))


_PATTERNS = {kind: _pattern(t) for kind, t in TEMPLATES.items()}


def _validate(constraint) -> tuple[str, dict]:
    """Return ``(kind, params)`` or raise ValueError for an unknown kind or a bad/missing parameter."""
    if not isinstance(constraint, dict) or constraint.get("kind") not in TEMPLATES:
        raise ValueError(f"unknown constraint {constraint!r}; kinds: {list(KINDS)}")
    kind, params = constraint["kind"], {}
    for name in _params(kind):
        v = constraint.get(name)
        if name in _INT_PARAMS:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        else:
            ok = isinstance(v, str) and v.strip() == v and v != "" and '"' not in v and "\n" not in v
        if not ok:
            raise ValueError(f"constraint {constraint!r}: bad or missing parameter {name!r}")
        params[name] = v
    return kind, params


def describe(constraint: dict) -> str:
    """The plain-English sentence stating ``constraint`` (the exact text :func:`parse_constraint` recognises)."""
    kind, params = _validate(constraint)
    return TEMPLATES[kind].format(**params)


def _prompt_text(prompt) -> str:
    """Accept a string, or a list of chat messages (the last user message is used)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise TypeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def parse_constraint(prompt: str) -> dict | None:
    """Recover the constraint stated in ``prompt`` (the last one if several), or None if there is none."""
    text, best = _prompt_text(prompt), None
    for kind, pat in _PATTERNS.items():
        for m in pat.finditer(text):
            if best is None or m.start() > best[0]:
                best = (m.start(), kind, m.groupdict())
    if best is None:
        return None
    _, kind, groups = best
    out = {"kind": kind}
    for name in _params(kind):
        out[name] = int(groups[name]) if name in _INT_PARAMS else groups[name]
    return out


def _has_word(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _ok(kind: str, p: dict, s: str) -> bool:
    if kind == "lowercase":
        return s == s.lower() and any(c.isalpha() for c in s)
    if kind == "uppercase":
        return s == s.upper() and any(c.isalpha() for c in s)
    if kind == "max_words":
        return 0 < len(s.split()) < p["n"]
    if kind == "end_phrase":
        return s.endswith(p["phrase"])
    if kind == "include_keyword":
        return _has_word(p["keyword"], s)
    if kind == "forbidden_word":
        return s != "" and not _has_word(p["word"], s)
    if kind == "bullets":
        lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
        return len(lines) == p["k"] and all(ln.startswith("- ") and ln[2:].strip() for ln in lines)
    if kind == "json_key":
        try:
            obj = json.loads(s)
        except ValueError:
            return False
        return isinstance(obj, dict) and isinstance(obj.get(p["key"]), str) and obj[p["key"]].strip() != ""
    if kind == "start_word":
        words = s.split()
        return bool(words) and words[0].strip(string.punctuation).lower() == p["word"].lower()
    raise AssertionError(kind)  # unreachable: _validate rejects unknown kinds


def check(constraint: dict, response: str) -> float:
    """1.0 if ``response`` satisfies ``constraint`` else 0.0; ValueError for an unknown/malformed constraint."""
    kind, params = _validate(constraint)
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    return 1.0 if _ok(kind, params, response.strip()) else 0.0


def score(prompt: str, response: str) -> float:
    """``check(parse_constraint(prompt), response)``; ValueError naming the prompt if it states no constraint."""
    constraint = parse_constraint(prompt)
    if constraint is None:
        raise ValueError(f"no known constraint in prompt {_prompt_text(prompt)!r}")
    return check(constraint, response)


def score_batch(prompts: list[str], responses: list[str], missing: str = "error") -> list[float | None]:
    """:func:`score` for each (prompt, response) pair; the lists must have the same length. A prompt that states
    no known constraint is an error, or with ``missing="none"`` scores None (your own data, in evaluation)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if missing == "none":
        return [None if parse_constraint(p) is None else score(p, r) for p, r in zip(prompts, responses)]
    return [score(p, r) for p, r in zip(prompts, responses)]
