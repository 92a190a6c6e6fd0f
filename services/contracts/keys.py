"""Job keys, parsed and formatted here and nowhere else.

A key names a job uniquely within its round, which makes planning idempotent. Its forms::

    generate:<voter>:<chunk, 4 digits>    generate:weak:0003
    vote | pairs | promote
    train:<variant>                        train:icl
    evaluate:<subject>                     evaluate:baseline, evaluate:icl
    evaluate:pass-at-k:<subject>           evaluate:pass-at-k:student
    evaluate:report-on:<subject>           evaluate:report-on:hybrid (on the held-out report_on split)
"""

from __future__ import annotations

from dataclasses import dataclass

from services.contracts.states import JobKind
from services.errors import InputError

PASS_AT_K = "pass-at-k"
REPORT_ON = "report-on"
_SINGLE = (JobKind.VOTE, JobKind.PAIRS, JobKind.PROMOTE)


class JobKeyError(InputError):
    """A string that is not a job key; the message names it and says what is wrong."""


@dataclass(frozen=True, order=True)
class JobKey:
    kind: JobKind
    subject: str | None = None  # generate: the voter; train: the variant; evaluate: a variant or "baseline"
    chunk: int | None = None  # generate: which chunk of the question ids
    pass_at_k: bool = False  # evaluate: pass@k over sampled answers instead of greedy accuracy
    report_on: bool = False  # evaluate: on the round's held-out report_on split (never decides)

    def __post_init__(self) -> None:
        try:
            kind = JobKind(self.kind)
        except ValueError:
            raise JobKeyError(f"job key: unknown kind {self.kind!r} (one of {', '.join(JobKind)})") from None
        object.__setattr__(self, "kind", kind)
        needs_subject = kind not in _SINGLE
        if needs_subject != (self.subject is not None):
            raise JobKeyError(f"job key: a {kind} key {'needs' if needs_subject else 'takes no'} subject, "
                              f"got {self.subject!r}")
        if self.subject is not None and (not self.subject or ":" in self.subject):
            raise JobKeyError(f"job key: subject {self.subject!r} must be a non-empty name without ':'")
        if (kind == JobKind.GENERATE) != (self.chunk is not None):
            raise JobKeyError(f"job key: only a generate key has a chunk number, and it must ({kind}, chunk {self.chunk!r})")
        if self.chunk is not None and self.chunk < 0:
            raise JobKeyError(f"job key: chunk {self.chunk} must not be negative")
        if self.pass_at_k and kind != JobKind.EVALUATE:
            raise JobKeyError(f"job key: only an evaluate key can be pass@k, not {kind}")
        if self.report_on and (kind != JobKind.EVALUATE or self.pass_at_k):
            raise JobKeyError(f"job key: only a greedy evaluate key can be on the report_on split, not {kind}")

    # --- the constructors planning uses ---

    @classmethod
    def generate(cls, voter: str, chunk: int) -> JobKey:
        return cls(JobKind.GENERATE, voter, chunk)

    @classmethod
    def train(cls, variant: str) -> JobKey:
        return cls(JobKind.TRAIN, variant)

    @classmethod
    def evaluate(cls, subject: str, *, pass_at_k: bool = False, report_on: bool = False) -> JobKey:
        return cls(JobKind.EVALUATE, subject, pass_at_k=pass_at_k, report_on=report_on)

    @classmethod
    def single(cls, kind: JobKind) -> JobKey:
        """vote, pairs or promote: one job of its kind per round."""
        return cls(kind)

    # --- text ---

    def __str__(self) -> str:
        step = str(self.display_step)
        return step if self.chunk is None else f"{step}:{self.chunk:04d}"

    @classmethod
    def parse(cls, key: str) -> JobKey:
        """The key a job row carries → JobKey; a malformed one raises JobKeyError naming it."""
        parts = key.split(":")
        try:
            kind = JobKind(parts[0])
        except ValueError:
            raise JobKeyError(f"job key {key!r}: unknown kind {parts[0]!r} (one of {', '.join(JobKind)})") from None
        try:
            if kind == JobKind.GENERATE and len(parts) == 3 and parts[2].isascii() and parts[2].isdigit():
                parsed = cls(kind, parts[1], int(parts[2]))
            elif kind == JobKind.EVALUATE and len(parts) == 3 and parts[1] == PASS_AT_K:
                parsed = cls(kind, parts[2], pass_at_k=True)
            elif kind == JobKind.EVALUATE and len(parts) == 3 and parts[1] == REPORT_ON:
                parsed = cls(kind, parts[2], report_on=True)
            elif kind in (JobKind.TRAIN, JobKind.EVALUATE) and len(parts) == 2:
                parsed = cls(kind, parts[1])
            elif kind in _SINGLE and len(parts) == 1:
                parsed = cls(kind)
            else:
                raise JobKeyError(f"expected {_FORMS[kind]}")
        except JobKeyError as exc:
            raise JobKeyError(f"job key {key!r}: {str(exc).removeprefix('job key: ')}") from None
        if str(parsed) != key:  # e.g. generate:weak:3 for generate:weak:0003: two names for one job
            raise JobKeyError(f"job key {key!r}: not in its canonical form {str(parsed)!r}")
        return parsed

    # --- what the key says about the job ---

    @property
    def step(self) -> str:
        """The `jobs.step` column: a generate job's voter matters (`generate:weak`), otherwise the kind."""
        return f"{self.kind}:{self.subject}" if self.kind == JobKind.GENERATE else str(self.kind)

    @property
    def display_step(self) -> StepName:
        """The line a job counts towards in a round's progress: generate chunks share one
        (`generate:weak`), every other job has its own (`train:icl`, `evaluate:pass-at-k:icl`)."""
        return StepName(self.kind, self.subject, self.pass_at_k, self.report_on)


@dataclass(frozen=True)
class StepName:
    """One line of a round's progress: a job key without its chunk number."""

    kind: JobKind
    subject: str | None = None
    pass_at_k: bool = False
    report_on: bool = False

    def __str__(self) -> str:
        if self.subject is None:
            return str(self.kind)
        if self.pass_at_k:
            return f"{self.kind}:{PASS_AT_K}:{self.subject}"
        return f"{self.kind}:{REPORT_ON}:{self.subject}" if self.report_on else f"{self.kind}:{self.subject}"

    @property
    def detail(self) -> str:
        """What follows the kind: `weak`, `icl`, `pass-at-k:icl`; empty for vote, pairs, promote."""
        return str(self).partition(":")[2]

    @classmethod
    def parse(cls, step: str) -> StepName:
        """`generate:weak`, `train:icl`, `evaluate:pass-at-k:icl`, `vote`; else JobKeyError naming it."""
        try:
            return JobKey.parse(step + ":0000" if step.startswith(f"{JobKind.GENERATE}:") else step).display_step
        except JobKeyError as exc:
            raise JobKeyError(f"step {step!r}: " + str(exc).split(": ", 1)[1]) from None


_FORMS = {
    JobKind.GENERATE: "generate:<voter>:<chunk number>",
    JobKind.VOTE: "vote",
    JobKind.PAIRS: "pairs",
    JobKind.PROMOTE: "promote",
    JobKind.TRAIN: "train:<variant>",
    JobKind.EVALUATE: "evaluate:<subject>, evaluate:pass-at-k:<subject> or evaluate:report-on:<subject>",
}
