"""What can compose: finished deltas as the sources of ``compose`` (its weighted merges, and the learned gates of
:mod:`deltalign.deltas.fusion`).

What composes: LoRA deltas (peft's, ``peft_type: LORA`` without DoRA, rsLoRA, a bias on ``lora_B``, whole modules
to save or targeted parameters), all trained on the one base they are composed on, none a reward model (a scalar
head would need composing too). Everything else is refused by :func:`inspect_source` with the reason
(:data:`NOT_COMPOSABLE`): a weighted merge is a sum of low-rank weight updates ``scale * B @ A``, and only LoRA's
output is one. A source must also be trained on the base it is composed on (:func:`same_base`: the same folder
or the same files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from deltalign.deltas.base import CONFIG_FILE, WEIGHTS_FILE, read_config
from deltalign.core import verify
from deltalign.core.fingerprints import sha256_file

HEAD_FILE = "head.safetensors"  # a reward model's scalar head (deltalign.rewards.model.HEAD_FILE)

NOT_COMPOSABLE = {
    "dora": "DoRA divides each adapted weight by its column norm and multiplies by a learned magnitude, so its "
            "output is not linear in the low-rank update: no weighted sum of DoRA deltas is exact, and peft's "
            "add_weighted_adapter does not carry the magnitudes",
    "ia3": "IA3 rescales activations by learned vectors (a multiplicative change, not a low-rank weight update "
           "whose outputs add)",
    "ln": "LN tuning changes norm weights (a multiplicative change inside the normalisation, not a low-rank "
          "weight update whose outputs add)",
    "prefix": "prefix tuning adds key/value positions to attention: there is no per-module output to weight, and "
              "softmax attention over two prefixes is not the sum of attending to each",
    "prompt": "prompt tuning adds input positions: there is no per-module output to weight",
    "bottleneck": "a bottleneck adapter is a non-linear block in the residual stream, not a low-rank weight update",
}


@dataclass
class Source:
    """A finished delta to compose: where it is, what it is, which base it was trained on."""
    key: str  # how errors name it: "compose.sources[1] (runs/x/dpo)"
    path: Path
    method: str
    base: str
    rank: int
    conf: dict = field(repr=False)

    def record(self) -> dict:
        return {"path": str(self.path.resolve()), "sha256": sha256_file(self.path / WEIGHTS_FILE), "rank": self.rank}


def inspect_source(path: str | Path, key: str) -> Source:
    """The delta in ``path``, or a ValueError naming ``key`` that says why it cannot compose."""
    from deltalign import deltas

    path = Path(path)
    try:
        conf = read_config(path)
        method = deltas.method_of(path)
    except FileNotFoundError:
        raise ValueError(f"{key}: not an adapter folder (no {CONFIG_FILE}); give a finished stage of this run or "
                         "the folder a stage wrote its delta to") from None
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}: {e}") from None
    if not (path / WEIGHTS_FILE).is_file():
        pickled = ", only a pickled adapter_model.bin" if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{key}: no {WEIGHTS_FILE}{pickled} (deltalign reads safetensors only)")
    if why := verify.safetensors_problem(path / WEIGHTS_FILE):
        raise ValueError(f"{key}: {path / WEIGHTS_FILE}: {why}")
    if (path / HEAD_FILE).exists():
        raise ValueError(f"{key}: a reward model (it has a scalar head, {HEAD_FILE}); compose combines policy "
                         "deltas only -- composing reward models would need their heads composed too")
    if method != "lora":
        reason = NOT_COMPOSABLE.get(method, "not a LoRA delta")
        name = "DoRA" if method == "dora" else method
        raise ValueError(f"{key}: a {name} delta; compose combines only LoRA deltas: {reason}")
    problems = [why for bad, why in (
        (conf.get("use_rslora"), "rsLoRA scaling (peft's merge would give the result the wrong scale)"),
        (conf.get("lora_bias"), "a bias on lora_B (not part of a low-rank update)"),
        (conf.get("modules_to_save"), "whole modules to save (they cannot be weighted)"),
        (conf.get("target_parameters"), "targeted parameters (peft cannot merge those)"),
    ) if bad]
    if problems:
        raise ValueError(f"{key}: a LoRA delta with {'; '.join(problems)}: not composable")
    ranks = [int(conf.get("r", 0)), *map(int, (conf.get("rank_pattern") or {}).values())]
    return Source(key, path, method, str(conf.get("base_model_name_or_path") or ""), max(ranks), conf)


def _normalised(path: str) -> Path | None:
    """An existing base model directory for a recorded or configured model path (``tiny`` built on demand)."""
    if path == "tiny":
        from deltalign.core import tiny

        return tiny.ensure().resolve()
    p = Path(path)
    return p.resolve() if p.is_dir() else None


def same_base(recorded: str, model_path: str) -> bool:
    """Whether a delta recorded as trained on ``recorded`` belongs to the base at ``model_path``: the same folder,
    or folders with the same files (by content); when the recorded folder no longer exists here, the same folder
    name (a weaker check: a moved run directory still composes)."""
    a, b = _normalised(recorded), _normalised(model_path)
    if a is not None and b is not None:
        if a == b:
            return True
        from deltalign.core.fingerprints import model_fingerprint

        return model_fingerprint(str(a)) == model_fingerprint(str(b))
    if not recorded:
        return True  # a folder written without a base path: nothing to compare (shapes are still checked)
    name_a = a.name if a is not None else Path(recorded).name
    name_b = b.name if b is not None else Path(model_path).name
    return name_a == name_b


def check_base(sources: list[Source], model_path: str) -> None:
    for s in sources:
        if not same_base(s.base, model_path):
            raise ValueError(f"{s.key}: trained on a different base model ({s.base}) than model.path "
                             f"({model_path}); a delta only means something on the base it was trained on")


def load_sources(backbone, paths: list[str | Path], keys: list[str] | None = None) -> list[str]:
    """Load the LoRA deltas in ``paths`` frozen as ``source0``, ``source1``, ...; their adapter names."""
    names = []
    for i, p in enumerate(paths):
        name = f"source{i}"
        try:
            backbone.load_adapter(name, p, trainable=False)
        except RuntimeError as e:  # peft: size mismatch -> another architecture
            key = keys[i] if keys else str(p)
            raise ValueError(f"{key}: does not fit this base model ({str(e).splitlines()[0]})") from None
        names.append(name)
    return names
