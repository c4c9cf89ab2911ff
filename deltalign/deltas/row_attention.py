"""Attention of packed rows with shared prefixes, computed over the batch's own rows.

:func:`deltalign.data.sharing.prefix_tree` stores a batch as packed rows of distinct tokens; every linear layer
then runs once per distinct token. Attention over a packed row with the dense tree mask costs L^2 per layer for L
nodes, almost all of it masked out when the row holds many branches (the bench's 8 PPO rollouts of ~100 tokens
share little more than a system prompt: ~500 nodes, 250k scores per head and layer, of which ~40k are attended).
:func:`attend_rows` instead gathers each original row's queries, keys and values from the nodes (row b, position
t -> its node), runs the ordinary causal attention of the padded batch (B T^2 / 2 scores, the causal kernel skips
the upper half) and takes each node's output from one row that holds it. A node's output depends only on its own
query and its ancestors' keys and values, which are the same in every row that holds it, so the result and its
gradient equal the tree mask's (the gradient of a node's key or value is the sum over the rows that read it,
through the gather).

The model's attention function receives the row view as a keyword (``row_view``) that transformers passes from the
model's forward down to each attention call. :func:`install` wraps the process's ``sdpa`` entry of transformers'
attention table once: with ``row_view`` present it attends per row, without it it is the original function,
unchanged. Only sdpa: a model's eager attention is its own function, not a table entry, so eager models keep the
tree mask, as does a model whose layers do not pass keywords on -- the values are right either way
(``tests/test_sharing.py`` checks that the row path is taken where it should be).
"""

from __future__ import annotations

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

KEYWORD = "row_view"


def attend_rows(original, module, query, key, value, view: dict, **kwargs):
    """``original`` attention over the rows of ``view`` (``flat`` [B, T]: the node of each position as
    ``packed row * L + column``; ``owner`` [R, L]: the flat position b * T + t whose output each node takes);
    query/key/value [R, heads, L, D].
    Returns the nodes' output [R, L, heads, D] (what transformers' attention functions return) and None."""
    B, T = view["flat"].shape
    R, L = view["owner"].shape
    flat = view["flat"].reshape(-1)
    # index_select along one flattened dimension: its backward (index_add) is several times faster on CPU than
    # that of advanced indexing over two dimensions (an accumulating index_put)
    q, k, v = (x.transpose(1, 2).reshape(R * L, -1).index_select(0, flat).view(B, T, x.shape[1], x.shape[3])
               .transpose(1, 2) for x in (query, key, value))  # [B, heads, T, D]
    kwargs.pop("is_causal", None)
    out, _ = original(module, q, k, v, None, is_causal=True, **kwargs)  # [B, T, heads, D]
    return out.reshape(B * T, -1).index_select(0, view["owner"].reshape(-1)).view(R, L, *out.shape[2:]), None


def _dispatch(original):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        view = kwargs.pop(KEYWORD, None)
        if view is None or args:  # (transformers passes everything after the mask by keyword)
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return attend_rows(original, module, query, key, value, view, **kwargs)

    attention.__dict__.update(original.__dict__)  # the marks of the wrappers below it (decoding's)
    attention.row_view = True
    return attention


def install() -> None:
    """Route ``sdpa`` attention through :func:`attend_rows` when a forward carries ``row_view`` (idempotent;
    without the keyword every call goes to transformers' own function)."""
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(current, "row_view", False):
        ALL_ATTENTION_FUNCTIONS.register("sdpa", _dispatch(current))


def row_view(shared: dict, attn_implementation: str) -> dict:
    """The keyword for a forward of packed rows: ``{"row_view": ...}`` when :func:`deltalign.data.sharing.prefix_tree` chose per-row
    attention for the batch (cheaper than the tree mask) and the model attends with sdpa, else nothing."""
    if "owner" not in shared or attn_implementation != "sdpa":
        return {}
    install()
    return {KEYWORD: {"flat": shared["flat"], "owner": shared["owner"]}}
