"""Tests for deltalign.core.settings: defaults <- YAML (+ include) <- --set, validation, docs, hashing."""

import json
from dataclasses import dataclass, field

import pytest
import yaml

from deltalign.model.backbone import AdapterConfig, ModelConfig
from deltalign.core import settings as C
from deltalign.pipeline import help as H


@dataclass
class Opt:
    name: str = "adamw"
    """Optimizer name."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""


@dataclass
class Base:
    seed: int = 0
    """Random seed."""
    lr: float = 1e-3
    """Peak learning rate,
    after warmup."""


@dataclass
class Stage(Base):
    lr: float = 2e-4  # new default, docstring inherited from Base
    epochs: int = 1
    """Passes over the data."""
    packing: bool = False
    """Pack short examples."""
    out: str | None = None
    """Output directory; None means the run directory."""
    targets: list[str] | str = "all-linear"
    """Modules that get the delta."""
    extra: dict = field(default_factory=dict)
    """Free-form keyword arguments."""
    opt: Opt = field(default_factory=lambda: Opt(name="sgd"))
    """Optimizer settings."""


@dataclass
class Run:
    name: str = "demo"
    """Run name."""


SECTIONS = {"run": Run, "sft": Stage}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_defaults_include_parent_default_factory():
    cfg = C.load(SECTIONS)
    assert cfg == {"run": Run(), "sft": Stage()}
    assert cfg["sft"].lr == 2e-4 and cfg["sft"].opt == Opt(name="sgd")


def test_yaml_overrides_defaults_and_coerces(tmp_path):
    p = write(tmp_path / "x.yaml", "run: {name: 2024}\nsft:\n  lr: 1e-5\n  epochs: 3\n  opt: {betas: [0.8, 1]}\n")
    cfg = C.load(SECTIONS, p)
    s = cfg["sft"]
    assert cfg["run"].name == "2024"  # a number in a str field becomes its text
    assert s.lr == 1e-5 and isinstance(s.lr, float)  # YAML 1.1 reads "1e-5" as a string
    assert s.epochs == 3 and s.seed == 0
    assert s.opt == Opt(name="sgd", betas=[0.8, 1.0])  # partial nested section merges over the parent default
    assert isinstance(s.opt.betas[1], float)


def test_include_is_loaded_first_and_deep_merged(tmp_path):
    write(tmp_path / "base.yaml", {"run": {"name": "base"},
                                   "sft": {"epochs": 5, "seed": 1, "opt": {"name": "adam"}, "extra": {"a": 1, "b": 2}}})
    p = write(tmp_path / "sub" / "child.yaml", {"include": "../base.yaml",
                                                "sft": {"seed": 7, "opt": {"betas": [0.5, 0.6]}, "extra": {"b": 3}}})
    s = C.load(SECTIONS, p)["sft"]
    assert C.load(SECTIONS, p)["run"].name == "base"
    assert (s.epochs, s.seed) == (5, 7)
    assert s.opt == Opt(name="adam", betas=[0.5, 0.6])
    assert s.extra == {"a": 1, "b": 3}
    write(tmp_path / "base.yaml", {"sft": {"epoch": 5}})
    with pytest.raises(C.ConfigError, match=r"unknown key 'sft.epoch' in .*base\.yaml; did you mean 'sft.epochs'\?"):
        C.load(SECTIONS, p)


def test_include_cycle_and_base_file(tmp_path):
    a = write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(C.ConfigError, match="include cycle"):
        C.load(SECTIONS, a)
    base = write(tmp_path / "default.yaml", {"sft": {"epochs": 4, "seed": 2}})
    p = write(tmp_path / "x.yaml", {"sft": {"seed": 3}})
    s = C.load(SECTIONS, p, base=base)["sft"]
    assert (s.epochs, s.seed) == (4, 3)


def test_set_overrides(tmp_path):
    p = write(tmp_path / "x.yaml", {"sft": {"lr": 0.5, "epochs": 2, "out": "o"}})
    cfg = C.load(SECTIONS, p, ["sft.lr=1e-4", "sft.opt.name=lion", "sft.targets=[q_proj,v_proj]", "sft.packing=true",
                               "sft.out=null", "sft.epochs=3", "sft.epochs=4", "run.name=0123",
                               "sft.opt.betas=[0.1, 0.2]", "sft.extra={k: 1}"])
    s = cfg["sft"]
    assert s.lr == 1e-4 and isinstance(s.lr, float)
    assert s.opt == Opt(name="lion", betas=[0.1, 0.2])
    assert s.targets == ["q_proj", "v_proj"]
    assert s.packing is True and s.out is None and s.epochs == 4 and s.extra == {"k": 1}
    assert cfg["run"].name == "0123"  # a str field keeps the raw text (YAML 1.1 would read 83)
    assert C.load(SECTIONS, overrides=["sft.targets=all-linear"])["sft"].targets == "all-linear"


@pytest.mark.parametrize("item, message", [
    ("sft.epochs=abc", "sft.epochs: expected int, got 'abc'"),
    ("sft.epochs=1.5", "sft.epochs: expected int, got 1.5"),
    ("sft.epochs=null", "sft.epochs: expected int, got None"),
    ("sft.epochs=true", "sft.epochs: expected int, got True"),
    ("sft.lr=false", "sft.lr: expected float, got False"),
    ("sft.targets={a: 1}", "sft.targets: expected list[str] | str, got {'a': 1}"),
    ("sft.lr=abc", "sft.lr: expected float, got 'abc'"),
    ("sft.packing=maybe", "sft.packing: expected bool, got 'maybe'"),
    ("sft.opt.betas=[0.1, x]", "sft.opt.betas[1]: expected float, got 'x'"),
    ("sft.opt=3", "sft.opt: expected a mapping"),
])
def test_set_rejects_wrong_types(item, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(SECTIONS, overrides=[item])
    assert message in str(e.value) and "--set" in str(e.value)


def test_set_needs_key_value():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(SECTIONS, overrides=["sft.lr"])


def test_unknown_key_names_key_source_and_suggestion(tmp_path):
    p = write(tmp_path / "configs" / "x.yaml", {"sft": {"learning_rate": 1e-4}})
    with pytest.raises(C.ConfigError) as e:
        C.load(SECTIONS, p)
    assert str(e.value) == f"unknown key 'sft.learning_rate' in {p}; did you mean 'sft.lr'?"
    with pytest.raises(C.ConfigError) as e:
        C.load(SECTIONS, overrides=["sft.opt.nme=x"])
    assert str(e.value) == "unknown key 'sft.opt.nme' in --set; did you mean 'sft.opt.name'?"


def test_unknown_section(tmp_path):
    p = write(tmp_path / "x.yaml", {"sfft": {"lr": 1}})
    with pytest.raises(C.ConfigError, match=r"unknown section 'sfft' in .*x\.yaml; did you mean 'sft'\?"):
        C.load(SECTIONS, p)
    with pytest.raises(C.ConfigError, match="unknown section 'zzz' in --set; valid: run, sft"):
        C.load(SECTIONS, overrides=["zzz.beta=0.1"])


def test_to_dict_from_dict_and_yaml_round_trip(tmp_path):
    cfg = C.load(SECTIONS, overrides=["sft.lr=3e-4", "sft.opt.name=lion", "sft.targets=[a]", "sft.extra={x: [1]}"])
    d = C.to_dict(cfg)
    assert d["sft"]["opt"] == {"name": "lion", "betas": [0.9, 0.999]}
    assert json.loads(json.dumps(d)) == d
    assert C.from_dict(Stage, d["sft"]) == cfg["sft"]
    assert C.load(SECTIONS, write(tmp_path / "resolved.yaml", C.dump_yaml(cfg))) == cfg
    with pytest.raises(C.ConfigError, match="unknown key 'sft.bogus' in saved"):
        C.from_dict(Stage, {"bogus": 1}, "saved", "sft")


def test_field_docs_inherited_and_nested():
    docs = H.field_docs(Stage)
    assert list(docs) == ["seed", "lr", "epochs", "packing", "out", "targets", "extra", "opt", "opt.name", "opt.betas"]
    assert docs["seed"] == "Random seed."
    assert docs["lr"] == "Peak learning rate,\nafter warmup."  # inherited, though Stage redeclares lr
    assert docs["opt"] == "Optimizer settings." and docs["opt.betas"] == "Adam betas."
    text = H.help_text("sft", Stage)
    assert text.splitlines()[0] == "sft:"
    assert any(line.startswith("  sft.lr = 0.0002") and line.endswith("Peak learning rate, after warmup.")
               for line in text.splitlines())
    assert "  sft.opt.name = sgd" in text and "sft.out = null" in text and 'sft.opt.betas = [0.9, 0.999]' in text


def test_hashed_dict_leaves_out_settings_marked_not_hashed():
    from deltalign.training.train_config import TrainConfig

    a, b = TrainConfig(), TrainConfig(threads=2, log_every=1, checkpoint_every=3, keep_checkpoints=9)
    assert C.hashed_dict(a) == C.hashed_dict(b)
    assert "threads" not in C.hashed_dict(a) and "lr" in C.hashed_dict(a)
    assert C.hashed_dict(TrainConfig(lr=1e-3)) != C.hashed_dict(a)
    m = C.hashed_dict(ModelConfig())
    assert "gradient_checkpointing" not in m and "path" in m
    text = H.help_text("sft", TrainConfig)
    assert any("sft.threads" in ln and "(not hashed" in ln for ln in text.splitlines())
    assert not any("sft.lr " in ln and "not hashed" in ln for ln in text.splitlines())


def test_real_backbone_configs(tmp_path):
    secs = {"model": ModelConfig, "adapter": AdapterConfig}
    p = write(tmp_path / "m.yaml", {"model": {"path": "tiny"}, "adapter": {"r": 8}})
    cfg = C.load(secs, p, ["adapter.target_modules=[q_proj,v_proj]", "adapter.dropout=0", "model.dtype=bfloat16"])
    assert cfg["model"] == ModelConfig(path="tiny", dtype="bfloat16")
    a = cfg["adapter"]
    assert (a.r, a.alpha, a.target_modules) == (8, 32, ["q_proj", "v_proj"])
    assert a.dropout == 0.0 and isinstance(a.dropout, float)
    assert H.field_docs(AdapterConfig)["r"] == "LoRA rank."
    assert "  model.trust_remote_code = false" in H.help_text("model", ModelConfig)
    text = H.help_text("adapter", AdapterConfig)
    assert "  adapter.target_modules = all-linear   Modules that get the delta: all-linear (every" in text
    with pytest.raises(C.ConfigError, match="did you mean 'adapter.r'"):
        C.load(secs, overrides=["adapter.rank=4"])


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("selective", "selective"),
                                             ("auto", "auto")])
def test_gradient_checkpointing_is_on_off_or_selective(value, expected):
    secs = {"model": ModelConfig}
    assert C.load(secs, overrides=[f"model.gradient_checkpointing={value}"])["model"].gradient_checkpointing == expected


def test_gradient_checkpointing_rejects_other_words():
    with pytest.raises(C.ConfigError) as e:
        C.load({"model": ModelConfig}, overrides=["model.gradient_checkpointing=sometimes"])
    assert "model.gradient_checkpointing: expected bool | 'selective' | 'auto', got 'sometimes'" in str(e.value)
