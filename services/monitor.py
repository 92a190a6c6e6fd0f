"""What an operator looks at, read from the database and the broker; nothing here writes.

- `queue_status`: per queue the depth in the broker, the workers consuming it (Celery's inspect
  API) and the age of the oldest waiting job (the database's queued jobs);
- `round_progress`: one entry per step of a round (questions generated, samples, training steps,
  questions evaluated) with throughput and an ETA;
- `job_detail`, `job_throughput`: one job, for `jobs show` and the worker metrics;
- `full_report`, `report_figure`: a round's report with the lineage of checkpoints it belongs to,
  and the matplotlib figure `round report --plot` saves.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, defer

from db.schema import Checkpoint, Evaluation, Generation, Job, Question, Round, utcnow
from db.session import among
from services.config import QUEUES
from services.contracts import (
    EvaluatePayload,
    EvaluateResult,
    GeneratePayload,
    JobKey,
    JobKind,
    JobState,
    RoundState,
    StepName,
    TrainResult,
    VoteResult,
    payload_of,
    resolved_of,
    result_of,
)
from services.contracts.graph import reports_on, reports_pass_at_k, stage_steps, variants_of
from services.errors import InputError, W2SError
from services.lookup import get_by_id

LOG_TAIL_BYTES = 64 * 1024


class BrokerUnreachable(W2SError):
    """The broker named by W2S_BROKER_URL does not answer."""


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (_aware(end) - _aware(start)).total_seconds())


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    from datetime import timezone

    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# --- queues --------------------------------------------------------------------------------------


def waiting_since(job: Job) -> datetime:
    """When a queued job started waiting: its creation, or the end of its last failed attempt."""
    return max(_aware(t) for t in (job.created_at, job.finished_at) if t is not None)


def oldest_waiting(session: Session, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """queue → queued jobs in the database and the age in seconds of the one waiting longest.
    Counted in SQL (the `(state, queue)` index): a big round queues thousands of chunks."""
    now = now or utcnow()
    out: dict[str, dict[str, Any]] = {q: {"queued_jobs": 0, "oldest_waiting_s": None, "oldest_job": None} for q in QUEUES}
    # waiting_since in SQL: the later of the creation and the end of the last failed attempt.
    since = case((Job.finished_at.is_not(None) & (Job.finished_at > Job.created_at), Job.finished_at),
                 else_=Job.created_at)
    counts = session.execute(select(Job.queue, func.count()).where(Job.state == JobState.QUEUED).group_by(Job.queue)).all()
    for queue, count in counts:
        oldest = session.execute(select(Job.id, since.label("since")).where(Job.state == JobState.QUEUED, Job.queue == queue)
                                 .order_by(since, Job.id).limit(1)).first()
        entry = out.setdefault(queue, {"queued_jobs": 0, "oldest_waiting_s": None, "oldest_job": None})
        entry["queued_jobs"] = count
        if oldest is not None and oldest.since is not None:
            entry["oldest_waiting_s"], entry["oldest_job"] = _seconds(_aware(oldest.since), now), oldest.id
    return out


def broker_depths(broker_url: str, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """Messages waiting in each queue, as the broker counts them (Redis: the list lengths, every
    priority level included). A queue Redis has never seen, or emptied, holds 0."""
    from kombu import Connection
    from kombu.exceptions import ChannelError, OperationalError

    from services.settings import redact

    depths = {}
    try:
        # One retry: an operator (or a scrape) wants an answer now, not kombu's patient back-off.
        with Connection(broker_url, connect_timeout=5, transport_options={"max_retries": 1}) as connection:
            channel = connection.default_channel
            for name in queues:
                try:
                    depths[name] = channel.queue_declare(queue=name, passive=True).message_count
                except ChannelError:  # an empty Redis list does not exist
                    depths[name] = 0
    except (OperationalError, OSError) as exc:
        raise BrokerUnreachable(f"the broker at {redact(broker_url)} (W2S_BROKER_URL) is unreachable: {exc}") from None
    return depths


# Every message of one job carries this task id (workers.dispatch.task_id), so a message names
# its job without its body being decoded.
TASK_ID_PREFIX = "w2s-job-"
# kombu's Redis transport keeps a queue's messages of priority p > 0 in `<queue>\x06\x16<p>`.
_REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def job_of_task_id(task_id: Any) -> int | None:
    text = str(task_id or "")
    return int(text[len(TASK_ID_PREFIX):]) if text.startswith(TASK_ID_PREFIX) and text[len(TASK_ID_PREFIX):].isdigit() else None


def _job_of_raw_message(raw: bytes | str) -> int | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, list):  # an `unacked` entry: [message, exchange, routing key]
        message = message[0] if message else {}
    headers = message.get("headers") if isinstance(message, dict) else None
    return job_of_task_id((headers or {}).get("id"))


def broker_messages(broker_url: str, queues: tuple[str, ...] = QUEUES) -> dict[int, str] | None:
    """job id → where the broker holds a message of it: `waiting` in its queue, or `taken` (handed
    to a worker, not yet acknowledged: Redis keeps it in the `unacked` hash until then, whether that
    worker is still alive or not). None for a broker other than Redis (its queues cannot be read
    without consuming them)."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    from services.settings import redact

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=5, socket_timeout=30)
    found: dict[int, str] = {}
    try:
        for raw in client.hvals("unacked"):
            job = _job_of_raw_message(raw)
            if job is not None:
                found[job] = "taken"
        for name in queues:
            for suffix in _REDIS_PRIORITY_SUFFIXES:
                for raw in client.lrange(name + suffix, 0, -1):
                    job = _job_of_raw_message(raw)
                    if job is not None:
                        found[job] = "waiting"
    except redis.exceptions.RedisError as exc:
        raise BrokerUnreachable(f"the broker at {redact(broker_url)} (W2S_BROKER_URL) is unreachable: {exc}") from None
    finally:
        client.close()
    return found


@dataclass
class MessageCensus:
    """Which jobs have a message that will run them, seen from the broker and the live workers."""

    waiting: set[int]  # a message in its queue
    taken: set[int]  # handed to a worker, unacknowledged (that worker may be dead)
    held: set[int]  # active, reserved or scheduled (a retry's countdown) on a worker that answered
    consumers: dict[str, list[str]]  # queue → the live workers consuming it

    def has_message(self, job_id: int) -> bool:
        """A message in a queue, or held by a live worker. One taken by a dead worker does not count:
        Redis would hand it out again only after the visibility timeout (a day)."""
        return job_id in self.waiting or job_id in self.held


def message_census(broker_url: str, app: Any, timeout: float = 1.0) -> MessageCensus | None:
    """Read the queues first, then ask the workers: a message taken in between is seen by the
    second look (or missed by both, which the reconciliation's grace period absorbs)."""
    messages = broker_messages(broker_url)
    if messages is None:
        return None
    workers = inspect_workers(app, timeout)
    held = {entry["job"] for w in workers for kind in ("active", "reserved", "scheduled") for entry in w[kind]}
    return MessageCensus(
        waiting={job for job, where in messages.items() if where == "waiting"},
        taken={job for job, where in messages.items() if where == "taken"},
        held=held,
        consumers={queue: [w["worker"] for w in workers if queue in w["queues"]] for queue in QUEUES},
    )


def _job_ids(tasks: list[dict[str, Any]]) -> list[tuple[int, str | None, float | None]]:
    """(job id, queue, start time) of the w2s tasks in an inspect reply."""
    out = []
    for task in tasks:
        task = task.get("request", task)  # `scheduled` wraps the request
        if not str(task.get("name", "")).startswith("w2s."):
            continue
        args = task.get("args") or []
        if isinstance(args, (list, tuple)) and args and isinstance(args[0], int):
            out.append((args[0], (task.get("delivery_info") or {}).get("routing_key"), task.get("time_start")))
    return out


@contextmanager
def control_app(broker_url: str) -> Iterator[Any]:
    """A Celery client for remote control (inspect, broadcast). It needs the broker only, not the
    workers' task code, so reading the workers' state does not import the workers package."""
    from celery import Celery

    app = Celery("w2s-control", broker=broker_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"])
    try:
        yield app
    finally:
        app.close()


def inspect_workers(app: Any, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Every worker answering on the broker: its queues, GPUs, active, reserved and scheduled jobs."""
    queues_by_worker = app.control.inspect(timeout=timeout).active_queues() or {}
    if not queues_by_worker:
        return []
    # Now that the workers are known, each question returns as soon as all of them answered.
    inspect = app.control.inspect(timeout=timeout, limit=len(queues_by_worker))
    active, reserved, scheduled = inspect.active() or {}, inspect.reserved() or {}, inspect.scheduled() or {}
    info: dict[str, Any] = {}
    for reply in app.control.broadcast("w2s_info", reply=True, timeout=timeout, limit=len(queues_by_worker)) or []:
        info.update(reply)
    workers = []
    for name in sorted(queues_by_worker):
        reply = info.get(name)
        extra = reply if isinstance(reply, dict) and "error" not in reply else {}
        workers.append({
            "worker": name,
            "host": name.split("@", 1)[-1],
            "queues": sorted(q["name"] for q in queues_by_worker[name]),
            "gpus": extra.get("gpus"),
            "metrics_port": extra.get("metrics_port"),
            "active": [{"job": j, "queue": q, "time_start": t} for j, q, t in _job_ids(active.get(name) or [])],
            "reserved": [{"job": j, "queue": q} for j, q, _ in _job_ids(reserved.get(name) or [])],
            "scheduled": [{"job": j, "queue": q} for j, q, _ in _job_ids(scheduled.get(name) or [])],
        })
    return workers


def queue_status(session: Session, broker_url: str | None, *, timeout: float = 1.0) -> dict[str, Any]:
    """The view `w2sctl queues` prints. Without a broker (embedded mode) only the database part."""
    from services.settings import redact

    waiting = oldest_waiting(session)
    status: dict[str, Any] = {"broker": redact(broker_url) if broker_url else None, "queues": [], "workers": []}
    depths: dict[str, int] = {}
    if broker_url:
        depths = broker_depths(broker_url)
        with control_app(broker_url) as app:
            status["workers"] = inspect_workers(app, timeout)
        keys = dict(session.execute(select(Job.id, Job.key).where(
            Job.id.in_({a["job"] for w in status["workers"] for kind in ("active", "reserved", "scheduled")
                        for a in w[kind]}))).all())
        for worker in status["workers"]:
            for kind in ("active", "reserved", "scheduled"):
                for entry in worker[kind]:
                    entry["key"] = keys.get(entry["job"])
    for name in QUEUES:
        status["queues"].append({
            "queue": name,
            "depth": depths.get(name) if broker_url else None,
            **waiting[name],
            "consumers": [w["worker"] for w in status["workers"] if name in w["queues"]],
        })
    return status


# --- jobs ----------------------------------------------------------------------------------------


def get_job(session: Session, job_id: int) -> Job:
    return get_by_id(session, Job, job_id, "job")


def log_tail(path: str | None, lines: int = 40) -> list[str] | None:
    """The last lines of a job's log file; None if it has none or the file is not on this machine."""
    if not path or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    return text.splitlines()[-lines:]


def job_detail(session: Session, job_id: int, tail_lines: int = 40) -> dict[str, Any]:
    job = get_job(session, job_id)
    now = utcnow()
    owner = job.owner or ""
    return {
        "id": job.id, "round": job.round_id, "key": job.key, "step": job.step, "kind": job.kind, "queue": job.queue,
        "state": job.state, "attempts": job.attempts, "max_attempts": job.max_attempts, "progress": job.progress,
        "owner": job.owner, "host": owner.rsplit(":", 1)[0] if owner else None,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "heartbeat_at": job.heartbeat_at,
        "waited_s": _seconds(job.created_at, job.started_at),
        "ran_s": _seconds(job.started_at, job.finished_at or (now if job.state == JobState.RUNNING else None)),
        "heartbeat_age_s": _seconds(job.heartbeat_at, now) if job.state == JobState.RUNNING else None,
        "error": job.error, "payload": _brief_payload(job.payload or {}), "result": job.result,
        "log_path": job.log_path, "log_tail": log_tail(job.log_path, tail_lines),
    }


def _brief_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """Question id lists can hold thousands of ids: show how many."""
    return {k: (f"{len(v)} ids" if isinstance(v, list) and len(v) > 8 else v) for k, v in payload.items()}


def job_throughput(session: Session, job_id: int) -> dict[str, Any]:
    """Tokens a finished job's last attempt generated, and its tokens/s (generation or training)."""
    job = get_job(session, job_id)
    out: dict[str, Any] = {"queue": job.queue, "kind": job.kind}
    seconds = _seconds(job.started_at, job.finished_at)
    if job.kind == JobKind.GENERATE and job.state == JobState.DONE:
        tokens = session.scalar(select(func.coalesce(func.sum(Generation.output_tokens), 0)).where(
            Generation.job_id == job.id, Generation.created_at >= job.started_at)) or 0
        out["generated_tokens"] = int(tokens)
        out["generation_tokens_per_s"] = tokens / seconds if seconds else None
    elif job.kind == JobKind.EVALUATE and job.state == JobState.DONE and (evaluation := _fresh_evaluation(session, job)):
        out["generated_tokens"] = evaluation.output_tokens
        out["generation_tokens_per_s"] = evaluation.output_tokens / evaluation.wall_s if evaluation.wall_s else None
    elif job.kind == JobKind.TRAIN and job.state == JobState.DONE:
        trained = result_of(job, TrainResult)
        out["training_tokens_per_s"] = ((trained.train if trained else None) or {}).get("tokens_per_s")
    return out


def _fresh_evaluation(session: Session, job: Job) -> Evaluation | None:
    """The evaluation a done evaluate job ran itself (None when it reused an earlier one)."""
    result = result_of(job, EvaluateResult)
    if result is None or result.reused:
        return None
    return session.get(Evaluation, result.evaluation_id)


# --- round progress ------------------------------------------------------------------------------


@dataclass
class StepProgress:
    step: str
    unit: str  # questions | samples | steps | jobs
    completed: float
    total: float | None  # None: not known yet (training steps before the launch logged them)
    state: str  # waiting (not planned yet) | queued | running | done | failed | cancelled | skipped
    jobs: int = 0
    elapsed_s: float | None = None
    rate: float | None = None  # units per second since the step's first job started
    tokens_per_s: float | None = None
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        if self.state in ("done", "skipped"):
            return 1.0
        if not self.total:
            return 0.0
        return max(0.0, min(1.0, self.completed / self.total))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}


def expected_steps(stage: str, config: dict[str, Any]) -> list[str]:
    """The steps a round of this stage goes through, in display order (the step graph's)."""
    return [str(step) for step in stage_steps(stage, variants_of(stage, config), report_on=reports_on(config),
                                               pass_at_k=reports_pass_at_k(config))]


def step_state(states: list[str]) -> str:
    """One state for a step from its jobs' states: failed wins, then running, then queued."""
    if not states:
        return "waiting"
    for state in ("failed", "running", "cancelled", "queued"):
        if state in states:
            return "running" if state == "queued" and "done" in states else state
    return "done"


def estimate(completed: float, total: float | None, elapsed_s: float | None) -> tuple[float | None, float | None]:
    """(rate, ETA in seconds) from the work done in the time elapsed, assuming the pace holds."""
    if not elapsed_s or completed <= 0:
        return None, None
    rate = completed / elapsed_s
    eta = max(0.0, (total - completed) / rate) if total is not None else None
    return rate, eta


def last_training_step(log_path: str | None) -> dict[str, Any] | None:
    """The newest `{"step", "loss", "total_steps", ...}` line the training ranks printed."""
    from models.train.launch import parse_progress

    for line in reversed(log_tail(log_path, lines=400) or []):
        record = parse_progress(line)
        if record is not None:
            return record
    return None


def round_progress(session: Session, round_: Round, now: datetime | None = None) -> list[StepProgress]:
    now = now or utcnow()
    jobs: dict[str, list[Job]] = defaultdict(list)
    # Payloads (a chunk's question ids each) load only for the few jobs that need them.
    for job in session.scalars(select(Job).where(Job.round_id == round_.id).order_by(Job.id)
                               .options(defer(Job.payload))):
        jobs[str(JobKey.parse(job.key).display_step)].append(job)
    steps = expected_steps(round_.stage, round_.config)
    steps += [s for s in jobs if s not in steps]
    generated = generated_so_far(session, round_.id, [job for group in jobs.values() for job in group])
    skipped_variants = {key.subject for key, job in ((JobKey.parse(job.key), job) for group in jobs.values() for job in group
                                                     if job.kind == JobKind.TRAIN)
                        if key.kind == JobKind.TRAIN and job.state == JobState.DONE
                        and (result_of(job, TrainResult) or TrainResult()).skipped}
    out = []
    for step in steps:
        step_jobs = jobs.get(step, [])
        states = [j.state for j in step_jobs]
        state = step_state(states)
        starts = [j.started_at for j in step_jobs if j.started_at]
        ends = [j.finished_at for j in step_jobs if j.finished_at]
        first = min(map(_aware, starts)) if starts else None
        last = max(map(_aware, ends)) if ends and state == "done" else now
        elapsed = _seconds(first, last)
        progress = StepProgress(step, "jobs", sum(s == "done" for s in states), len(step_jobs) or None, state,
                                len(step_jobs), elapsed)
        name = StepName.parse(step)
        kind, subject = name.kind, name.subject
        if kind == JobKind.GENERATE and subject is not None:  # a generate step always names its voter
            samples = int(round_.config.get("sampling", {}).get("samples", 1)) if subject == "student" else 1
            count, tokens = generated.get(subject, (0, 0))
            progress.unit = "samples" if subject == "student" else "questions"
            progress.total = pool_size(round_) * samples
            progress.completed = count
            progress.tokens_per_s = tokens / elapsed if elapsed and tokens else None
        elif kind == JobKind.TRAIN and step_jobs:
            _train_progress(progress, step_jobs[-1], now)
        elif kind == JobKind.TRAIN and round_.state == RoundState.DONE:
            progress.state = "skipped"  # planned for a variant the round never trained
        elif kind == JobKind.EVALUATE:
            if subject in skipped_variants or (not step_jobs and round_.state == RoundState.DONE):
                progress.state = "skipped"  # no candidate to evaluate
            elif step_jobs:
                _evaluate_progress(session, progress, step_jobs[-1])
        if progress.state == "running" and progress.rate is None:
            progress.rate, progress.eta_s = estimate(progress.completed, progress.total, elapsed)
        elif progress.state == "done" and elapsed:
            progress.rate = progress.completed / elapsed if progress.completed else None
        out.append(progress)
    return out


def generated_so_far(session: Session, round_id: int, jobs: list[Job]) -> dict[str, tuple[int, int]]:
    """voter → (samples generated, output tokens). A done chunk counts from its result; only the
    chunks begun and not done are counted in the generations table, on its unique index by their
    questions: a round of a million questions is never scanned whole. A voter with a done chunk
    whose result predates token counts is counted in the table, as before."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    begun: dict[str, list[Job]] = defaultdict(list)
    whole: set[str] = set()
    for job in jobs:
        if job.kind != JobKind.GENERATE:
            continue
        voter = job.step.partition(":")[2]  # the `jobs.step` column of a chunk: generate:<voter>
        # The stored result read as it is (thousands of chunks: no model per row); a result
        # without token counts sends the voter to the table.
        result = (job.result or {}) if job.state == JobState.DONE else {}
        if isinstance(result.get("output_tokens"), int):
            out[voter][0] += int(result["questions"]) * int(result["samples_per_question"])
            out[voter][1] += result["output_tokens"]
        elif job.state == JobState.DONE:
            whole.add(voter)
        elif job.attempts:  # a job never claimed has written nothing
            begun[voter].append(job)
    counted = {voter: (count, tokens) for voter, count, tokens in session.execute(
        select(Generation.voter, func.count(), func.coalesce(func.sum(Generation.output_tokens), 0))
        .where(Generation.round_id == round_id, Generation.voter.in_(whole)).group_by(Generation.voter))} if whole else {}
    for voter, begun_jobs in begun.items():
        if voter in whole:
            continue
        ids = sorted({qid for job in begun_jobs for qid in payload_of(job, GeneratePayload).question_ids})
        for start in range(0, len(ids), 5000):
            count, tokens = session.execute(
                select(func.count(), func.coalesce(func.sum(Generation.output_tokens), 0)).where(
                    Generation.round_id == round_id, Generation.voter == voter,
                    among(Generation.question_id, ids[start : start + 5000]))).one()
            out[voter][0] += count
            out[voter][1] += tokens
    return {**{voter: (count, tokens) for voter, (count, tokens) in out.items()}, **counted}


def round_notices(session: Session, round_: Round, census: MessageCensus | None, *, reconcile_s: float,
                  grace_s: float) -> dict[str, list[str]]:
    """step → what the counts do not say about its queued jobs: a job backing off after a failure
    (with the error), and, given the broker's census, a queue no worker consumes and jobs queued
    with no message (with what the reconciliation will do about them, and when)."""
    queued: dict[str, list[Job]] = defaultdict(list)
    for job in session.scalars(select(Job).where(Job.round_id == round_.id, Job.state == JobState.QUEUED).order_by(Job.id)
                               .options(defer(Job.payload))):
        queued[str(JobKey.parse(job.key).display_step)].append(job)
    notices: dict[str, list[str]] = {}
    for step, jobs in queued.items():
        lines = [f"job {job.id} backing off after attempt {job.attempts} of {job.max_attempts}: {_first_line(job.error)}"
                 for job in jobs if job.attempts and job.error]
        if census is not None:
            for queue in sorted({job.queue for job in jobs}):
                if not census.consumers.get(queue):
                    lines.append(f"queue {queue} has no consumer: start one (`w2sctl worker --role {queue}`)")
            missing = [job.id for job in jobs if not census.has_message(job.id)]
            if missing:
                if reconcile_s > 0 and census.consumers.get("control"):
                    fix = (f"the control worker's reconciliation sends them again within {reconcile_s + grace_s:.0f} s "
                           f"(it looks every {reconcile_s:g} s, re-sends after {grace_s:g} s without a message)")
                else:
                    fix = f"no control worker reconciles them: run `w2sctl round resume {round_.id}`"
                lines.append(f"job(s) {', '.join(map(str, missing))} queued with no message: {fix}")
        if lines:
            notices[step] = lines
    return notices


def _first_line(text: str | None, limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "no reason recorded"
    return line if len(line) <= limit else line[:limit] + "…"


def _train_progress(progress: StepProgress, job: Job, now: datetime) -> None:
    progress.unit = "steps"
    result = result_of(job, TrainResult) or TrainResult()
    if job.state == JobState.DONE:
        if result.skipped:
            progress.state, progress.completed, progress.total = "skipped", 0, 0
            return
        train = result.train or {}
        progress.completed = progress.total = train.get("steps") or 0
        progress.tokens_per_s = train.get("tokens_per_s")
        return
    record = last_training_step(job.log_path) if job.state == "running" else None
    progress.completed, progress.total = (record["step"], record.get("total_steps")) if record else (0, None)
    if record and job.started_at:  # the pace since the launch (model loading included)
        progress.rate, progress.eta_s = estimate(record["step"], record.get("total_steps"), _seconds(job.started_at, now))


def _evaluate_progress(session: Session, progress: StepProgress, job: Job) -> None:
    payload = payload_of(job, EvaluatePayload)
    size = session.scalar(select(func.count()).select_from(Question).where(Question.dataset_id == payload.dataset_id)) or 0
    total = min(size, payload.limit) if payload.limit else size
    progress.unit, progress.total = "questions", total
    progress.completed = total if job.state == JobState.DONE else round(job.progress * total)
    if job.state == JobState.DONE:
        evaluation = _fresh_evaluation(session, job)
        if evaluation is not None and evaluation.wall_s:
            progress.tokens_per_s = evaluation.output_tokens / evaluation.wall_s


def overall_progress(round_state: str, steps: list[StepProgress]) -> float:
    """Mean over the round's steps of the share of each done; a round that ended is complete."""
    if round_state == "done":
        return 1.0
    return sum(s.fraction for s in steps) / len(steps) if steps else 0.0


def pool_size(round_: Round) -> int:
    """How many pool questions the round answers (0 for weak-sft): the count its resolved ids keep
    (the ids themselves are rows of `round_questions`, never read here)."""
    return getattr(resolved_of(round_), "question_count", 0)


# Above this many pool questions a running round's status shows no live report: computing it reads
# and grades every generation of the round, about 35-50 µs a question on the 2-core machine
# (0.72 s at 20,000 questions, 3-4 s at 70,000), on every `round status` and every refresh. The
# vote's counts, stored in its job's result, stand in for it; the round stores the full report
# when it ends.
LIVE_REPORT_MAX_QUESTIONS = 10_000


def status_report(session: Session, round_: Round) -> dict[str, Any]:
    """The report the status views show: the stored one once the round ended, else the live one
    for pools up to LIVE_REPORT_MAX_QUESTIONS, else a note saying when it comes, with the vote's
    counts once the vote ran."""
    from services.report import round_report

    if round_.report:
        return round_.report
    pool = pool_size(round_)
    if pool > LIVE_REPORT_MAX_QUESTIONS:
        report: dict[str, Any] = {
            "round": round_.id, "stage": round_.stage, "iteration": round_.iteration,
            "deferred": f"{pool} pool questions: the accuracies are computed when the round ends" if round_.state ==
                        RoundState.RUNNING else f"{pool} pool questions: the round ended {round_.state} with no report"}
        vote = _vote_counts(session, round_.id)
        if vote is not None:
            report["vote"] = vote
            report["kept_share"] = vote["kept"] / vote["pool"] if vote["pool"] else 0.0
        return report
    return round_report(session, round_)


def _vote_counts(session: Session, round_id: int) -> dict[str, Any] | None:
    """The done vote job's stored counts (pool, voted, kept, dropped by step score, examples), read
    from its row alone: no generation is read."""
    result = session.scalar(select(Job.result).where(Job.round_id == round_id, Job.kind == JobKind.VOTE,
                                                     Job.state == JobState.DONE).order_by(Job.id.desc()).limit(1))
    if not result:
        return None
    vote = VoteResult.model_validate(result)
    return {"pool": vote.pool, "voted": vote.voted, "kept": vote.kept,
            "dropped_by_step_score": vote.dropped_by_step_score, "examples": vote.examples}


def known_metrics(session: Session, round_: Round) -> dict[str, Any]:
    """The report as far as it goes: the vote's figures once the vote ran, each accuracy once evaluated."""
    report = status_report(session, round_)
    evaluations = {JobKey.parse(job.key).display_step.detail: _accuracy(job) for job in session.scalars(
        select(Job).where(Job.round_id == round_.id, Job.kind == JobKind.EVALUATE, Job.state == JobState.DONE))}
    return {"report": report, "eval_accuracy": evaluations}


def _accuracy(job: Job) -> float | None:
    result = result_of(job, EvaluateResult)
    return None if result is None else result.accuracy


# --- reports, lineage, plot ----------------------------------------------------------------------


def _evaluation(session: Session, checkpoint_id: int, dataset_id: int | None, evaluation_ids: dict[int, int],
                n_questions: int | None = None) -> Evaluation | None:
    """The round's own evaluation of a checkpoint; else its newest greedy zero-shot one on the same dataset,
    on as many questions as the round evaluated if there is one."""
    if checkpoint_id in evaluation_ids:
        evaluation = session.get(Evaluation, evaluation_ids[checkpoint_id])
        if evaluation is not None:
            return evaluation
    query = select(Evaluation).where(Evaluation.checkpoint_id == checkpoint_id, Evaluation.dataset_id == dataset_id,
                                     # the gate's default method (cot/0-shot/<N>-new), at any budget; or stored
                                     # before labels named the budget
                                     (Evaluation.strategy == "cot/0-shot") | Evaluation.strategy.like("cot/0-shot/%"))
    # Same question count first (True sorts after False, hence desc), then the newest.
    order = [(Evaluation.n_questions == n_questions).desc()] if n_questions else []
    return session.scalar(query.order_by(*order, Evaluation.id.desc()).limit(1))


def _entry(name: str, status: str, evaluation: Evaluation | None, **extra: Any) -> dict[str, Any]:
    return {"checkpoint": name, "status": status, "accuracy": evaluation.accuracy if evaluation else None,
            "eval_questions": evaluation.n_questions if evaluation else None, **extra}


def round_summary(session: Session, round_: Round) -> dict[str, Any]:
    """One round's line of the pipeline table: its vote or pair figures, baseline and candidates."""
    report = status_report(session, round_)
    resolved = resolved_of(round_)
    evaluation_ids = {}
    for job in session.scalars(select(Job).where(Job.round_id == round_.id, Job.kind == JobKind.EVALUATE,
                                                 Job.state == JobState.DONE)):
        payload, result = payload_of(job, EvaluatePayload), result_of(job, EvaluateResult)
        # The eval (dev) split's figures: the report_on split's are in the report, next to them.
        if not payload.pass_at and result is not None and payload.dataset_id == resolved.eval_id:
            evaluation_ids[payload.checkpoint_id] = result.evaluation_id
    eval_id = resolved.eval_id
    baseline = session.get(Checkpoint, resolved.baseline_id)
    candidates = [_entry(c.name, c.status, _evaluation(session, c.id, eval_id, evaluation_ids), variant=c.variant)
                  for c in session.scalars(select(Checkpoint).where(Checkpoint.round_id == round_.id).order_by(Checkpoint.id))]
    return {
        "round": round_.id, "step": round_.pipeline_step, "stage": round_.stage, "iteration": round_.iteration,
        "state": round_.state, "outcome": round_.outcome,
        "kept_share": report.get("kept_share"), "kept_accuracy": report.get("kept_accuracy"),
        "pairs": report.get("pairs"), "chosen_accuracy": report.get("chosen_accuracy"),
        "baseline": None if baseline is None else _entry(
            baseline.name, baseline.status, _evaluation(session, baseline.id, eval_id, evaluation_ids)),
        "candidates": candidates,
        "report": report,
    }


def lineage(session: Session, summaries: list[dict[str, Any]], first_round: Round) -> list[dict[str, Any]]:
    """The checkpoints along the rounds, in order: the first round's baseline with the registered
    models it descends from, then each round's candidates, each with its eval accuracy."""
    chain: list[dict[str, Any]] = []
    first_resolved = resolved_of(first_round)
    baseline = session.get(Checkpoint, first_resolved.baseline_id)
    ancestors = []
    seen = set()
    parent = session.get(Checkpoint, baseline.parent_id) if baseline is not None and baseline.parent_id else None
    while parent is not None and parent.id not in seen:  # a cycle cannot happen, but a bad row must not hang us
        seen.add(parent.id)
        ancestors.append(parent)
        parent = session.get(Checkpoint, parent.parent_id) if parent.parent_id else None
    eval_id = first_resolved.eval_id
    first = summaries[0]["baseline"] if summaries else None
    for ancestor in reversed(ancestors):
        chain.append(_entry(ancestor.name, ancestor.status, _evaluation(
            session, ancestor.id, eval_id, {}, first["eval_questions"] if first else None), round=ancestor.round_id))
    if summaries and summaries[0]["baseline"] and baseline is not None:
        chain.append({**summaries[0]["baseline"], "round": baseline.round_id})
    for summary in summaries:
        for candidate in summary["candidates"]:
            chain.append({**{k: v for k, v in candidate.items() if k != "variant"}, "round": summary["round"]})
    return chain


def full_report(session: Session, round_id: int) -> dict[str, Any]:
    """`round report`: the round's report, and for a pipeline every round of it with the lineage."""
    from services.rounds import get_round

    round_ = get_round(session, round_id)
    if round_.pipeline_id is not None:
        rounds = list(session.scalars(select(Round).where(Round.pipeline_id == round_.pipeline_id).order_by(Round.id)))
    else:
        rounds = [round_]
    summaries = [round_summary(session, r) for r in rounds]
    this = next(s for s in summaries if s["round"] == round_id)
    return {
        "round": round_id, "stage": round_.stage, "iteration": round_.iteration, "state": round_.state,
        "outcome": round_.outcome, "error": round_.error, "pipeline": round_.pipeline_id,
        "report": this["report"],
        "rounds": [{k: v for k, v in s.items() if k != "report"} for s in summaries],
        "lineage": lineage(session, summaries, rounds[0]),
    }


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def report_figure(report: dict[str, Any]):
    """The figure `round report --plot` saves: eval accuracy of each checkpoint along the lineage
    (top), kept share and pseudo-label accuracy of each stage I round (bottom). Built on a bare
    Figure (Agg canvas): no pyplot, no display, safe in a server."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 7), layout="constrained")
    top, bottom = figure.subplots(2, 1)
    chain = report["lineage"]
    xs = list(range(len(chain)))
    top.plot(xs, [_nan(c["accuracy"]) for c in chain], marker="o", color="tab:blue", label="eval accuracy")
    promoted = [i for i, c in enumerate(chain) if c["status"] == "promoted"]
    rejected = [i for i, c in enumerate(chain) if c["status"] == "rejected"]
    top.scatter(promoted, [_nan(chain[i]["accuracy"]) for i in promoted], s=120, facecolors="none",
                edgecolors="tab:green", label="promoted", zorder=3)
    top.scatter(rejected, [_nan(chain[i]["accuracy"]) for i in rejected], s=80, marker="x", color="tab:red",
                label="rejected", zorder=3)
    top.set_xticks(xs, [c["checkpoint"] for c in chain], rotation=20, ha="right", fontsize=8)
    top.set_ylim(bottom=0)  # small differences stay small
    top.set_ylabel("eval accuracy")
    top.set_title(f"round {report['round']}" + (f", pipeline {report['pipeline']}" if report.get("pipeline") else "")
                  + ": checkpoints along the lineage")
    top.legend(loc="best", fontsize=8)

    voted = [r for r in report["rounds"] if r.get("kept_share") is not None]
    labels = [f"round {r['round']}" + (f"\n{r['step']}" if r.get("step") else "") for r in voted]
    rx = list(range(len(voted)))
    bottom.plot(rx, [_nan(r["kept_share"]) for r in voted], marker="s", color="tab:orange", label="kept share")
    bottom.plot(rx, [_nan(r["kept_accuracy"]) for r in voted], marker="o", color="tab:purple",
                label="pseudo-label accuracy (kept set)")
    bottom.set_xticks(rx, labels, fontsize=8)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("share")
    bottom.set_title("stage I votes per round" if voted else "no stage I vote in these rounds")
    bottom.legend(loc="best", fontsize=8)
    return figure


def save_report_plot(report: dict[str, Any], path: Path) -> Path:
    """Write the figure as PNG; a partial file never takes the target's name."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot {path}: the plot is written as PNG; give a file name ending in .png")
    if not path.parent.is_dir():
        raise InputError(f"--plot {path}: directory {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        report_figure(report).savefig(temporary, format="png", dpi=100)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def jobs_by_state_and_queue(session: Session) -> Counter:
    return Counter({(state, queue): n for state, queue, n in session.execute(
        select(Job.state, Job.queue, func.count()).group_by(Job.state, Job.queue))})
