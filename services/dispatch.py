"""How services hand jobs on without knowing who runs them.

`Dispatcher` is what a caller passes in: the CLI and the workers build one
(workers.dispatch.JobDispatcher) for their settings; services never import workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol


class Dispatcher(Protocol):
    def enqueue(self, job_ids: Iterable[int], *, countdown: float | None = None) -> None:
        """Send these (committed, queued) jobs to their queues."""

    def drain(self, on_job_done: Callable[[int], None] | None = None) -> int:
        """Embedded mode: run the jobs sent so far, and those they lead to, in this process.
        Returns how many ran."""
