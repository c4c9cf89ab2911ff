"""Warnings and log lines of our dependencies that a user cannot act on, each silenced where it arises, with why.

Everything else stays visible: a warning the project can avoid is fixed at its cause instead of listed here.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

# bitsandbytes (0.49) logs this when it is imported (peft imports it) on CPUs with AVX512-BF16: it tries to download
# a 4-bit CPU kernel from the hub and falls back to its own. The only cure is that download, which this offline
# project never makes; the fallback is what runs anyway.
BNB_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
# peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning since
# transformers 5): peft's call, not ours; silenced only while we build a PeftModel (:func:`peft_wrapping`).
PEFT_CHECKPOINTING = "`is_gradient_checkpointing` is deprecated"


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Add the log filters (once, before bitsandbytes is imported: deltalign/__init__.py calls it)."""
    logger = logging.getLogger(BNB_KERNEL[0])
    if not any(isinstance(f, _DropPrefix) for f in logger.filters):
        logger.addFilter(_DropPrefix(BNB_KERNEL[1]))


@contextlib.contextmanager
def peft_wrapping():
    """Around building a PeftModel: without peft's read of a deprecated transformers property."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING, category=FutureWarning)
        yield
