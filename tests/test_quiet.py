"""A quiet log: a user's run shows no warning the project can avoid (issue 35 goal 8); what is silenced is silenced
where it arises, for a reason written beside it (deltalign/core/quiet.py)."""

import logging

from conftest import run_cli
from deltalign.core import quiet


def test_a_run_of_sft_dpo_export_prints_no_warning(tmp_path):
    p = run_cli(["run", "sft", "dpo", "export", "--config", "configs/tiny.yaml", "--set", "sft.max_steps=1",
                 "--set", "dpo.max_steps=1", "--set", "sft.eval_limit=0", "--set", "dpo.eval_limit=0",
                 "--set", "model.gradient_checkpointing=true", "--run-dir", str(tmp_path / "run")])
    lines = [x for x in p.stderr.splitlines() if "warn" in x.lower()]
    assert not lines, "\n".join(lines)


def test_bitsandbytes_kernel_download_notice_is_dropped_on_any_cpu(caplog):
    """bitsandbytes logs it only on CPUs with AVX512-BF16; the filter is checked by logging the same record."""
    quiet.install()
    logger = logging.getLogger(quiet.BNB_KERNEL[0])
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", OSError("offline"))
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
