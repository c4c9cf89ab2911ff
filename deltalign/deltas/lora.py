"""LoRA and DoRA: peft's implementation, on the backbone's one PeftModel; this module translates our settings.

peft's LoRA family is the only group of adapter types that peft mixes on one model, so every other method is ours
(:mod:`deltalign.deltas.base`); a LoRA/DoRA adapter and our deltas coexist on one backbone, and the Backbone turns
peft's adapter layers off while one of ours is active. Folders saved by peft (``peft_type`` LORA, or IA3 from
deltalign versions before our own ia3) load through peft as before.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deltalign.core.quiet import peft_wrapping
from deltalign.deltas.config import AdapterConfig
from deltalign.core.atomic import crash_point, save_tensors


def peft_config(cfg: AdapterConfig):
    """Our adapter config as a peft config object (lora, dora)."""
    from peft import LoraConfig

    if cfg.method not in ("lora", "dora"):
        raise ValueError(f"adapter.method {cfg.method!r} is not implemented by peft here")
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        use_dora=cfg.method == "dora", bias="none", task_type="CAUSAL_LM",
    )


def method_of_peft(conf: dict) -> str:
    """The method of a folder saved by peft, from its adapter_config.json."""
    kind = str(conf.get("peft_type", "")).upper()
    if kind == "LORA":
        return "dora" if conf.get("use_dora") else "lora"
    if kind == "IA3":
        return "ia3"
    raise ValueError(f"unsupported peft adapter type {kind or '?'!r} (deltalign loads LORA and IA3 peft folders)")


class MaskDropout(torch.nn.Dropout):
    """nn.Dropout's semantics (train mode: zero each element with probability p, scale the rest by 1 / (1 - p);
    eval: identity), on the CPU from 16 random bits per element (four per 64-bit draw) compared with p rounded to
    1/65536, kept as a bool mask for the backward. peft's ``lora_dropout`` is an nn.Dropout, whose CPU kernel draws
    a float Bernoulli mask one element at a time: on 150-700-token rows the slowest op of a LoRA step after the
    matmuls (bench/README.md). On a GPU, torch's own fused dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        drop = round(self.p * 65536)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= drop - 32768
        return torch.where(keep, x, 0.0).mul_(65536 / (65536 - drop))


def mask_dropout(model, name: str):
    """``model`` with adapter ``name``'s peft dropout modules (p > 0) replaced by :class:`MaskDropout`."""
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        old = drops[name] if isinstance(drops, torch.nn.ModuleDict) and name in drops else None
        if type(old) is torch.nn.Dropout and old.p > 0:
            drops[name] = MaskDropout(old.p)
            drops[name].train(old.training)
    return model


def add(model, name: str, config):
    """``model`` with a fresh peft adapter ``name``: wrapped into a PeftModel the first time, then added to it."""
    from peft import get_peft_model

    if not hasattr(model, "peft_config"):
        with peft_wrapping():
            return mask_dropout(get_peft_model(model, config, adapter_name=name), name)
    model.add_adapter(name, config)
    return mask_dropout(model, name)


def load(model, name: str, path: Path, trainable: bool):
    """``model`` with the peft adapter saved in ``path`` loaded as ``name``."""
    from peft import PeftModel

    if not hasattr(model, "peft_config"):
        with peft_wrapping():
            return mask_dropout(PeftModel.from_pretrained(model, str(path), adapter_name=name,
                                                          is_trainable=trainable), name)
    model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    return mask_dropout(model, name)


def save(model, name: str, out_dir: str | Path, state: dict | None = None) -> None:
    """Adapter ``name`` of a PeftModel in PEFT format, ``adapter_model.safetensors`` at the top level of ``out_dir``
    (peft's own save_pretrained would put an adapter not named ``default`` in a subfolder)."""
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crash_point(f"write {out / 'adapter_config.json'}")
    model.peft_config[name].save_pretrained(out)
    if state is None:
        state = get_peft_model_state_dict(model, adapter_name=name)
    save_tensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / "adapter_model.safetensors")
