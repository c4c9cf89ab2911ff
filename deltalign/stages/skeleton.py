"""The stage skeleton: what every training stage's ``run()`` does around its own loop, written once (not a stage).

    backbone = policy_and_reference(model_cfg, NAME, cfg, upstream)    # dpo, kto: reference frozen, policy a copy
    batches = epoch_batches(lengths, cfg)                              # an epoch's length-grouped micro-batches
    model = engine.prepare(backbone, engine.total_steps(len(batches(0))))
    for step, micro in engine.steps(batches):
        ...                                                             # the stage's own step
    evaluate = report_policies(engine, results, backbone, examples, ...)  # or the stage's own
    return evaluate_and_save(engine, out_dir, results, evaluate, when=..., deltas=[(NAME, out_dir, None)])

:func:`measured_once` is a measurement before training (sft's base, rm's initial head) kept across a resume.
:func:`evaluate_and_save` is the tail: ``evaluate()`` (which fills ``results`` and logs its rows) inside
``engine.evaluating`` -- every process enters it --, then each delta saved (rank 0 writes), ``eval.json`` (and any
other result files) written by the main process, and a wait for every process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import torch

from deltalign.core import atomic, verify
from deltalign.data.batching import length_grouped_batches
from deltalign.model.backbone import Backbone, ModelConfig
from deltalign.reports.evaluation import policy_report, report_scalars
from deltalign.sampling.generation import GenerationConfig
from deltalign.training.engine import Engine

REFERENCE = "sft"  # the reference of a preference stage IS the SFT delta (frozen), under its own name


def policy_and_reference(model_cfg: ModelConfig, name: str, cfg, upstream: dict[str, Path]) -> Backbone:
    """One backbone with a preference stage's two roles: the reference (``cfg.reference: sft``: the SFT delta,
    frozen, as ``sft``; ``base``/``none``: nothing loaded) and the policy ``name`` (``cfg.init: sft``: a trainable
    copy of the SFT delta; ``fresh``: a new ``cfg.delta`` seeded by ``cfg.seed``), the policy active."""
    backbone = Backbone.load(model_cfg)
    if cfg.reference == "sft":
        backbone.load_adapter(REFERENCE, upstream["sft"], trainable=False)
    if cfg.init == "sft":
        backbone.load_adapter(name, upstream["sft"], trainable=True)
    else:
        torch.manual_seed(cfg.seed)
        backbone.add_adapter(name, cfg.delta, trainable=True)
    backbone.activate(name)
    return backbone


def epoch_batches(lengths: list[int], cfg) -> Callable[[int], list[list[int]]]:
    """``batches(epoch)`` for :meth:`Engine.steps`: the rows' indices in micro-batches of ``cfg.batch_size``
    similar lengths, shuffled by ``cfg.seed`` and the epoch (deterministic: every process gets the same)."""
    return functools.partial(length_grouped_batches, lengths, cfg.batch_size, cfg.seed)


def measured_once(engine: Engine, file: Path, measure: Callable[[], dict | None], when: bool = True) -> dict | None:
    """A measurement before training (the base's held-out scores), kept across a resume: read back from ``file``
    when an earlier start of the stage wrote it, else ``measure()`` inside ``engine.evaluating(when)`` (it logs
    its own row) and written to ``file`` by the main process."""
    found, saved = verify.resume_json(file, engine.is_main)  # an unreadable one is set aside: measured again
    if found:
        return saved
    result = None
    with engine.evaluating(when) as evaluating:  # every rank enters (ZeRO-3)
        if evaluating:
            result = measure()
    if engine.is_main:
        atomic.write_json(file, result)
    return result


def report_policies(engine: Engine, report: dict, backbone: Backbone, examples: list, generation: GenerationConfig,
                    policies: dict[str, str | None], reference: str | None, more: Callable[[], dict] | None = None,
                    **scoring) -> Callable[[], None]:
    """``evaluate`` for :func:`evaluate_and_save` in a policy stage (dpo, kto, ppo, grpo): the held-out report of
    ``policies`` on ``examples`` (:func:`deltalign.reports.evaluation.policy_report`; ``scoring``: its reward-model
    and checker arguments), and ``more()``'s entries, into ``report``; its numbers logged as the ``eval`` row."""

    def evaluate() -> None:
        report.update(policy_report(backbone, examples, generation, policies, reference=reference, **scoring))
        report.update(more() if more is not None else {})
        engine.log(report_scalars(report), kind="eval")

    return evaluate


def evaluate_and_save(engine: Engine, out_dir: Path, results: dict, evaluate: Callable[[], None],
                      when: bool = True, deltas: Sequence[tuple[str, Path, Path | None]] = (),
                      files: dict[str, str] | None = None) -> dict:
    """The end of a training stage, on every process; returns ``results`` (the stage's metrics).

    ``evaluate()`` runs inside ``engine.evaluating(when)`` on the processes that evaluate (it fills ``results``
    and logs its rows); each ``(name, folder, head_file)`` of ``deltas`` is saved (head_file None: no head);
    the main process writes ``eval.json`` (``results``) and each ``files`` entry (file name -> key of
    ``results``); then every process waits for the others."""
    with engine.evaluating(when) as evaluating:  # every rank enters (ZeRO-3)
        if evaluating:
            evaluate()
    for name, folder, head_file in deltas:
        engine.save_delta(name, folder, head_file=head_file)
    if engine.is_main:
        for file, key in (files or {}).items():
            atomic.write_json(Path(out_dir) / file, results[key])
        atomic.write_json(Path(out_dir) / "eval.json", results)
    engine.finish()
    return results
