"""The training loop's fault hook for tests: a simulated ``kill -9`` at the end of a chosen optimizer step.

``DELTALIGN_TEST_KILL_AT_STEP=N`` (every stage) or ``STAGE:N`` (that stage's step N only) ends the process with
exit code 137 right after step N is logged and checkpointed, as a kill would; ``DELTALIGN_TEST_KILL_RANK=R``
kills only process R (the others run on); ``DELTALIGN_TEST_KILL_STAMP=FILE`` writes the time of the kill there
first (for the teardown time a test reports). Unset, nothing happens. The write crash points are
:func:`deltalign.core.atomic.crash_point`'s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def kill_point(stage: str, step: int, rank: int) -> None:
    """Called by :meth:`deltalign.training.engine.Engine.step` once step ``step`` of ``stage`` is complete."""
    fail_at = os.environ.get("DELTALIGN_TEST_KILL_AT_STEP")
    if not fail_at:
        return
    name, _, at = fail_at.rpartition(":")
    only = os.environ.get("DELTALIGN_TEST_KILL_RANK")
    if int(at) == step and name in ("", stage) and only in (None, str(rank)):
        if os.environ.get("DELTALIGN_TEST_KILL_STAMP"):
            Path(os.environ["DELTALIGN_TEST_KILL_STAMP"]).write_text(repr(time.time()))
        os._exit(137)
