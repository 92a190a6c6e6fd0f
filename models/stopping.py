"""Cooperative stopping: a job's stop signal, checked by long-running code at safe points.

The job runner sets a signal when its heartbeat finds the attempt no longer owns the job
(cancelled, or re-planned after a lapsed lease). Nothing is raised into the running thread: the
code doing the long work looks at the signal where stopping is safe — between generation
batches, after any token of a ``generate`` call (a transformers ``StoppingCriteria``), between
LECO rethinks, in the training launch's wait loop — and raises ``Stopped`` there itself. A
database commit is never one of those points.

The signal travels in a context variable (``stopping(signal)`` around a job's handler), like the
log context of ``services.logs``: generation deep inside a service call is stoppable without every
layer between the runner and the backend passing it on. Outside a job the current signal is one
that is never set.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Stopped(BaseException):
    """Raised at a safe point by code that found its stop signal set. A BaseException, so a
    handler's ``except Exception`` does not swallow it."""


class StopSignal:
    """Set once, from any thread; read by the thread doing the work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking at once when the signal is set; True if set."""
        return self._event.wait(timeout)

    def check(self) -> None:
        """A safe point: raise Stopped if the signal is set."""
        if self._event.is_set():
            raise Stopped(self.reason)


_current: ContextVar[StopSignal | None] = ContextVar("w2s_stop_signal", default=None)


def current_signal() -> StopSignal:
    """The stop signal of the job running in this context (outside a job, a fresh one nothing sets)."""
    return _current.get() or StopSignal()


@contextmanager
def stopping(signal: StopSignal) -> Iterator[StopSignal]:
    """Make ``signal`` the current one for the code run inside the block."""
    token = _current.set(signal)
    try:
        yield signal
    finally:
        _current.reset(token)
