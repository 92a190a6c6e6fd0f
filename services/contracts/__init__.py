"""The typed contracts between the layers: what a job key, a state, a resolved round, a job's
payload and result are. Rows store them as plain strings and JSON; these types are how code
reads and writes them. Nothing here touches the database or imports workers."""

from services.contracts.jobs import (
    EvaluatePayload,
    EvaluateResult,
    GeneratePayload,
    GenerateResult,
    PairsResult,
    PromotePayload,
    PromoteResult,
    TrainPayload,
    TrainResult,
    VoteResult,
    payload_of,
    result_of,
)
from services.contracts.keys import JobKey, JobKeyError, StepName
from services.contracts.resolved import (
    AnyResolved,
    ResolvedPreference,
    ResolvedSFT,
    ResolvedWeakSFT,
    parse_resolved,
    resolved_of,
)
from services.contracts.states import (
    TERMINAL_ROUND_STATES,
    CheckpointStatus,
    JobKind,
    JobState,
    Queue,
    RoundState,
    Stage,
)

__all__ = ["EvaluatePayload", "EvaluateResult", "GeneratePayload", "GenerateResult", "PairsResult", "PromotePayload",
           "PromoteResult", "TrainPayload", "TrainResult", "VoteResult", "payload_of", "result_of",
           "AnyResolved", "ResolvedPreference", "ResolvedSFT", "ResolvedWeakSFT", "parse_resolved", "resolved_of",
           "TERMINAL_ROUND_STATES", "CheckpointStatus", "JobKey", "JobKeyError", "JobKind", "JobState", "Queue",
           "RoundState", "Stage",
           "StepName"]
