"""Typed configuration: dataclass defaults <- YAML (with ``include:``) <- ``--set section.key=value`` overrides.

Each section (``run``, ``model``, one per stage) is a dataclass with defaults and attribute docstrings (PEP 257).
:func:`load` builds one instance per section, checking every key and value against the declared types; a typo
fails with its dotted key, its source and a suggestion. Precedence, lowest first: defaults, ``base`` YAML, ``path``
YAML (each file after the files it includes, relative to itself), overrides in order. Mappings deep-merge; lists and
scalars replace. :func:`dump_yaml` of the result loads back to the same configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from pathlib import Path

import yaml

SET = "--set"  # the source named in errors about command-line overrides
NONE = type(None)


class ConfigError(ValueError):
    """A config key or value that does not fit the declared dataclasses (the message says which, and where from)."""


# --- declared types ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def setting_types(cls) -> dict[str, object]:
    """Init field name -> resolved type (``from __future__ import annotations`` leaves strings in ``Field.type``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def is_section(tp) -> bool:
    """Whether a setting's type is a nested section of settings (a dataclass)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_names(cls, prefix: str = "") -> list[str]:
    """Dotted names of ``cls``'s settings, nested sections' included (``generation.top_p``)."""
    out = []
    for name, tp in setting_types(cls).items():
        out.append(prefix + name)
        if is_section(tp):
            out += field_names(tp, f"{prefix}{name}.")
    return out


def _unknown(kind: str, key: str, valid: list[str], where: str) -> ConfigError:
    """The error for an unknown key; suggests an abbreviation match (learning_rate ~ lr) or the closest spelling."""
    def initials(k):
        return "".join(w[:1] for w in k.rsplit(".", 1)[-1].split("_"))
    leaf = key.rsplit(".", 1)[-1]
    close = [v for v in valid if initials(key) == v.rsplit(".", 1)[-1] or initials(v) == leaf]
    close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
    return ConfigError(f"unknown {kind} {key!r} in {where}; {hint}")


def _coerce(tp, v, key: str, where: str):
    """``v`` converted to the declared type ``tp``, or a ConfigError naming ``key`` and ``where``.

    YAML 1.1 reads ``1e-4`` as a string, so numeric fields accept numeric strings; ints accept whole floats; bools
    accept only booleans; ``X | None`` accepts null; unions try their arms in order (an exact type match first).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any or tp is object:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and NONE in args:
            return None
        for arm in sorted((a for a in args if a is not NONE), key=lambda a: type(v) is not a):
            with contextlib.suppress(ConfigError):
                return _coerce(arm, v, key, where)
    elif origin is typing.Literal:
        if v in args:
            return v
    elif (origin or tp) in (list, tuple) and isinstance(v, (list, tuple)):
        item = args[0] if args else typing.Any
        out = [_coerce(item, x, f"{key}[{i}]", where) for i, x in enumerate(v)]
        return tuple(out) if (origin or tp) is tuple else out
    elif (origin or tp) is dict and isinstance(v, dict):
        kt, vt = args or (typing.Any, typing.Any)
        return {_coerce(kt, k, key, where): _coerce(vt, x, f"{key}.{k}", where) for k, x in v.items()}
    elif tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            with contextlib.suppress(ValueError, OverflowError):  # "1e3" and 1000.0 are whole numbers too
                n = int(v) if isinstance(v, int) or str(v).strip().lstrip("+-").isdigit() else float(v)
                if n == int(n):
                    return int(n)
    elif tp is float:
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            with contextlib.suppress(ValueError):
                return float(v)
    elif tp is str:
        if isinstance(v, str) or isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    elif isinstance(tp, type) and origin is None and isinstance(v, (tp, str)):
        with contextlib.suppress(Exception):  # other classes: Path, an Enum by value, ...
            return v if isinstance(v, tp) else tp(v)
    if origin is typing.Literal:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, args))}, got {v!r} (in {where})")
    raise ConfigError(f"{key}: expected {_type_text(tp)}, got {v!r} (in {where})")


def _type_text(tp) -> str:
    """A declared type as an error names it: ``int``, ``list[str] | str``; a literal by its values
    (``bool | 'selective'``)."""
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("None" if a is NONE else _type_text(a) for a in typing.get_args(tp))
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


@functools.lru_cache(maxsize=None)
def former_names(cls) -> dict[str, tuple[str, bool]]:
    """Former name -> (current name, kept): the settings of ``cls`` declared with ``setting(formerly=...)``."""
    return {f.metadata["formerly"]: (f.name, f.metadata.get("keep_former", False))
            for f in dataclasses.fields(cls) if f.metadata.get("formerly")}


NOTICED: set[str] = set()
"""The former names already noticed in this process (one notice each)."""


def _current(cls, k, prefix: str, where: str, d: dict) -> str:
    """The current name of key ``k`` of ``cls`` (itself unless it is a former name; then a one-line notice on
    stderr, once per process and only from the first process of a launch, unless the old name is kept)."""
    if k not in former_names(cls):
        return k
    new, kept = former_names(cls)[k]
    dot = f"{prefix}." if prefix else ""
    if new in d:
        raise ConfigError(f"{dot}{k} and {dot}{new} are one setting ({dot}{k} is its former name): keep "
                          f"{dot}{new} (in {where})")
    if not kept and f"{dot}{k}" not in NOTICED and os.environ.get("RANK", "0") == "0":
        NOTICED.add(f"{dot}{k}")
        print(f"deltalign: `{dot}{k}` is now `{dot}{new}`; the old name is accepted until the next release "
              f"(in {where})", file=sys.stderr)
    return new


def _check(cls, d, where: str, prefix: str) -> dict:
    """Validate a partial nested mapping for ``cls`` (known keys, coerced values) and return the coerced copy,
    with former names (:func:`setting`'s ``formerly``) under their current ones."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} settings, got {d!r} (in {where})")
    known, out = setting_types(cls), {}
    for k, v in d.items():
        k = _current(cls, k, prefix, where, d)
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in known:
            raise _unknown("key", key, [f"{prefix}.{n}" if prefix else n for n in field_names(cls)], where)
        if is_section(known[k]):
            out[k] = _check(known[k], v, where, key)
        else:
            out[k] = _coerce(known[k], v, key, where)
            _check_bounds(cls, k, out[k], key, where)
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --- dict <-> dataclass -----------------------------------------------------------------------------------------

def to_dict(obj):
    """A dataclass (or a dict/list of them) as plain nested dicts, lists and scalars: JSON- and YAML-able."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def from_dict(cls, d: dict, where: str = "<dict>", prefix: str = ""):
    """Build ``cls`` from a (partial) nested mapping, validated as in :func:`load`; missing fields keep defaults.

    A partial nested section is merged over the parent's default for that field (its ``default_factory``), not over
    the nested class's own defaults. ``where`` and ``prefix`` only label error messages.
    """
    d, kw = _check(cls, d, where, prefix), {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            tp, v = setting_types(cls)[f.name], d[f.name]
            if is_section(tp):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                base = {} if default is dataclasses.MISSING or default is None else to_dict(default)
                v = from_dict(tp, _deep_merge(base, v), where, f"{prefix}.{f.name}" if prefix else f.name)
            kw[f.name] = v
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except ValueError as e:  # a rule across settings (``__post_init__``): the message names the keys
        raise ConfigError(f"{e} (in {where})") from None


def dump_yaml(configs: dict) -> str:
    """The resolved ``{section: instance}`` configs as YAML, in field order (what a run directory records)."""
    return yaml.safe_dump(to_dict(configs), sort_keys=False, allow_unicode=True)


def setting(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, hashed: bool = True,
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
            formerly: str | None = None, keep_former: bool = False):
    """A dataclass field with a checked range and/or hashing flag: ``lr: float = setting(2e-4, gt=0)``.
    :func:`load` refuses a value outside ``[ge|gt, le|lt]`` with the dotted key and its source. ``formerly``: the
    setting's old name, still accepted (with a one-line notice, for one release; silently and for good with
    ``keep_former``, for names users type from TRL) and the name the content hash keeps."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = ({"bounds": bounds} | ({} if hashed else {"hashed": False})
            | ({"formerly": formerly, "keep_former": keep_former} if formerly else {}))
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def bounds_text(cls, name: str) -> str:
    """``"> 0"``, ``">= 0 and < 1"`` ...: the range declared with :func:`setting` ('' if none)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return " and ".join(f"{_OPS[k][0]} {b:g}" for k, b in f.metadata.get("bounds", {}).items())


def _check_bounds(cls, name: str, value, key: str, where: str) -> None:
    f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    if f is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for k, b in f.metadata.get("bounds", {}).items():
        if not _OPS[k][1](value, b):
            raise ConfigError(f"{key}: must be {bounds_text(cls, name)}, got {value!r} (in {where})")


def check(obj, prefix: str, where: str = "<code>") -> None:
    """Check the declared ranges of an already built dataclass (and its nested ones), as :func:`load` does."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            check(v, f"{prefix}.{f.name}", where)
        else:
            _check_bounds(type(obj), f.name, v, f"{prefix}.{f.name}", where)


NOT_HASHED = {"hashed": False}
"""Field metadata of a setting that cannot change a stage's results (threads, logging, checkpoint cadence, ...):
``threads: int = field(default=0, metadata=NOT_HASHED)``. :func:`hashed_dict` leaves such settings out of the
content hash, and ``--help`` marks them "(not hashed)"."""


def is_hashed(cls, name: str) -> bool:
    """Whether field ``name`` of dataclass ``cls`` is part of the content hash (see :data:`NOT_HASHED`)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("hashed", True)


def hashed_dict(obj):
    """:func:`to_dict` without the settings marked :data:`NOT_HASHED` (at any depth): what a content hash covers. A
    renamed setting is hashed under its former name (``setting(formerly=...)``), so a run directory made before
    the rename stays up to date, whichever name the config uses."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.metadata.get("formerly") or f.name: hashed_dict(getattr(obj, f.name))
                for f in dataclasses.fields(obj) if f.init and f.metadata.get("hashed", True)}
    if isinstance(obj, dict):
        return {str(k): hashed_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [hashed_dict(v) for v in obj]
    return to_dict(obj)


# --- loading ------------------------------------------------------------------------------------------------------

def _read(path: Path, chain: tuple = ()) -> list[tuple[str, dict]]:
    """(source, sections) layers of one YAML file: what it includes (recursively, in order), then itself."""
    if path.resolve() in chain:
        raise ConfigError(f"include cycle: {' -> '.join(map(str, chain + (path.resolve(),)))}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if data is None:  # an empty file (or only comments): most likely not what was meant, never the defaults silently
        raise ConfigError(f"config {path} is empty: name at least one section (e.g. `include: default.yaml`), or "
                          "leave --config out for configs/default.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    inc = data.pop("include", None)
    layers = []
    for rel in [inc] if isinstance(inc, str) else inc or []:
        layers += _read(path.parent / rel, chain + (path.resolve(),))
    return layers + [(str(path), data)]


def _override(sections: dict[str, type], item: str) -> dict:
    """``"sft.delta.r=8"`` -> ``{"sft": {"delta": {"r": 8}}}``. The value is YAML, except that a plain ``str``
    field keeps the raw text (so ``run.name=0123`` or ``=yes`` stay strings; ``null`` still means None)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{SET} expects section.key=value, got {item!r}")
    tp = sections.get(parts[0])
    for p in parts[1:]:
        tp = setting_types(tp).get(former_names(tp).get(p, (p,))[0]) if is_section(tp) else None
    if (tp is str or set(typing.get_args(tp)) == {str, NONE}) and raw not in ("null", "~"):
        value = raw
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {raw!r} (in {SET}): {e}") from e
    for p in reversed(parts):
        value = {p: value}
    return value


def load(sections: dict[str, type], path: str | None = None, overrides: list[str] = (),
         base: str | None = None) -> dict[str, object]:
    """One instance per section: defaults, then ``base`` YAML, then ``path`` YAML (after its includes), then the
    ``section.key=value`` overrides. Unknown sections/keys and ill-typed values raise :class:`ConfigError`."""
    layers = [layer for p in (base, path) if p is not None for layer in _read(Path(p))]
    layers += [(SET, _override(sections, o)) for o in overrides]
    merged: dict[str, dict] = {name: {} for name in sections}
    for where, layer in layers:
        for name, body in layer.items():
            if name not in sections:
                raise _unknown("section", str(name), list(sections), where)
            if body is not None:  # an empty section ("dpo:") keeps the defaults
                merged[name] = _deep_merge(merged[name], _check(sections[name], body, where, name))
    where = " and ".join([str(p) for p in (base, path) if p] + ([SET] if overrides else [])) or "defaults"
    return {name: from_dict(cls, merged[name], where, name) for name, cls in sections.items()}
