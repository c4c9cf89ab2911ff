"""What ``--help`` shows for each setting: the attribute docstring written under each config field, with its
default, its bounds and whether it is hashed (:mod:`deltalign.core.settings` declares them)."""

from __future__ import annotations

import ast
import functools
import inspect
import json
import textwrap

from deltalign.core.settings import bounds_text, former_names, is_hashed, is_section, setting_types, to_dict


@functools.lru_cache(maxsize=None)
def _own_docs(cls) -> dict[str, str]:
    """Attribute docstrings written in ``cls``'s own body (empty if its source is unavailable)."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return {}
    return {node.target.id: inspect.cleandoc(nxt.value.value) for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}


def field_docs(cls, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> attribute docstring ("" if none), inherited ones (across the MRO) and nested included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_own_docs(klass))
    out = {}
    for name, tp in setting_types(cls).items():
        out[prefix + name] = docs.get(name, "")
        if is_section(tp):
            out.update(field_docs(tp, f"{prefix}{name}."))
    return out


def help_text(section: str, cls) -> str:
    """Readable settings list for ``--help``: ``  sft.lr = 0.0002   Peak learning rate ...`` (defaults shown)."""
    try:
        inst = cls()
    except TypeError:  # required fields: no defaults to show
        inst = None
    rows = []
    for name, doc in field_docs(cls).items():
        tp = functools.reduce(lambda c, n: setting_types(c)[n], name.split("."), cls)
        owner = functools.reduce(lambda c, n: setting_types(c)[n], name.split(".")[:-1], cls)
        leaf = name.rsplit(".", 1)[-1]
        if bounds_text(owner, leaf):
            doc = f"{doc} [{bounds_text(owner, leaf)}]"
        if not is_hashed(owner, leaf):
            doc = f"{doc} (not hashed)"
        if former := {new: (old, kept) for old, (new, kept) in former_names(owner).items()}.get(leaf):
            doc = f"{doc} (also `{former[0]}`{'' if former[1] else ', its former name, until the next release'})"
        left = f"  {section}.{name}"
        if inst is not None and not is_section(tp):
            v = to_dict(functools.reduce(getattr, name.split("."), inst))
            left += " = " + (v if isinstance(v, str) and v else json.dumps(v))
        rows.append((left, " ".join(doc.replace("``", "").split())))
    width = min(max((len(left) for left, _ in rows), default=0), 44)
    return "\n".join([f"{section}:"] + [f"{left:<{width}}   {doc}".rstrip() for left, doc in rows])
