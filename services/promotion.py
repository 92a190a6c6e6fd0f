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
