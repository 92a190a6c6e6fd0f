"""Test-only failpoints: a worker started through this module instead of `w2sctl` dies at a named
point, its whole process group at once (like kill -9), so that a failure test can leave a round in
the window a repair must handle. No production module imports this one.

    python -c "from tests.failpoints import main; main()" after-finish:vote worker --role control ...

Points:
- ``after-finish:<kind>``: right after a job of that kind committed its results (its handler
  returned) and before the round advances: the window `round resume` repairs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from importlib.metadata import entry_points

POINTS = ("after-finish",)

log = logging.getLogger("w2s.worker")


def install(failpoint: str) -> None:
    """Arm ``failpoint`` (``<point>:<job kind>``) in this process and the pool processes it forks."""
    from workers.steps import HANDLERS

    point, _, kind = failpoint.partition(":")
    if point not in POINTS or kind not in HANDLERS:
        raise ValueError(f"failpoint {failpoint!r}: expected <point>:<kind> with a point in {POINTS} "
                         f"and a kind in {sorted(HANDLERS)}")
    handler = HANDLERS[kind]

    def handler_then_die(ctx) -> None:
        handler(ctx)
        log.error("failpoint %s: killing this worker's process group", failpoint)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    HANDLERS[kind] = handler_then_die


def main() -> None:
    """``main FAILPOINT ARGS...``: arm FAILPOINT, then run `w2sctl ARGS...` in this process."""
    failpoint, *args = sys.argv[1:]
    install(failpoint)
    (w2sctl,) = entry_points(group="console_scripts", name="w2sctl")
    sys.argv = ["w2sctl", *args]
    w2sctl.load()()
