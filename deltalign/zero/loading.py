"""Loading the base under ZeRO-3 partitioned from the start: no process holds more of it than its own partition
plus the model's small buffers. (transformers' own ZeRO-3 loading has rank 0 map every checkpoint file at once.)"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch

def sharded_loading() -> bool:
    """Whether a base loaded now is built partitioned (the engine turned transformers' ZeRO-3 mode on)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_index(path: Path) -> dict[str, tuple[Path, int, int, str, list[int]]]:
    """Every tensor of a checkpoint directory: name -> (file, byte offset, byte size, dtype, shape), from the
    safetensors headers alone (``model.safetensors``, or the shards ``model.safetensors.index.json`` names)."""
    index_file = path / "model.safetensors.index.json"
    files = (sorted({path / f for f in json.loads(index_file.read_text())["weight_map"].values()})
             if index_file.is_file() else [path / "model.safetensors"])
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, e in header.items():
            if name != "__metadata__":
                start, end = e["data_offsets"]
                out[name] = (f, 8 + n + start, end - start, e["dtype"], e["shape"])
    return out


def read_tensor(entry: tuple[Path, int, int, str, list[int]], start: int = 0, count: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor, read with plain file reads (no memory map: the process holds what it read and nothing else of
    the file); with ``start``/``count``, only that range of its flattened elements (1-D). With ``out`` (1-D,
    ``count`` elements, the file's dtype), the bytes go straight into it: no temporary."""
    f, offset, size, dtype, shape = entry
    dt = SAFETENSORS_DTYPES[dtype]
    whole = count is None
    if whole:
        start, count = 0, size // max(dt.itemsize, 1)
    if out is None:
        out = torch.empty(count, dtype=dt)
    if count:
        with open(f, "rb", buffering=0) as fh:
            fh.seek(offset + start * dt.itemsize)
            fh.readinto(memoryview(out.numpy()).cast("B"))  # numpy: a writable view of the tensor's memory
    return out.reshape(shape) if whole else out


@contextlib.contextmanager
def _built_unfilled():
    """Inside, a model built under ``deepspeed.zero.Init`` gets its partitions and no values: every value is read
    from the checkpoint afterwards. Without this, building it costs what loading it saves: zero.Init broadcasts
    each parameter whole from rank 0 before partitioning it (each rank writes the full tensor), and transformers
    then gathers every module whole to initialise it randomly (the vocabulary table whole on every rank: the
    1B bench model's ranks peaked 0.8 GB above their loaded size, and loading took several times as long)."""
    import transformers.integrations.deepspeed as hf_ds
    from deepspeed.runtime.zero.partition_parameters import Init
    from transformers.initialization import no_init_weights

    def partition_only(self, param):  # Init._zero_init_param less its broadcast
        self._convert_to_deepspeed_param(param)
        param.partition()

    saved = hf_ds.initialize_weights_zero3, Init._zero_init_param
    hf_ds.initialize_weights_zero3, Init._zero_init_param = (lambda model: None), partition_only
    try:
        with no_init_weights():
            yield
    finally:
        hf_ds.initialize_weights_zero3, Init._zero_init_param = saved


def load_sharded(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """The base under ZeRO-3 without any process holding more of it than its own partition: built partitioned
    (transformers wraps ``from_config`` in ``deepspeed.zero.Init`` when ZeRO-3 is on), then every process reads,
    for each parameter, only the range of its flattened values that ZeRO-3 keeps on that process (a contiguous
    byte range of the safetensors file) straight into its partition: nothing is gathered, no process reads the
    others' ranges. (transformers' own ZeRO-3 loading has rank 0 map every checkpoint file at once.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with _built_unfilled():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    index = safetensors_index(path)
    params = dict(model.named_parameters())  # tied weights once (lm_head = embed_tokens)
    missing = sorted(set(params) - set(index))
    if missing:
        raise ValueError(f"{path}: the checkpoint has no tensor for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                         " (its names differ from the model's; ZeRO-3 sharded loading needs them to match)")
    with torch.no_grad():
        for name, p in params.items():
            if not hasattr(p, "ds_tensor"):  # not partitioned (ZeRO-3 off for this one): read it whole
                p.copy_(read_tensor(index[name]).to(p.dtype))
                continue
            shape = index[name][4]
            if list(shape) != list(p.ds_shape):
                raise ValueError(f"{path}: tensor {name} has shape {shape}, the model expects {list(p.ds_shape)}")
            part = p.ds_tensor.numel()
            start = torch.distributed.get_rank(group=getattr(p, "ds_process_group", None)) * part
            n = max(0, min(part, p.ds_numel - start))
            local = p.ds_tensor.view(-1)
            if n and SAFETENSORS_DTYPES[index[name][3]] == local.dtype:
                read_tensor(index[name], start, n, out=local[:n])
            elif n:
                local[:n].copy_(read_tensor(index[name], start, n).to(local.dtype))
            local[n:].zero_()  # the last partition's padding
        for name, b in model.named_buffers():  # buffers are not partitioned: every process reads its own
            if name in index:
                b.copy_(read_tensor(index[name]).to(b.dtype))
    from deltalign.core.memory import release_free_memory

    release_free_memory()  # what building the modules allocated and freed
    return model
