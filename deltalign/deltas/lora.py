"""LoRA and DoRA: peft's implementation, on the backbone's one PeftModel; this module translates our settings.

peft's LoRA family is the only group of adapter types that peft mixes on one model, so every other method is ours
(:mod:`deltalign.deltas.base`); a LoRA/DoRA adapter and our deltas coexist on one backbone, and the Backbone turns
peft's adapter layers off while one of ours is active. Folders saved by peft (``peft_type`` LORA, or IA3 from
deltalign versions before our own ia3) load through peft as before.
"""

from __future__ import annotations

from pathlib import Path

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


def add(model, name: str, config):
    """``model`` with a fresh peft adapter ``name``: wrapped into a PeftModel the first time, then added to it."""
    from peft import get_peft_model

    if not hasattr(model, "peft_config"):
        with peft_wrapping():
            return get_peft_model(model, config, adapter_name=name)
    model.add_adapter(name, config)
    return model


def load(model, name: str, path: Path, trainable: bool):
    """``model`` with the peft adapter saved in ``path`` loaded as ``name``."""
    from peft import PeftModel

    if not hasattr(model, "peft_config"):
        with peft_wrapping():
            return PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    return model


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
