"""The decoding loop's KV cache: each distinct prompt's keys and values once, each row's own tokens in place.

:func:`deltalign.sampling.generation.generate` prefills every *distinct* prompt of a batch once (a GRPO group's G rows
share one prompt) and then decodes the rows one token a step. :func:`start` turns the prefill's cache into the
state that the steps continue:

* :class:`GroupCache` (sdpa models): the prompts' keys/values stay as the prefill left them, one per prompt
  ([U, kv heads, P, d]), and each row's generated keys/values go into a buffer allocated once for
  ``max_new_tokens`` and written in place (a ``DynamicCache`` instead concatenates, copying the whole cache every
  step). Attention (:func:`attend`) runs in two parts combined by their log-sum-exp: the queries of all rows that
  share a prompt (and the query heads that share a key/value head) are stacked into one matrix against that
  prompt's keys, so the prompt is read once per group and step, not once per row; and each row against its own
  generated keys. The result equals softmax attention over prompt + generated keys (``tests/test_generation.py``:
  tokens equal to transformers' ``generate``).
* :class:`RowCache` (any other model: eager attention, sliding windows, soft-capped logits): transformers' own
  cache, the prompt's entries copied to each of its rows after the one prefill.

Both drop rows on request (:meth:`keep`): finished rows leave the batch, so the steps' work follows the rows still
decoding.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from deltalign.deltas.base import inner
from deltalign.deltas.sequence import Past, run, token_input

KEYWORD = "group_cache"


class GroupCache:
    """Keys/values of U prompts [U, kvh, P, d] (``prompt_mask`` [U, P]: which entries are real) and of B rows'
    generated tokens [B, kvh, capacity, d]; row b continues prompt ``src[b]``. Passed to the model as its
    ``past_key_values`` (layers write the step's keys through :meth:`update`) and to :func:`attend` by keyword."""

    def __init__(self, past: Past, src: torch.Tensor, capacity: int):
        layers = past.cache.layers
        self.prompt_k = [layer.keys for layer in layers]
        self.prompt_v = [layer.values for layer in layers]
        self.prompt_mask = past.mask.bool()
        k = self.prompt_k[0]
        shape = (len(src), k.shape[1], capacity, k.shape[3])
        self.gen_k = [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in layers]
        self.gen_v = [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in layers]
        self.n = 0  # generated tokens in the buffers (the current step's included once the layers wrote it)
        self.next_position = past.next_position[src]
        self._set_rows(src)

    def _set_rows(self, src: torch.Tensor) -> None:
        """Row -> prompt map, and the slots that stack a prompt's rows: ``slots`` [U, Gmax] (row index, B for an
        empty slot) and ``slot_of`` [B] (row b's place in ``slots`` flattened); None when every prompt has the same
        number of rows, in order (rows b*G .. b*G+G-1 continue prompt b): then a reshape does it."""
        self.src, U, B = src, self.prompt_mask.shape[0], len(src)
        counts = torch.bincount(src, minlength=U)
        G = int(counts.max())
        if U * G == B and bool((src == torch.arange(B, device=src.device) // G).all()):
            self.slots = self.slot_of = None
            self.group = G
            return
        first = torch.cumsum(counts, 0) - counts  # rows are sorted by prompt
        order = torch.argsort(src, stable=True)
        rank = torch.empty_like(src)
        rank[order] = torch.arange(B, device=src.device) - first[src[order]]
        self.slot_of = src * G + rank
        self.slots = torch.full((U * G,), B, dtype=torch.long, device=src.device)
        self.slots[self.slot_of] = torch.arange(B, device=src.device)
        self.slots = self.slots.view(U, G)
        self.group = G

    def update(self, key, value, layer_idx, *args, **kwargs):
        """A layer's keys/values of the step's token [B, kvh, 1, d]: written into the rows' buffers."""
        self.gen_k[layer_idx][:, :, self.n] = key[:, :, 0]
        self.gen_v[layer_idx][:, :, self.n] = value[:, :, 0]
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prompt_mask.shape[1] + self.n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in order); prompts no row continues any more are dropped too."""
        src = self.src[rows]
        used = torch.unique(src)
        if len(used) < self.prompt_mask.shape[0]:
            self.prompt_k = [k.index_select(0, used) for k in self.prompt_k]
            self.prompt_v = [v.index_select(0, used) for v in self.prompt_v]
            self.prompt_mask = self.prompt_mask.index_select(0, used)
            remap = torch.full((int(self.src.max()) + 1,), -1, dtype=torch.long, device=src.device)
            remap[used] = torch.arange(len(used), device=src.device)
            src = remap[src]
        n = self.n
        for buffers in (self.gen_k, self.gen_v):
            for i, buf in enumerate(buffers):
                new = torch.empty((len(rows), *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
                new[:, :, :n] = buf[rows, :, :n]
                buffers[i] = new
        self.next_position = self.next_position[rows]
        self._set_rows(src)

    def step(self, lm, delta, token: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, 1, H] of one new token per row (``token`` [B])."""
        model = inner(lm)
        dummy = torch.ones(len(token), 1, 1, 1, dtype=torch.bool, device=token.device)  # 4-D: no mask is built
        out = model(**token_input(lm, token[:, None]), attention_mask=dummy, position_ids=self.next_position,
                    past_key_values=self, use_cache=True, **{KEYWORD: self})
        self.n += 1
        self.next_position = self.next_position + 1
        return out.last_hidden_state


class RowCache:
    """transformers' own cache of the prefill, its prompts' entries copied to their rows (``src``)."""

    def __init__(self, past: Past, src: torch.Tensor):
        past.cache.batch_select_indices(src)
        self.past = Past(past.cache, past.mask[src], past.next_position[src])

    def keep(self, rows: torch.Tensor) -> None:
        self.past.cache.batch_select_indices(rows)
        self.past = Past(self.past.cache, self.past.mask[rows], self.past.next_position[rows])

    def step(self, lm, delta, token: torch.Tensor) -> torch.Tensor:
        hidden, self.past = run(lm, delta, token[:, None], torch.ones_like(token)[:, None], self.past)
        return hidden


def groupable(lm, past: Past) -> bool:
    """Whether :class:`GroupCache` applies: sdpa attention, plain causal attention (no sliding window layer, no
    soft-capped scores) and one key/value tensor per layer."""
    config = inner(lm).config
    if config._attn_implementation != "sdpa" or getattr(config, "attn_logit_softcapping", None):
        return False
    layers = getattr(past.cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and layer.is_initialized for layer in layers)


def start(lm, past: Past, src: torch.Tensor, capacity: int) -> GroupCache | RowCache:
    """The decoding state after a prefill of distinct prompts: rows ``src`` [B] (row b continues prompt src[b])
    for up to ``capacity`` new tokens."""
    if groupable(lm, past):
        install()
        return GroupCache(past, src, capacity)
    return RowCache(past, src)


def attend(cache: GroupCache, module, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one query token per row [B, Hq, 1, d] over its prompt's keys and its own generated ones
    (the current token's included): [B, 1, Hq, d], what transformers' attention functions return."""
    layer = module.layer_idx
    pk, pv, gk, gv = cache.prompt_k[layer], cache.prompt_v[layer], cache.gen_k[layer], cache.gen_v[layer]
    B, Hq, _, d = query.shape
    U, kvh, P, _ = pk.shape
    rep, G, n = Hq // kvh, cache.group, cache.n + 1
    q = query.reshape(B, kvh, rep, d)
    # the prompt part: the rows of a prompt and the query heads of a key/value head stacked as one query matrix
    if cache.slots is None:
        qg = q.view(U, G, kvh, rep, d)
    else:
        qg = torch.cat([q, q.new_zeros(1, kvh, rep, d)]).index_select(0, cache.slots.reshape(-1)).view(U, G, kvh,
                                                                                                        rep, d)
    qg = qg.permute(0, 2, 1, 3, 4).reshape(U, kvh, G * rep, d)
    sp = torch.matmul(qg, pk.transpose(-1, -2)).float().mul_(scaling)  # [U, kvh, G*rep, P]
    sp.masked_fill_(~cache.prompt_mask[:, None, None, :], float("-inf"))
    mp = sp.amax(-1, keepdim=True)
    ep = torch.exp(sp.sub_(mp))
    lp = ep.sum(-1, keepdim=True)
    op = torch.matmul(ep.to(pv.dtype), pv).float()  # [U, kvh, G*rep, d], not yet normalised

    def rows(x: torch.Tensor) -> torch.Tensor:  # [U, kvh, G*rep, k] -> [B, kvh, rep, k]
        x = x.view(U, kvh, G, rep, -1).permute(0, 2, 1, 3, 4)
        if cache.slots is None:
            return x.reshape(B, kvh, rep, -1)
        return x.reshape(U * G, kvh, rep, -1).index_select(0, cache.slot_of)

    mp, lp, op = rows(mp), rows(lp), rows(op)
    # the generated part: each row against its own tokens
    sg = torch.matmul(q, gk[:, :, :n].transpose(-1, -2)).float().mul_(scaling)  # [B, kvh, rep, n]
    mg = sg.amax(-1, keepdim=True)
    eg = torch.exp(sg.sub_(mg))
    lg = eg.sum(-1, keepdim=True)
    og = torch.matmul(eg.to(gv.dtype), gv[:, :, :n]).float()
    m = torch.maximum(mp, mg)
    wp, wg = torch.exp(mp - m), torch.exp(mg - m)
    out = (op * wp + og * wg) / (lp * wp + lg * wg)  # [B, kvh, rep, d]
    return out.to(query.dtype).reshape(B, 1, Hq, d)


def _dispatch(original):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        cache = kwargs.pop(KEYWORD, None)
        if cache is None or args:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return attend(cache, module, query, kwargs.get("scaling") or module.scaling), None

    attention.__dict__.update(original.__dict__)  # the marks of the wrappers below it (row attention's)
    attention.group_cache = True
    return attention


def install() -> None:
    """Route ``sdpa`` attention through :func:`attend` when a forward carries a :class:`GroupCache` (idempotent;
    without the keyword every call goes to the function it wraps)."""
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(current, "group_cache", False):
        ALL_ATTENTION_FUNCTIONS.register("sdpa", _dispatch(current))
