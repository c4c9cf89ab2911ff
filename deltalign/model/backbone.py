"""One frozen base model in memory, with named deltas and small named heads on top.

Every stage trains only deltas on this object: a named delta of any method in :mod:`deltalign.deltas` (LoRA/DoRA
through peft's named-adapter API, the other methods as modules of ours in ``self.deltas``) and, for the reward model
and critic, a scalar head (:mod:`deltalign.model.heads`). The base weights are loaded once, frozen, and never written.

One delta is active at a time (:meth:`Backbone.activate`, :meth:`Backbone.using`): while one of ours is active,
peft's adapter layers are off, and vice versa. :meth:`Backbone.forward` returns hidden states aligned with the
caller's ids for every method (prompt learning included: :mod:`deltalign.deltas.sequence`).

Trainability is owned here, not by peft: peft's ``set_adapter`` makes the adapter it activates trainable (even one
loaded frozen), so every switch activates in inference mode and then re-applies the ``requires_grad`` flags this
class recorded. A delta is trainable only if it was added or loaded as trainable.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from deltalign import deltas

from deltalign.model import heads
from deltalign.deltas import AdapterConfig, lora, peft_config  # noqa: F401  (AdapterConfig: stages import it here)
from deltalign.data.tokenize import load_tokenizer
from deltalign.deltas.sequence import Past, run, run_shared
from deltalign.model.heads import ScalarHead
from deltalign.core import verify
from deltalign.core.settings import setting
from deltalign.model.recompute import checkpointing_kwargs
from deltalign.zero import loading as zero_loading

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    path: str = "models/SmolLM2-135M-Instruct"
    """Local HF checkpoint directory of the frozen base. ``tiny`` builds a tiny random Llama on the fly (tests)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute/storage dtype of the base: float32 (the right choice on CPU), bfloat16 or float16."""
    quantization: Literal["none", "nf4"] = "none"
    """``none`` or ``nf4`` (4-bit NormalFloat with double quantisation through bitsandbytes: QLoRA)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory. Off unless you trust the checkpoint."""
    gradient_checkpointing: bool | Literal["selective", "auto"] = setting("auto", hashed=False)
    """Recompute activations in backward (non-reentrant) to save memory: ``true`` (every layer; the least memory),
    ``selective`` (keep what the frozen base's matmuls computed, recompute only the rest: faster, more memory;
    deltalign/model/recompute.py) or ``false``. ``auto``: before each training stage loads its model, the fastest
    of false / selective / true whose estimated peak fits ``memory_budget_gib``, said in one log line
    (deltalign/pipeline/autofit.py); where nothing resolves it (eval, export, generate: no training), off."""
    memory_budget_gib: float = setting(0.0, hashed=False, ge=0)
    """The peak memory ``gradient_checkpointing: auto`` fits each stage in, GiB per process; 0: the memory
    available when the stage starts, less 10% (under several processes: 90% of each one's share of the total)."""


def resolve_path(path: str) -> Path:
    if path == "tiny":
        from deltalign.core import tiny

        return tiny.ensure()
    p = Path(path)
    if not p.is_dir():
        hint = " (run `make model` to build the embedded default)" if "SmolLM2" in path else ""
        raise FileNotFoundError(f"model.path {path!r} is not a local checkpoint directory{hint}")
    return p


def load_base(cfg: ModelConfig):
    """Load the frozen base model (safetensors only) and its tokenizer."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_path(cfg.path)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)} (got {cfg.dtype!r})")
    dtype = DTYPES[cfg.dtype]
    if dtype != torch.float32 and not torch.cuda.is_available():
        warnings.warn(f"model.dtype={cfg.dtype} on CPU: no fast low-precision matmul here; float32 is faster")
    kwargs: dict = dict(dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif cfg.quantization != "none":
        raise ValueError(f"model.quantization must be 'none' or 'nf4' (got {cfg.quantization!r})")
    if cfg.quantization == "none" and zero_loading.sharded_loading():  # under ZeRO-3: never the whole base in a process
        model = zero_loading.load_sharded(path, dtype, cfg.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    for m in model.modules():
        # bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight IN PLACE (bf16 scales) at its first
        # eval-mode forward without grad: the frozen base would change, a reference forward would differ from a
        # training forward, and layers narrower than a quantisation block fail. Keep one representation.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    model.eval()  # no dropout in the frozen base; adapters have their own dropout switched by train()
    if cfg.gradient_checkpointing in (True, "selective"):  # "auto" unresolved: nothing trains here
        kwargs = checkpointing_kwargs(cfg.gradient_checkpointing)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    return model, load_tokenizer(path, cfg.trust_remote_code)


class Backbone(nn.Module):
    """The frozen base + named deltas + named heads, as one module that accelerate/DeepSpeed can prepare."""

    def __init__(self, model, tokenizer, cfg: ModelConfig | None = None):
        super().__init__()
        self.model = model  # a PreTrainedModel, then a PeftModel once the first peft (LoRA/DoRA) adapter is attached
        self.tokenizer = tokenizer
        self.cfg = cfg or ModelConfig()
        self.heads = nn.ModuleDict()
        self.deltas = nn.ModuleDict()  # our deltas (every method peft does not implement here), by name
        self.trainable: set[str] = set()
        self._active: str | None = None

    @classmethod
    def load(cls, cfg: ModelConfig) -> "Backbone":
        model, tok = load_base(cfg)
        return cls(model, tok, cfg)

    # --- adapters -------------------------------------------------------------------------------------------
    @property
    def _peft(self) -> bool:
        return hasattr(self.model, "peft_config") and hasattr(self.model, "get_base_model")

    @property
    def adapters(self) -> list[str]:
        """Names of every attached delta, peft's and ours."""
        return [*getattr(self.model, "peft_config", {}), *self.deltas]

    def add_adapter(self, name: str, cfg: AdapterConfig, trainable: bool = True) -> None:
        """Attach a fresh delta called ``name`` with ``cfg.method`` (see :data:`deltalign.deltas.METHODS`)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already attached")
        if deltas.spec(cfg.method).impl == "peft":
            self.model = lora.add(self.model, name, peft_config(cfg))
        else:
            with self.using(None):  # some methods start from the base's own activations
                self._attach(name, deltas.build(cfg, self))
        self._mark(name, trainable)

    def load_adapter(self, name: str, path: str | Path, trainable: bool = False) -> None:
        """Load a saved delta of any method as ``name``: frozen by default (a reference), or trainable (a copy to
        train). Only ``adapter_model.safetensors`` is read: a pickled ``adapter_model.bin`` is refused."""
        path = Path(path)
        weights = path / deltas.WEIGHTS_FILE
        deltas.check_folder(path)  # whole, before peft or safetensors read anything
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already attached")
        conf = deltas.read_config(path)
        if not deltas.is_ours(conf):
            self.model = lora.load(self.model, name, path, trainable)
        else:
            with self.using(None), torch.random.fork_rng(devices=[]):  # shapes only: the caller's RNG untouched
                module = deltas.build(deltas.settings_of(conf), self, init=False)
            module.load_state_dict(verify.load_tensors(weights))
            self._attach(name, module)
        self._mark(name, trainable)

    def _attach(self, name: str, module: deltas.Delta) -> None:
        """Hook one of our deltas into the base (inactive until activated), on the base's device."""
        module.to(next(self.causal_lm.parameters()).device)
        module.attach(self.causal_lm)
        self.deltas[name] = module

    def _mark(self, name: str, trainable: bool) -> None:
        (self.trainable.add if trainable else self.trainable.discard)(name)
        self.activate(name)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name in self.deltas:
            return {f"deltas.{name}.{n}": p for n, p in self.deltas[name].named_parameters()}
        key = f".{name}."
        return {n: p for n, p in self.model.named_parameters() if key in n or n.endswith(f".{name}")}

    def activate(self, name: str) -> None:
        """Make ``name`` the delta used in forward passes. Never changes which parameters train."""
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; attached: {self.adapters}")
        self._switch(name)

    def _switch(self, name: str | None) -> None:
        """Turn delta ``name`` on and every other off (``None``: all off), then re-apply trainability."""
        for n, d in self.deltas.items():
            d.active = n == name
        if self._peft:
            if name is None or name in self.deltas:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.set_adapter(name, inference_mode=True)
        self._active = name
        self._apply_trainable()

    @property
    def active(self) -> str | None:
        """The delta used in forward passes (``None``: the bare base)."""
        return self._active

    @contextlib.contextmanager
    def using(self, name: str | None):
        """Run a block with delta ``name`` active (``None``: all deltas off), then restore the previous one."""
        previous = self._active
        if name == previous:
            yield
            return
        if name is not None and name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; attached: {self.adapters}")
        self._switch(name)
        try:
            yield
        finally:
            self._switch(previous)

    def _apply_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.deltas.requires_grad_(False)
        for name in self.trainable:
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(True)

    def save_adapter(self, name: str, out_dir: str | Path, state: dict | None = None) -> None:
        """Write delta ``name`` into ``out_dir``: ``adapter_config.json`` (which says the method) and
        ``adapter_model.safetensors`` at the top level (PEFT format for LoRA/DoRA)."""
        if name in self.deltas:
            deltas.save(self.deltas[name], out_dir, self.cfg.path, state)
        else:
            lora.save(self.model, name, out_dir, state)

    # --- heads ----------------------------------------------------------------------------------------------
    def add_head(self, name: str, trainable: bool = True) -> ScalarHead:
        head = ScalarHead(self.hidden_size)
        head.requires_grad_(trainable)
        self.heads[name] = head
        return head

    def load_head(self, name: str, path: str | Path, trainable: bool = False) -> ScalarHead:
        head = self.add_head(name, trainable)
        head.load_state_dict(heads.read(path))
        return head

    def save_head(self, name: str, path: str | Path) -> None:
        heads.write(self.heads[name], path)

    # --- forward --------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @property
    def causal_lm(self):
        """The underlying transformers model (peft adapters are injected into its layers in place, ours hook it)."""
        return self.model.get_base_model() if self._peft else self.model

    def forward(self, input_ids, attention_mask, head: str | None = None, shared: dict | None = None):
        """Last hidden states [B, T, H] of the active delta, aligned with ``input_ids`` whatever the method; with
        ``head``, that head's value per token [B, T]. ``shared``: the same batch packed by
        :func:`deltalign.data.sharing.prefix_tree` -- the forward runs on that, and the result is gathered back
        to the batch's shape."""
        if shared is None:
            hidden, _ = self.encode(input_ids, attention_mask)
        else:
            delta = self.deltas[self._active] if self._active in self.deltas else None
            packed = run_shared(self.causal_lm, delta, shared).flatten(0, 1)  # index_select: a cheap backward
            hidden = packed.index_select(0, shared["flat"].reshape(-1)).view(*shared["flat"].shape, -1)
        return self.heads[head](hidden) if head is not None else hidden

    def can_share_prefixes(self) -> bool:
        """Whether batches can run packed with shared prefixes: the attention takes a custom mask (sdpa or eager)."""
        return self.causal_lm.config._attn_implementation in ("sdpa", "eager")

    def encode(self, input_ids, attention_mask, past: Past | None = None, cache: bool = False):
        """``(hidden [B, T, H], past)`` under the active delta: the forward, and with ``cache`` the KV-cache state
        to continue from; given ``past``, continue that sequence by ``input_ids`` (generation)."""
        delta = self.deltas[self._active] if self._active in self.deltas else None
        return run(self.causal_lm, delta, input_ids, attention_mask, past, cache)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the LM head for these hidden states (:func:`deltalign.model.heads.lm_logits`)."""
        return heads.lm_logits(self.causal_lm.get_output_embeddings(), hidden)

    def lm_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    entropy: bool = False, chunked: bool = True):
        """Log-probs of ``targets`` (and the entropy) under the LM head: :func:`deltalign.model.heads.lm_logprobs`."""
        return heads.lm_logprobs(self.causal_lm.get_output_embeddings(), hidden, targets, temperature, entropy,
                                 chunked)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_numel(self) -> int:
        """How many values train (full sizes: under ZeRO-3 a parameter's local tensor is empty)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.trainable_parameters())
