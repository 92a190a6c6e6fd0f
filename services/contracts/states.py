"""The states a job, a round and a checkpoint go through, and the names of kinds and stages.

String enums: a member *is* its string (``JobState.DONE == "done"``), so the database keeps
storing the same text, rows written before these enums existed read back unchanged, and no
migration is needed.
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: the same behaviour, spelled out
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class JobKind(StrEnum):
    """What a job does; each kind has one handler (workers.steps.HANDLERS) and one Celery task."""

    GENERATE = "generate"
    VOTE = "vote"
    PAIRS = "pairs"
    TRAIN = "train"
    EVALUATE = "evaluate"
    PROMOTE = "promote"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RoundState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_ROUND_STATES = (RoundState.DONE, RoundState.FAILED, RoundState.CANCELLED)


class CheckpointStatus(StrEnum):
    BASE = "base"  # registered by an operator
    CANDIDATE = "candidate"  # trained by a round, not yet judged by the gate
    PROMOTED = "promoted"
    REJECTED = "rejected"


class Stage(StrEnum):
    """The kinds of round (the `stage` field of a round config)."""

    SFT = "sft"
    WEAK_SFT = "weak-sft"
    PREFERENCE = "preference"


class Queue(StrEnum):
    """The broker's queues, one per worker role."""

    WEAK = "weak"
    STRONG = "strong"
    TRAIN = "train"
    CONTROL = "control"
