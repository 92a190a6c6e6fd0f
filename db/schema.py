"""The SQL store: the single source of truth for datasets, models, rounds, jobs and their results.

Every row a job writes has a natural unique key, so a job that runs twice (a redelivered Celery
message, a retry after a crash) writes nothing twice: inserts go through `insert_ignore`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Named constraints keep Alembic migrations stable across SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task: Mapped[str] = mapped_column(String(20))  # answer format: gsm8k | math
    # An unlabelled pool may still carry gold answers: they feed reports only, never a model.
    labelled: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    questions: Mapped[list[Question]] = relationship(back_populates="dataset", order_by="Question.index")


class Question(Base):
    __tablename__ = "questions"
    __table_args__ = (UniqueConstraint("dataset_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)  # 0-based line number in the imported file
    text: Mapped[str] = mapped_column(Text)
    gold_answer: Mapped[str | None] = mapped_column(Text)
    gold_solution: Mapped[str | None] = mapped_column(Text)
    source_id: Mapped[str | None] = mapped_column(Text)  # the file's own id (`--id`); unique in the dataset

    dataset: Mapped[Dataset] = relationship(back_populates="questions")


class Checkpoint(Base):
    """A model on disk: a registered base model, or a candidate a round trained."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(20))  # weak | strong
    status: Mapped[str] = mapped_column(String(20))  # base | candidate | promoted | rejected
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    # The registered base model a lineage of students descends from: the promotion gate
    # compares a candidate with the newest promoted checkpoint of its lineage.
    lineage_root_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    variant: Mapped[str | None] = mapped_column(String(20))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # generation_config.json fields written over at load (`model register --decoding`); candidates inherit them
    decoding: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column()
    # How a w2s prompt becomes the text the model reads (models.prompts.model_text): plain | chat.
    # Set at registration; a trained candidate inherits its student's.
    prompt_format: Mapped[str] = mapped_column(String(10), default="plain", server_default="plain")


class Pipeline(Base):
    """A chain of rounds (weak-sft → stage I iteration 1 → iteration 2 → stage II), each gated."""

    __tablename__ = "pipelines"

    id: Mapped[int] = mapped_column(primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[str] = mapped_column(String(20), default="running")  # running | done | stopped | failed
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("pipeline_id", "pipeline_step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pipeline_id: Mapped[int | None] = mapped_column(ForeignKey("pipelines.id"))
    pipeline_step: Mapped[str | None] = mapped_column(String(40))  # weak-sft | iteration1 | iteration2 | preference
    # `round start --name`: an idempotency key, so a start retried after an error finds its round
    # instead of making a second one. NULL for unnamed rounds (unique among the named).
    name: Mapped[str | None] = mapped_column(String(200), unique=True)
    stage: Mapped[str] = mapped_column(String(20))  # weak-sft | sft | preference
    iteration: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(20), default="running")  # running | done | failed | cancelled
    config: Mapped[dict[str, Any]] = mapped_column()  # the validated round config, defaults filled in
    # Names resolved to ids when the round started (models, datasets, the student the gate compares
    # with, the pool's question count), and facts fixed once while it runs (the in-context
    # demonstrations). The pool's question ids are rows of `round_questions`, not part of this JSON.
    resolved: Mapped[dict[str, Any]] = mapped_column(default=dict)
    outcome: Mapped[str | None] = mapped_column(String(20))  # promoted | rejected
    error: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()

    jobs: Mapped[list[Job]] = relationship(back_populates="round", order_by="Job.id")


class RoundQuestion(Base):
    """The pool questions a round answers, in order (migration 0010): a table, not a list in
    `rounds.resolved`, so reading a round's row never reads a million ids (`round status`)."""

    __tablename__ = "round_questions"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0-based: the order chunks follow
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"))


class Job(Base):
    """One unit of work on one queue. `key` is unique per round, so planning is idempotent."""

    __tablename__ = "jobs"
    # (round, step, state): a round's step counts and the planner's "is the step finished?";
    # (state, queue): the queue view. Migration 0007.
    __table_args__ = (UniqueConstraint("round_id", "key"), Index("ix_jobs_round_id_step_state", "round_id", "step", "state"),
                      Index("ix_jobs_state_queue", "state", "queue"))

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(200))  # e.g. "generate:weak:0003"
    step: Mapped[str] = mapped_column(String(40))  # e.g. "generate:weak", "vote", "train", "evaluate"
    kind: Mapped[str] = mapped_column(String(20))  # generate | vote | train | evaluate | promote
    queue: Mapped[str] = mapped_column(String(20))  # weak | strong | train | control
    state: Mapped[str] = mapped_column(String(20), default="queued")  # queued | running | done | failed | cancelled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column()
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(200))  # host:pid of the worker running it
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    log_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    round: Mapped[Round] = relationship(back_populates="jobs")


class Generation(Base):
    """One answer of one voter to one question. Unique per (round, voter, question, sample)."""

    __tablename__ = "generations"
    __table_args__ = (UniqueConstraint("round_id", "voter", "question_id", "sample_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), index=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    voter: Mapped[str] = mapped_column(String(40))  # weak | strong
    sample_index: Mapped[int] = mapped_column(Integer, default=0)
    strategy: Mapped[str] = mapped_column(String(20))  # zero-shot | few-shot (cot | sc | leco later)
    text: Mapped[str] = mapped_column(Text)  # the cleaned response
    answer: Mapped[str] = mapped_column(Text)  # extracted; "" when there is none
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    step_scores: Mapped[list[Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingExample(Base):
    __tablename__ = "training_examples"
    __table_args__ = (UniqueConstraint("round_id", "variant", "question_id", "generation_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    variant: Mapped[str] = mapped_column(String(20))  # weak | icl | hybrid | gold
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"))
    # The generation the response came from; None for gold solutions (weak-sft).
    generation_id: Mapped[int | None] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)


class PreferencePair(Base):
    """A stage II pair: the weak model's original response on one side, a student sample on the other."""

    __tablename__ = "preference_pairs"
    __table_args__ = (UniqueConstraint("round_id", "question_id", "pair_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"))
    pair_index: Mapped[int] = mapped_column(Integer)  # 0..pairs_per_question-1
    case: Mapped[str] = mapped_column(String(20))  # weak_chosen | weak_rejected
    confidence: Mapped[float] = mapped_column(Float)  # the student's majority share
    prompt: Mapped[str] = mapped_column(Text)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    # Provenance: the generations each side came from (the weak one is from a stage I round).
    chosen_generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    rejected_generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))


class Evaluation(Base):
    """Accuracy of one checkpoint on one labelled dataset, reused by every round that needs it."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("checkpoint_id", "dataset_id", "strategy", "n_questions"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    strategy: Mapped[str] = mapped_column(String(200))  # the method's label, its generation settings included
    n_questions: Mapped[int] = mapped_column(Integer)
    correct: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Float)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    wall_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrackingRun(Base):
    """The experiment-tracking run (MLflow or TensorBoard) of a pipeline or a round, so that every
    process logs into the same run and a training job's run nests under its round's."""

    __tablename__ = "tracking_runs"
    __table_args__ = (UniqueConstraint("owner", "owner_id", "target"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(20))  # pipeline | round
    owner_id: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(Text)  # "<backend> <uri> <experiment>": a run id means something there only
    run_id: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column()  # set once, by whoever logged the end
