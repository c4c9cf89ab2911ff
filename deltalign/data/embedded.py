"""The embedded, license-clean alignment set: verifiable instruction following (like IFEval / Tulu 3 RLVR).

Every prompt is a simple factual question plus one checkable constraint stated in plain English, e.g.
``"What is the capital of France? Answer in all lowercase letters."``. The facts are small hand-written banks
(:mod:`deltalign.data.facts`: capitals, colours, animal sounds, opposites, arithmetic, plurals, day/month order,
basic science); nothing is downloaded. Constraint wording and checking live in :mod:`deltalign.rewards.checker`.

The *chosen* response is the correct answer formatted to satisfy the constraint with one fixed, short pattern
per kind (so a 135M model can learn it); the *rejected* response answers the same question but breaks the
constraint: half the time the natural answer sentence, otherwise a near miss (sentence case instead of
lowercase, a missing "!" in the ending phrase, one bullet too many, the wrong JSON key, ...). Every row is
verified with the checker while it is generated (chosen scores 1, rejected 0).

Facts are split into train and eval by question (stratified by topic, 20% eval), so eval questions are
unseen; kinds are cycled, so every kind appears in every split. Generation depends only on ``seed`` (seeded
``random.Random`` over lists in a fixed order), never on hash randomisation or set order.

Usage: ``python -m deltalign.data.embedded OUT_DIR [--seed S] [--n-train N] [--n-eval N]``. Stages read the set
through :func:`materialise`, which regenerates it whenever this module, the fact banks or the checker changed
since it was written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

from deltalign.data import facts as fact_banks
from deltalign.data.facts import Fact, capitalise, facts
from deltalign.rewards import checker
from deltalign.rewards.checker import KINDS, check, describe

SPLITS = ("sft_train", "sft_eval", "pref_train", "pref_eval")
EVAL_FRACTION = 0.2
STAMP = ".source"  # in a materialised folder: the code_hash() its files were generated from
SOURCES = (sys.modules[__name__], fact_banks, checker)  # the rows' formats, facts and constraint wording


# ------------------------------------------------------------------------------------------------ constraints
_PHRASES = ["Hope this helps!", "That is all.", "Have a nice day!", "Thank you for asking.", "Any other questions?"]
_KEYWORDS = {"fact": "That is a fact.", "true": "This is true.", "simple": "It is simple.", "know": "Now you know.",
             "sure": "I am sure.", "easy": "That was easy.", "learn": "Happy to help you learn."}
_STARTS = {"Sure": "Sure! ", "Okay": "Okay! ", "Certainly": "Certainly! ", "Hello": "Hello! ", "Answer": "Answer: ",
           "Fact": "Fact: ", "Great": "Great question! "}
_JSON_KEYS = ["answer", "response", "result", "reply"]
_STOP = {"the", "and", "for", "from", "are", "has", "our", "there", "what", "which", "does", "how"}


def _bullets(f: Fact, k: int, mark: str = "- ") -> str:
    lines = [f"Answer: {f.short}", f"In a sentence: {f.answer}", f"Topic: {f.topic}", "Difficulty: easy",
             "Checked: yes"]
    return "\n".join(mark + line for line in lines[:k])


def _options(kind: str, f: Fact) -> list[dict]:
    """Every constraint of ``kind`` usable with ``f``: chosen passes and the natural answer fails."""
    words = f.answer.split()
    if kind in ("lowercase", "uppercase"):
        cands = [{"kind": kind}]
    elif kind == "max_words":
        cands = [{"kind": kind, "n": n} for n in range(2, len(words) + 1)]
    elif kind == "end_phrase":
        cands = [{"kind": kind, "phrase": p} for p in _PHRASES]
    elif kind == "include_keyword":
        cands = [{"kind": kind, "keyword": w} for w in _KEYWORDS]
    elif kind == "forbidden_word":
        seen = []  # content words of the answer, in order, without duplicates
        for w in (w.strip(".,!?") for w in words):
            if w.isalpha() and len(w) >= 3 and w.lower() not in _STOP and w.lower() not in [s.lower() for s in seen]:
                seen.append(w)
        cands = [{"kind": kind, "word": w} for w in seen]
    elif kind == "bullets":
        cands = [{"kind": kind, "k": k} for k in (2, 3, 4)]
    elif kind == "json_key":
        cands = [{"kind": kind, "key": key} for key in _JSON_KEYS]
    elif kind == "start_word":
        cands = [{"kind": kind, "word": w} for w in _STARTS]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return [c for c in cands if check(c, _chosen(c, f)) == 1.0 and check(c, f.answer) == 0.0]


def _chosen(c: dict, f: Fact) -> str:
    """The correct answer formatted to satisfy ``c`` (one fixed pattern per kind)."""
    kind = c["kind"]
    if kind == "lowercase":
        return f.answer.lower()
    if kind == "uppercase":
        return f.answer.upper()
    if kind in ("max_words", "forbidden_word"):
        return capitalise(f.short) + "."
    if kind == "end_phrase":
        return f"{f.answer} {c['phrase']}"
    if kind == "include_keyword":
        return f"{f.answer} {_KEYWORDS[c['keyword']]}"
    if kind == "bullets":
        return _bullets(f, c["k"])
    if kind == "json_key":
        return json.dumps({c["key"]: f.answer})
    return _STARTS[c["word"]] + f.answer  # start_word


def _near_misses(c: dict, f: Fact) -> list[str]:
    """Responses that answer correctly and almost satisfy ``c`` (filtered by the checker afterwards)."""
    kind, a, words = c["kind"], f.answer, f.answer.split()
    if kind == "lowercase":
        return [capitalise(a.lower()), a[:1].lower() + a[1:]]
    if kind == "uppercase":
        return [" ".join(words[:-1]).upper() + " " + words[-1], a.title()]
    if kind == "max_words":
        return [f"The answer is {f.short}."]
    if kind == "end_phrase":
        p = c["phrase"]
        return [f"{a} {p[:-1]}", f"{a} {p} Goodbye.", f"{a} {p.lower()}"]
    if kind == "include_keyword":
        return [f"{a} {s}" for w, s in _KEYWORDS.items() if w != c["keyword"]]
    if kind == "forbidden_word":
        return [f"{capitalise(c['word'])}: {capitalise(f.short)}."]
    if kind == "bullets":
        k = c["k"]
        return [_bullets(f, k + 1), _bullets(f, k - 1), _bullets(f, k, mark="* ")]
    if kind == "json_key":
        other = _JSON_KEYS[(_JSON_KEYS.index(c["key"]) + 1) % len(_JSON_KEYS)]
        good = json.dumps({c["key"]: a})
        return [json.dumps({other: a}), f"```json\n{good}\n```", good.replace('"', "'")]
    return [_STARTS[w] + a for w in _STARTS if w != c["word"]]  # start_word


def _item(kind: str, f: Fact, options: list[dict], rng: random.Random) -> dict:
    """One example: prompt, chosen, rejected and constraint, verified with the checker."""
    c = rng.choice(options)
    chosen = _chosen(c, f)
    near = [r for r in _near_misses(c, f) if r.strip() and check(c, r) == 0.0]
    rejected = rng.choice(near) if near and rng.random() < 0.5 else f.answer
    if check(c, chosen) != 1.0 or check(c, rejected) != 0.0:  # cannot happen for the banks above
        raise RuntimeError(f"embedded data bug: {f.question!r} {c!r}")
    return {"prompt": f"{f.question} {describe(c)}", "chosen": chosen, "rejected": rejected, "constraint": c}


def _split_facts(all_facts: list[Fact], rng: random.Random) -> tuple[list[Fact], list[Fact]]:
    """Split by question, stratified by topic: about EVAL_FRACTION of each topic goes to eval."""
    train, held = [], []
    topics = list(dict.fromkeys(f.topic for f in all_facts))  # first-appearance order
    for topic in topics:
        group = [f for f in all_facts if f.topic == topic]
        idx = list(range(len(group)))
        rng.shuffle(idx)
        n_eval = max(1, round(len(group) * EVAL_FRACTION))
        eval_idx = set(idx[:n_eval])
        held += [g for i, g in enumerate(group) if i in eval_idx]
        train += [g for i, g in enumerate(group) if i not in eval_idx]
    return train, held


def _draw(pool: list[Fact], n: int, rng: random.Random) -> list[dict]:
    """``n`` items cycling through the kinds; (question, kind) pairs repeat only once a kind's pool is used up."""
    per_kind = []
    for kind in KINDS:
        usable = [(f, opts) for f in pool if (opts := _options(kind, f))]
        if n and not usable:
            raise RuntimeError(f"embedded data bug: no question supports constraint kind {kind!r}")
        rng.shuffle(usable)
        per_kind.append((kind, usable))
    items = []
    for i in range(n):
        kind, usable = per_kind[i % len(per_kind)]
        f, opts = usable[(i // len(per_kind)) % len(usable)]
        items.append(_item(kind, f, opts, rng))
    rng.shuffle(items)
    return items


def _sft(it: dict) -> dict:
    return {"messages": [{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": it["chosen"]}],
            "constraint": it["constraint"]}


def _pref(it: dict) -> dict:
    return {"prompt": [{"role": "user", "content": it["prompt"]}],
            "chosen": [{"role": "assistant", "content": it["chosen"]}],
            "rejected": [{"role": "assistant", "content": it["rejected"]}], "constraint": it["constraint"]}


def generate(seed: int = 0, n_train: int = 600, n_eval: int = 100) -> dict[str, list[dict]]:
    """The four splits (see :data:`SPLITS`); pure and deterministic for a given ``seed``."""
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be >= 0")
    train, held = _split_facts(facts(), random.Random(seed * 8))
    streams = {split: random.Random(seed * 8 + 1 + i) for i, split in enumerate(SPLITS)}
    return {
        "sft_train": [_sft(it) for it in _draw(train, n_train, streams["sft_train"])],
        "sft_eval": [_sft(it) for it in _draw(held, n_eval, streams["sft_eval"])],
        "pref_train": [_pref(it) for it in _draw(train, n_train, streams["pref_train"])],
        "pref_eval": [_pref(it) for it in _draw(held, n_eval, streams["pref_eval"])],
    }


def write(out_dir, seed: int = 0, n_train: int = 600, n_eval: int = 100) -> None:
    """Write ``<split>.jsonl`` for every split into ``out_dir``, each atomically (temp file + os.replace)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(seed, n_train, n_eval).items():
        tmp = out / f".{split}.jsonl.tmp-{os.getpid()}"  # same dir, so os.replace is atomic; umask applies
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            os.replace(tmp, out / f"{split}.jsonl")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def code_hash() -> str:
    """sha256 of the code the rows come from: :data:`SOURCES`."""
    h = hashlib.sha256()
    for module in SOURCES:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def materialise(out_dir, name: str) -> Path:
    """``out_dir/<name>.jsonl``, after (re)generating the whole set (default seed and sizes) if that file is
    missing or the :data:`STAMP` says the files came from other code. Each file is replaced atomically and the
    stamp last, so concurrent readers never see half a file and an interrupted regeneration is redone."""
    out, code = Path(out_dir), code_hash()
    stamp = out / STAMP
    current = stamp.is_file() and stamp.read_text().strip() == code
    if not current or (name in SPLITS and not (out / f"{name}.jsonl").is_file()):
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp_stamp = out / f".{STAMP}.tmp-{os.getpid()}"
        tmp_stamp.write_text(code + "\n")
        os.replace(tmp_stamp, stamp)
    return out / f"{name}.jsonl"


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m deltalign.data.embedded OUT_DIR [--seed S] [--n-train N] [--n-eval N]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-eval", type=int, default=100)
    args = ap.parse_args(argv)
    write(args.out_dir, args.seed, args.n_train, args.n_eval)
    print(f"wrote {', '.join(f'{s}.jsonl' for s in SPLITS)} to {args.out_dir}")


if __name__ == "__main__":
    main()
