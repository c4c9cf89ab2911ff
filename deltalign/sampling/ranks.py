"""Which processes run generation, evaluation and saving, and what they gather, under ZeRO-3.

ZeRO-3 shards every parameter, the frozen base included, so code that would run on rank 0 alone needs either the
full weights or every rank taking part. The engine's ``generating``, ``evaluating`` and ``save_delta`` are these;
``engine.cfg.zero3_generation`` chooses between ``lockstep`` (nothing gathered: every process runs the same
forwards, :func:`deltalign.sampling.generation.in_lockstep`) and ``gather`` (the full weights gathered for the duration).
Without ZeRO-3 each is the plain single-process behaviour.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from deltalign.sampling import generation
from deltalign.zero import gathered, gathered_parameters


def lockstep(engine) -> bool:
    """ZeRO-3 with ``zero3_generation: lockstep``: generation and evaluation run on every process, sharded."""
    return engine.zero_stage == 3 and engine.cfg.zero3_generation == "lockstep" and hasattr(engine, "model")


@contextlib.contextmanager
def generating(engine):
    """Every process must enter this together; inside, each process generates (and scores) its own rows.
    ``gather``: the full weights are gathered, ZeRO-3's hooks off; ``lockstep``: nothing is gathered and
    :func:`deltalign.sampling.generation.generate` keeps the processes' decoding loops in step (one forward each, every
    token, until all are done)."""
    if engine.zero_stage != 3 or not hasattr(engine, "model"):
        yield
    elif lockstep(engine):
        with generation.in_lockstep(engine.processes.all_true, engine.processes.max_int):
            yield
    else:
        with gathered(engine.model, engine.backbone):
            yield


@contextlib.contextmanager
def evaluating(engine, forwards: bool = True):
    """Every process must enter this together. Yields whether this process runs the evaluation code: rank 0 only
    (``gather``: with the full weights gathered), or under ``lockstep`` every process, on the same rows (the
    forwards are collective; the results are the same). Writing stays rank 0's. ``forwards=False``: there is
    nothing to evaluate (the block runs no forward): rank 0 runs it, nothing is gathered."""
    if not forwards:
        yield engine.is_main
        return
    with generating(engine):
        yield engine.is_main or lockstep(engine)


def save_delta(engine, name: str, out_dir: str | Path, head_file: str | Path | None = None) -> None:
    """Every process must call it. Write delta ``name`` (and, with ``head_file``, its scalar head) from rank 0;
    under ZeRO-3 only these parameters are gathered, never the base."""
    bb = engine.backbone
    params = list(bb.adapter_parameters(name).values())
    if head_file is not None:
        params += list(bb.heads[name].parameters())
    with gathered_parameters(params, engine.zero_stage):
        if engine.is_main:
            bb.save_adapter(name, out_dir)
            if head_file is not None:
                bb.save_head(name, head_file)
