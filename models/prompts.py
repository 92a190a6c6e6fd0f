"""Prompt building, exactly as the reference weak-to-strong implementation does it.

Zero-shot:  ``Question: {q}\\nAnswer:``
Few-shot:   K blocks ``Question: {q}\\nAnswer: {a}\\n\\n`` then the zero-shot prompt.
Training targets are the response text after the prompt, no chat template ("vanilla").
"""

from __future__ import annotations

from collections.abc import Sequence

# Never "#": it would cut the "#### X" answer line.
STOP_STRINGS: tuple[str, ...] = ("Question", "Answer")


def zero_shot(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def few_shot(question: str, demonstrations: Sequence[tuple[str, str]]) -> str:
    """Prompt with in-context (question, response) demonstrations before the target question."""
    blocks = "".join(f"Question: {q.strip()}\nAnswer: {a.strip()}\n\n" for q, a in demonstrations)
    return blocks + zero_shot(question)


def training_target(response: str) -> str:
    """The text a student is trained to produce after the prompt (a leading space, as generated)."""
    return " " + response.strip()


def clean_response(text: str) -> str:
    """Cut a raw generation at the first stop string, strip white space and a trailing period."""
    cut = len(text)
    for stop in STOP_STRINGS:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    response = text[:cut].strip()
    if response.endswith("."):
        response = response[:-1].rstrip()
    return response
