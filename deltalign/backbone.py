"""One frozen base model in memory, with named delta adapters and small named heads on top.

Every stage trains only deltas on this object: a LoRA/DoRA/IA3 adapter (through peft's named-adapter API) and,
for the reward model and critic, a scalar head. The base weights are loaded once, frozen, and never written.

Trainability is owned here, not by peft: peft's ``set_adapter`` makes the adapter it activates trainable (even one
loaded frozen), so :meth:`Backbone.activate` always activates in inference mode and then re-applies the
``requires_grad`` flags this class recorded. An adapter is trainable only if it was added or loaded as trainable.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from deltalign.pipeline.config import setting

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
    gradient_checkpointing: bool = setting(False, hashed=False)
    """Recompute activations in backward (non-reentrant) to save memory."""


@dataclass
class AdapterConfig:
    method: Literal["lora", "dora", "ia3"] = "lora"
    """Delta method: ``lora``, ``dora`` (weight-decomposed LoRA) or ``ia3`` (learned rescaling vectors)."""
    r: int = setting(16, ge=1)
    """LoRA rank."""
    alpha: int = setting(32, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = setting(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Modules that get the delta: ``all-linear`` (every linear layer but the LM head) or a list of names."""


def peft_config(cfg: AdapterConfig):
    """Translate our adapter config into a peft config object."""
    from peft import IA3Config, LoraConfig

    if cfg.method in ("lora", "dora"):
        return LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
            use_dora=cfg.method == "dora", bias="none", task_type="CAUSAL_LM",
        )
    if cfg.method == "ia3":
        targets = None if cfg.target_modules == "all-linear" else cfg.target_modules
        ff = None if targets is None else [t for t in targets if "mlp" in t or t in ("down_proj", "up_proj")]
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    raise ValueError(f"adapter.method must be one of lora, dora, ia3 (got {cfg.method!r})")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer and give it a pad token distinct from EOS, so EOS is never masked as padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        spare = [t for t in (tok.unk_token, "<|endoftext|>", "<pad>") if t in vocab and vocab[t] != tok.eos_token_id]
        if not spare:
            raise ValueError(f"{path}: tokenizer has pad == eos and no spare special token to pad with")
        tok.pad_token = spare[0]
    return tok


def resolve_path(path: str) -> Path:
    if path == "tiny":
        from deltalign import tiny

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
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    for m in model.modules():
        # bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight IN PLACE (bf16 scales) at its first
        # eval-mode forward without grad: the frozen base would change, a reference forward would differ from a
        # training forward, and layers narrower than a quantisation block fail. Keep one representation.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    model.eval()  # no dropout in the frozen base; adapters have their own dropout switched by train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, load_tokenizer(path, cfg.trust_remote_code)


class ScalarHead(nn.Module):
    """A linear map from the last hidden state to one number: reward-model score or critic value."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class Backbone(nn.Module):
    """The frozen base + named adapters + named heads, as one module that accelerate/DeepSpeed can prepare."""

    def __init__(self, model, tokenizer, cfg: ModelConfig | None = None):
        super().__init__()
        self.model = model  # a PreTrainedModel, then a PeftModel once the first adapter is attached
        self.tokenizer = tokenizer
        self.cfg = cfg or ModelConfig()
        self.heads = nn.ModuleDict()
        self.trainable: set[str] = set()

    @classmethod
    def load(cls, cfg: ModelConfig) -> "Backbone":
        model, tok = load_base(cfg)
        return cls(model, tok, cfg)

    # --- adapters -------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    def add_adapter(self, name: str, cfg: AdapterConfig, trainable: bool = True) -> None:
        """Attach a fresh adapter called ``name``."""
        from peft import get_peft_model

        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already attached")
        if not self.adapters:
            self.model = get_peft_model(self.model, peft_config(cfg), adapter_name=name)
        else:
            self.model.add_adapter(name, peft_config(cfg))
        self._mark(name, trainable)

    def load_adapter(self, name: str, path: str | Path, trainable: bool = False) -> None:
        """Load a saved PEFT adapter as ``name``: frozen by default (a reference), or trainable (a copy to train).
        Only ``adapter_model.safetensors`` is read: a pickled ``adapter_model.bin`` is refused."""
        from peft import PeftModel

        weights = Path(path) / "adapter_model.safetensors"
        if not weights.is_file():
            pickled = " (it has a pickled adapter_model.bin, which deltalign never loads)" \
                if (Path(path) / "adapter_model.bin").exists() else ""
            raise FileNotFoundError(f"{path}: no adapter_model.safetensors{pickled}")

        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=trainable)
        else:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        self._mark(name, trainable)

    def _mark(self, name: str, trainable: bool) -> None:
        (self.trainable.add if trainable else self.trainable.discard)(name)
        self.activate(name)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        key = f".{name}."
        return {n: p for n, p in self.model.named_parameters() if key in n or n.endswith(f".{name}")}

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter used in forward passes. Never changes which parameters train."""
        self.model.set_adapter(name, inference_mode=True)
        self._apply_trainable()

    @property
    def active(self) -> str | None:
        return self.model.active_adapter if self.adapters else None

    @contextlib.contextmanager
    def using(self, name: str | None):
        """Run a block with adapter ``name`` active (``None``: all adapters off), then restore the previous one."""
        previous = self.active
        if name is None and not self.adapters:
            yield
            return
        if name is None:
            with self.model.disable_adapter():
                yield
            return
        self.activate(name)
        try:
            yield
        finally:
            if previous is not None:
                self.activate(previous)

    def _apply_trainable(self) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(False)
        for name in self.trainable:
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(True)

    def save_adapter(self, name: str, out_dir: str | Path, state: dict | None = None) -> None:
        """Write adapter ``name`` in PEFT format into ``out_dir`` (``adapter_model.safetensors`` at the top level)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = self.model.peft_config[name]
        config.save_pretrained(out)
        if state is None:
            state = get_peft_model_state_dict(self.model, adapter_name=name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / "adapter_model.safetensors")

    # --- heads ----------------------------------------------------------------------------------------------
    def add_head(self, name: str, trainable: bool = True) -> ScalarHead:
        head = ScalarHead(self.hidden_size)
        head.requires_grad_(trainable)
        self.heads[name] = head
        return head

    def load_head(self, name: str, path: str | Path, trainable: bool = False) -> ScalarHead:
        from safetensors.torch import load_file

        head = self.add_head(name, trainable)
        head.load_state_dict(load_file(str(path)))
        return head

    def save_head(self, name: str, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads[name].state_dict().items()}, str(path))

    # --- forward --------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @property
    def causal_lm(self):
        """The underlying transformers model (adapters are injected into its layers in place)."""
        return self.model.get_base_model() if self.adapters else self.model

    def forward(self, input_ids, attention_mask, head: str | None = None):
        """Last hidden states [B, T, H] of the active adapter; with ``head``, that head's value per token [B, T]."""
        out = self.causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        return self.heads[head](hidden) if head is not None else hidden

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits in float32 for the hidden states given (select positions first: the head is the cost)."""
        return self.causal_lm.get_output_embeddings()(hidden).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_numel(self) -> int:
        """How many values train (full sizes: under ZeRO-3 a parameter's local tensor is empty)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.trainable_parameters())

    def train_without_dropout(self) -> "Backbone":
        """Training mode with every dropout off (see :func:`train_without_dropout`)."""
        return train_without_dropout(self)


def train_without_dropout(module: nn.Module) -> nn.Module:
    """Training mode (gradient checkpointing, which transformers runs only in training mode, stays on) with
    every dropout off: LoRA dropout modules and attention dropout. A stage's ``disable_dropout`` setting calls
    this: the trained forward is then the same function as a reference or old-policy forward in eval mode."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.Dropout) or hasattr(m, "attention_dropout"):
            m.eval()
    return module


def train_mode(module: nn.Module, dropout: bool = True) -> nn.Module:
    """Training mode, with every dropout off unless ``dropout`` (a stage's ``disable_dropout`` setting)."""
    return module.train() if dropout else train_without_dropout(module)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode for the block, then EACH module's own training flag back -- not one ``train(flag)`` for the
    whole tree, which would switch every dropout back on after :func:`train_without_dropout`. Every place that
    evaluates inside a training run uses this (scoring, reference log-probs, held-out loss, generation)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def labelled_logits(backbone, model, batch: dict):
    """LM logits only at positions that predict a label: ``(logits [N, V], targets [N], rows [N])``.

    ``model`` is the (possibly accelerate-prepared) callable wrapping ``backbone``. ``batch['labels']`` is aligned
    with ``input_ids`` (-100 on prompt and pad); position t predicts label t+1. Skipping the LM head on prompt
    and pad positions saves most of its cost (vocab x hidden per token).
    """
    hidden = model(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    return backbone.lm_logits(hidden[:, :-1][mask]), labels[mask], rows


def response_logprobs(backbone, model, batch: dict) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled (response) tokens: shape [B]."""
    from deltalign.losses import token_logprobs

    logits, targets, rows = labelled_logits(backbone, model, batch)
    token_lp = token_logprobs(logits, targets)
    n_rows = batch["labels"].shape[0]
    return torch.zeros(n_rows, dtype=token_lp.dtype, device=token_lp.device).index_add(0, rows, token_lp)
