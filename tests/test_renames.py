"""Renamed settings (issue 35 goal 2): the old key keeps working for one release with a one-line notice, TRL's
names stay accepted without one, and a run directory made before a rename stays up to date (its content hash
does not move)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deltalign.core import settings
from deltalign.core.fingerprints import sha256_json
from deltalign.core.settings import ConfigError, setting
from deltalign.pipeline.graph import sections

ROOT = Path(__file__).resolve().parents[1]

# sha256 of each section's hashed settings for configs/tiny.yaml, recorded at 526d419 (before the renames of
# issue 35: `<stage>.adapter`, `ppo.critic_adapter`, `export.adapter_only`, `grpo.beta`, `*_epochs`). A rename
# must keep these; a new setting changes them on purpose (record the new value in the same commit).
BEFORE_RENAMES = {
    "sft": "e567e32a06288cbfbc2ccbef71a66f2ed2a53cc3ead0235d540fe0b2d98b1e6a",
    "rm": "5ab58bcd4453a813844bd4646602ab34a9c34c2661007c59b56f4e66e42e51cc",
    "dpo": "214c1e647ef4e5d610df4d4634d70f6cd30f585beed7d7e631748bbeaa7c8fa8",
    "kto": "e5944bdf86e792a0708205ee3ee6291a128ef34595aafe510a5efb1a772a7e14",
    "ppo": "25456f65b86fc44879046b6aa15097f86d3b6d5b73effaeb519ee468f196d18b",
    "grpo": "c13bac82959d57a61894cdf92e91d793bf8037bb1059a49c6a5f17bb6c11a801",
    "export": "a606e91850fd54a1fa89cbf511f9c30a62bfec8ae0e41099cafcc053ab04df05",
}


@dataclasses.dataclass
class Inner:
    r: int = 4


@dataclasses.dataclass
class Section:
    delta: Inner = setting(factory=Inner, formerly="adapter")
    kl_coef: float = setting(0.0, ge=0, formerly="beta", keep_former=True)
    plain: int = 1


def _load(tmp_path, text, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return settings.load({"s": Section}, str(p), list(overrides))["s"]


def test_a_former_key_loads_with_one_notice(tmp_path, capsys):
    settings.NOTICED.clear()
    s = _load(tmp_path, "s:\n  adapter: {r: 8}\n")
    assert s.delta.r == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deltalign: `s.adapter` is now `s.delta`; the old name is accepted until the next release "
                   f"(in {tmp_path / 'c.yaml'})"]
    _load(tmp_path, "s:\n  adapter: {r: 8}\n")
    assert capsys.readouterr().err == ""  # once per process


def test_a_former_key_in_an_override(tmp_path, capsys):
    settings.NOTICED.clear()
    s = _load(tmp_path, "s: {plain: 2}\n", ["s.adapter.r=16"])
    assert s.delta.r == 16 and "`s.adapter` is now `s.delta`" in capsys.readouterr().err


def test_a_kept_name_loads_without_notice(tmp_path, capsys):
    settings.NOTICED.clear()
    assert _load(tmp_path, "s:\n  beta: 0.04\n").kl_coef == 0.04
    assert capsys.readouterr().err == ""


def test_both_names_at_once_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"s\.adapter and s\.delta are one setting .*keep s\.delta"):
        _load(tmp_path, "s:\n  adapter: {r: 8}\n  delta: {r: 4}\n")


def test_a_later_layer_with_the_new_name_wins(tmp_path):
    s = _load(tmp_path, "s:\n  adapter: {r: 8}\n", ["s.delta.r=2"])
    assert s.delta.r == 2


def test_the_hash_reads_the_former_name():
    """Both spellings hash alike, and as before the rename."""
    d = settings.hashed_dict(Section())
    assert "adapter" in d and "delta" not in d and "beta" in d and "kl_coef" not in d


def test_run_directories_from_before_the_renames_stay_up_to_date():
    cfgs = settings.load(sections(), str(ROOT / "configs/tiny.yaml"))
    now = {name: sha256_json(settings.hashed_dict(cfgs[name])) for name in BEFORE_RENAMES}
    assert now == BEFORE_RENAMES


def test_an_old_run_config_still_loads(tmp_path, capsys):
    """A run directory's config.yaml written before the renames (old keys) loads to the same settings."""
    settings.NOTICED.clear()
    old = tmp_path / "config.yaml"
    old.write_text("include: " + str(ROOT / "configs/tiny.yaml") + "\nsft:\n  adapter: {r: 8}\n"
                   "ppo:\n  critic_adapter: {r: 2}\n  ppo_epochs: 3\nexport:\n  adapter_only: false\n"
                   "grpo:\n  beta: 0.02\n  grpo_epochs: 2\n")
    cfgs = settings.load(sections(), str(old))
    assert cfgs["sft"].delta.r == 8 and cfgs["ppo"].critic_delta.r == 2 and cfgs["ppo"].passes == 3
    assert cfgs["export"].copy_delta is False and cfgs["grpo"].kl_coef == 0.02 and cfgs["grpo"].passes == 2
    err = capsys.readouterr().err
    assert "`sft.adapter` is now `sft.delta`" in err and "grpo.beta" not in err
    assert "`ppo.ppo_epochs` is now `ppo.passes`" in err
    assert "`export.adapter_only` is now `export.copy_delta`" in err


def test_help_names_the_former_name():
    from deltalign.pipeline.help import help_text
    text = help_text("s", Section)
    assert "(also `adapter`, its former name, until the next release)" in text
    assert "(also `beta`)" in text
