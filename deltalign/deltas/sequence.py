"""The one forward path of the backbone: how the active delta changes what the base sees, invisibly to callers.

Callers pass their token ids and attention mask (either padding side) and get hidden states ALIGNED WITH THEIR IDS,
whatever the delta, so completion-only labels, the reward head's last-token index, cached reference log-probs and
PPO's positions need no change:

* prompt tuning: soft-prompt embeddings go in front of the input embeddings, the attention mask gets ones in
  front, and those positions are dropped from the output;
* prefix tuning: every layer's prefix keys/values go in as a KV cache, with the attention mask extended in front,
  so the causal mask lets every token see them; nothing is added to the output;
* position ids count each row's attended positions (soft-prompt tokens included, prefix entries not), so a row
  gets the same positions whatever its padding: a left-padded batch gives what each row gives alone, and KV-cache
  generation gives what a full forward gives.

With ``cache``, :func:`run` also returns a :class:`Past` to continue from; generation then feeds one token a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from deltalign.deltas.base import inner
from deltalign.deltas.row_attention import row_view
from deltalign.zero.vocab import lookup, weight_of


@dataclass
class Past:
    """A cached sequence to continue: the KV cache, the attention mask over all cached positions (virtual ones
    included) and each row's next position id [B, 1]."""
    cache: Cache
    mask: torch.Tensor
    next_position: torch.Tensor


class ReadOnlyLayer(DynamicLayer):
    """A cache layer holding a delta's prefix that is never written: ``update`` returns prefix + the new states and
    keeps nothing, so a training forward (and a gradient-checkpointing replay of it) sees the same keys each time."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T]: 0, 1, ... over each row's attended positions; a pad after them keeps counting (a
    right-padded row gets 0..T-1, as transformers' default), a pad before them gets 0 (it is never attended)."""
    mask = mask.long()
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), idx, -1).cummax(dim=1).values  # last attended index so far (-1: none yet)
    return (mask.cumsum(-1) - 1 + torch.where(last >= 0, idx - last, 0)).clamp(min=0)


def sharded_embeds(lm, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Input embeddings from the rows of a ZeRO-3-partitioned table each rank holds, never gathering the table
    (:func:`deltalign.zero.vocab.lookup`); None otherwise (the model embeds the ids itself)."""
    table = lm.get_input_embeddings()
    weight = weight_of(table)
    if type(table) is not torch.nn.Embedding or not hasattr(weight, "ds_id"):
        return None
    return lookup(weight, input_ids)


def token_input(lm, input_ids: torch.Tensor) -> dict:
    """The model's token input: the ids, or under ZeRO-3 their embeddings from :func:`sharded_embeds`."""
    embeds = sharded_embeds(lm, input_ids)
    return {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}


def run(lm, delta, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Past | None = None,
        cache: bool = False) -> tuple[torch.Tensor, Past | None]:
    """Hidden states [B, T, H] of ``input_ids`` under ``delta`` (one of ours, or None: the base with whatever peft
    adapter is on), and with ``cache`` the :class:`Past` to continue from. ``past``: continue a cached sequence by
    these tokens (``attention_mask`` covers them only)."""
    model = inner(lm)
    if past is not None:
        mask = torch.cat([past.mask, attention_mask.to(past.mask)], dim=1)
        pos = past.next_position + positions(attention_mask)
        out = model(**token_input(lm, input_ids), attention_mask=mask, position_ids=pos, past_key_values=past.cache,
                    use_cache=True)
        return out.last_hidden_state, Past(out.past_key_values, mask, pos[:, -1:] + 1)

    batch = input_ids.shape[0]
    mask, embeds, n_front, store = attention_mask, sharded_embeds(lm, input_ids), 0, None
    front = delta.front_embeds(batch) if delta is not None else None
    if front is not None:  # prompt tuning: virtual tokens in front, counted in the positions
        tokens = embeds if embeds is not None else lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([front.to(tokens.dtype), tokens], dim=1)
        n_front = front.shape[1]
        mask = torch.cat([mask.new_ones(batch, n_front), mask], dim=1)
    pos = positions(mask)
    kv = delta.prefix_kv(batch) if delta is not None else None
    if kv is not None:  # prefix tuning: per-layer keys/values in front, not counted in the positions
        dtype = weight_of(lm.get_input_embeddings()).dtype
        kv = [(k.to(dtype), v.to(dtype)) for k, v in kv]
        store = DynamicCache(ddp_cache_data=kv) if cache else Cache(layers=[ReadOnlyLayer(k, v) for k, v in kv])
        mask = torch.cat([mask.new_ones(batch, kv[0][0].shape[2]), mask], dim=1)
    out = model(input_ids=None if embeds is not None else input_ids, inputs_embeds=embeds, attention_mask=mask,
                position_ids=pos, past_key_values=store, use_cache=cache)
    hidden = out.last_hidden_state[:, n_front:] if n_front else out.last_hidden_state
    return hidden, (Past(out.past_key_values, mask, pos[:, -1:] + 1) if cache else None)


def run_shared(lm, delta, shared: dict) -> torch.Tensor:
    """Hidden states [R, L, H] of the packed rows of :func:`deltalign.data.sharing.prefix_tree` (tree attention
    mask or, where it chose so, attention over the batch's rows; depth positions) under ``delta``. A delta's
    virtual tokens are a prefix of every node: prompt tuning's soft prompt goes in front of each packed row (every
    node attends to it, positions count it), prefix tuning's keys/values go in as a cache every node attends to;
    both use the tree mask."""
    model = inner(lm)
    n_rows, width = shared["input_ids"].shape
    tree, pos = shared["mask"], shared["position_ids"]
    front = delta.front_embeds(n_rows) if delta is not None else None
    kv = delta.prefix_kv(n_rows) if delta is not None else None
    tokens, cache, n_front = token_input(lm, shared["input_ids"]), None, 0
    if front is not None:  # the soft prompt: causal among itself, seen by every node; positions after it
        n_front = front.shape[1]
        embeds = tokens.get("inputs_embeds", None)
        embeds = lm.get_input_embeddings()(shared["input_ids"]) if embeds is None else embeds
        tokens = {"inputs_embeds": torch.cat([front.to(embeds.dtype), embeds], dim=1)}
        causal = torch.ones(n_front, n_front, dtype=torch.bool, device=tree.device).tril()
        top = torch.cat([causal, causal.new_zeros(n_front, width)], dim=1).expand(n_rows, 1, -1, -1)
        seen = tree.new_ones(n_rows, 1, width, n_front)
        tree = torch.cat([top, torch.cat([seen, tree], dim=3)], dim=2)
        pos = torch.cat([torch.arange(n_front, device=pos.device).expand(n_rows, -1), pos + n_front], dim=1)
    if kv is not None:  # prefix keys/values: a read-only cache in front, seen by every node, not in the positions
        dtype = weight_of(lm.get_input_embeddings()).dtype
        cache = Cache(layers=[ReadOnlyLayer(k.to(dtype), v.to(dtype)) for k, v in kv])
        tree = torch.cat([tree.new_ones(*tree.shape[:3], kv[0][0].shape[2]), tree], dim=3)
    mask = tree
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores; sdpa takes booleans
        dtype = weight_of(lm.get_input_embeddings()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    rows = {} if front is not None or kv is not None else row_view(shared, model.config._attn_implementation)
    out = model(**tokens, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=False, **rows)
    return out.last_hidden_state[:, n_front:] if n_front else out.last_hidden_state
