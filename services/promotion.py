"""The promotion gate: a pure decision over evaluation results, plus recording it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateDecision:
    promoted: str | None  # the candidate's name, or None when every candidate is rejected
    reason: str


def gate(student_name: str, student_accuracy: float, candidates: dict[str, float], min_improvement: float = 0.0) -> GateDecision:
    """Promote the best candidate only if it beats the current student by more than `min_improvement`.

    Ties between candidates go to the first listed (the config's variant order), so the result
    does not depend on which training job finished first.
    """
    if not candidates:
        return GateDecision(None, "no candidate was trained")
    best = max(candidates, key=lambda name: (candidates[name], -list(candidates).index(name)))
    margin = candidates[best] - student_accuracy
    if margin > min_improvement:
        return GateDecision(best, f"{best} {candidates[best]:.1%} beats {student_name} {student_accuracy:.1%} (+{margin:.1%})")
    verdict = "does not beat" if margin <= 0 else f"beats by only {margin:.1%} (needs > {min_improvement:.1%})"
    return GateDecision(None, f"best candidate {best} {candidates[best]:.1%} {verdict} {student_name} {student_accuracy:.1%}")


@dataclass(frozen=True)
class SplitAccuracy:
    """A checkpoint's accuracy on the split that decides (`eval`, the dev split) and, if the round
    has one, on the held-out split it reports on (`report_on`, the test split)."""

    decide: float
    report: float | None = None


def gate_on_dev(student_name: str, student: SplitAccuracy, candidates: dict[str, SplitAccuracy],
                min_improvement: float = 0.0, *, decided_on: str = "the eval split") -> GateDecision:
    """The gate over both splits: only the deciding split's figures reach the decision, so picking
    among candidates never looks at the split the round reports (which would inflate that figure).
    `decided_on` names the deciding split in the reason."""
    decision = gate(student_name, student.decide, {name: a.decide for name, a in candidates.items()}, min_improvement)
    return GateDecision(decision.promoted, f"on {decided_on}: {decision.reason}")
