"""Export a round's training data for other trainers, with provenance ids on every row."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import PreferencePair, TrainingExample
from services.errors import InputError
from services.rounds import get_round

FORMATS = ("trl", "llama-factory")
STREAM_ROWS = 2000  # rows per fetch: an export of millions of rows holds one batch, never the round


def export_rows(session: Session, round_id: int, fmt: str, variant: str | None = None) -> Iterator[dict[str, Any]]:
    """TRL: prompt/completion (SFT) or prompt/chosen/rejected (preference).
    LLaMA-Factory (alpaca): instruction/input/output, with output = [chosen, rejected] for pairs,
    the layout of the reference's released stage II file."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    round_ = get_round(session, round_id)
    if round_.stage == "preference":
        for p in session.scalars(select(PreferencePair).where(PreferencePair.round_id == round_id)
                                 .order_by(PreferencePair.id).execution_options(yield_per=STREAM_ROWS)):
            provenance = {"round": round_id, "question_id": p.question_id, "case": p.case,
                          "chosen_generation_id": p.chosen_generation_id, "rejected_generation_id": p.rejected_generation_id}
            if fmt == "trl":
                yield {"prompt": p.prompt, "chosen": " " + p.chosen, "rejected": " " + p.rejected, "w2s": provenance}
            else:
                yield {"instruction": p.prompt, "input": "", "output": [p.chosen, p.rejected], "w2s": provenance}
        return
    query = select(TrainingExample).where(TrainingExample.round_id == round_id).order_by(TrainingExample.id)
    if variant:
        query = query.where(TrainingExample.variant == variant)
    for e in session.scalars(query.execution_options(yield_per=STREAM_ROWS)):
        provenance = {"round": round_id, "question_id": e.question_id, "variant": e.variant, "generation_id": e.generation_id}
        if fmt == "trl":
            yield {"prompt": e.prompt, "completion": " " + e.response, "w2s": provenance}
        else:
            yield {"instruction": e.prompt, "input": "", "output": e.response, "w2s": provenance}


def export_round(session: Session, round_id: int, fmt: str, out: Path, variant: str | None = None) -> int:
    """Write JSONL atomically (a temporary file renamed at the end). Returns the row count."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in export_rows(session, round_id, fmt, variant):  # streamed: one batch in memory
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        if not count:
            raise InputError(f"round {round_id} has no training examples or pairs to export"
                             + (f" for variant {variant!r}" if variant else ""))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return count
