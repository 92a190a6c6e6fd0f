"""Prometheus metrics of the whole service, read from the database and the broker at each scrape
(`w2sctl metrics serve`). Workers export their own (workers/telemetry.py).

    w2s_jobs{state,queue}                         jobs in the database
    w2s_rounds{state}                             rounds in the database
    w2s_queue_depth{queue}                        messages waiting in the broker
    w2s_queue_oldest_waiting_seconds{queue}       age of the oldest queued job
    w2s_queue_consumers{queue}                    workers consuming the queue
    w2s_round_progress{round,stage}               0..1, running rounds and the newest ones
    w2s_round_step_progress{round,step}           0..1 per step
    w2s_generation_tokens_per_second{round,step}  generated tokens per wall-clock second of the step
    w2s_training_tokens_per_second{round,step}    training tokens per second (all ranks)
    w2s_round_eval_accuracy{round,checkpoint}     the round's greedy evaluations
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select

from db.schema import Job, Round
from db.session import session_scope
from services.config import QUEUES
from services.contracts import EvaluatePayload, EvaluateResult, JobKind, JobState, RoundState, payload_of, result_of
from services.monitor import jobs_by_state_and_queue, oldest_waiting, overall_progress, round_progress
from services.settings import Settings

log = logging.getLogger("w2s.metrics")

JOB_STATES = tuple(str(state) for state in JobState)
ROUND_STATES = tuple(str(state) for state in RoundState)
RECENT_ROUNDS = 10  # besides the running ones: finished rounds stay visible a while


def rounds_to_export(session) -> list[Round]:
    recent = select(Round.id).order_by(Round.id.desc()).limit(RECENT_ROUNDS)
    shown = (Round.state == RoundState.RUNNING) | Round.id.in_(recent)
    return list(session.scalars(select(Round).where(shown).order_by(Round.id)))


class ServiceCollector:
    """A custom collector: every scrape reads the current state, nothing is cached between scrapes."""

    def __init__(self, settings: Settings, *, inspect_timeout: float = 1.0, inspect_workers: bool = True) -> None:
        self.settings = settings
        self.inspect_timeout = inspect_timeout
        self.inspect_workers = inspect_workers

    def describe(self) -> list:
        return []  # collected at scrape time only (registration must not query the database)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        with session_scope(self.settings.database_url) as session:
            jobs = GaugeMetricFamily("w2s_jobs", "Jobs in the database by state and queue", labels=["state", "queue"])
            counts = jobs_by_state_and_queue(session)
            queues = sorted(set(QUEUES) | {q for _, q in counts})
            for state in sorted(set(JOB_STATES) | {s for s, _ in counts}):
                for queue in queues:
                    jobs.add_metric([state, queue], counts.get((state, queue), 0))
            yield jobs

            rounds = GaugeMetricFamily("w2s_rounds", "Rounds in the database by state", labels=["state"])
            by_state = dict(session.execute(select(Round.state, func.count()).group_by(Round.state)).all())
            for state in sorted(set(ROUND_STATES) | set(by_state)):
                rounds.add_metric([state], by_state.get(state, 0))
            yield rounds

            oldest = GaugeMetricFamily("w2s_queue_oldest_waiting_seconds",
                                       "Age of the oldest queued job (0 when none waits)", labels=["queue"])
            for queue, entry in oldest_waiting(session).items():
                oldest.add_metric([queue], entry["oldest_waiting_s"] or 0.0)
            yield oldest

            yield from self._round_metrics(session, GaugeMetricFamily)
        if self.settings.broker_url:
            yield from self._broker_metrics(GaugeMetricFamily, self.settings.broker_url)

    def _round_metrics(self, session, GaugeMetricFamily) -> Iterator[Any]:
        progress = GaugeMetricFamily("w2s_round_progress", "Share of the round's work done (0..1)", labels=["round", "stage"])
        steps = GaugeMetricFamily("w2s_round_step_progress", "Share of each step's work done (0..1)", labels=["round", "step"])
        generation = GaugeMetricFamily("w2s_generation_tokens_per_second",
                                       "Generated tokens per wall-clock second of a generation or evaluation step",
                                       labels=["round", "step"])
        training = GaugeMetricFamily("w2s_training_tokens_per_second", "Training tokens per second, all ranks",
                                     labels=["round", "step"])
        accuracy = GaugeMetricFamily("w2s_round_eval_accuracy", "Greedy eval accuracy of a checkpoint in a round",
                                     labels=["round", "checkpoint"])
        for round_ in rounds_to_export(session):
            label = str(round_.id)
            entries = round_progress(session, round_)
            progress.add_metric([label, round_.stage], overall_progress(round_.state, entries))
            for entry in entries:
                steps.add_metric([label, entry.step], entry.fraction)
                if entry.tokens_per_s is not None:
                    family = training if entry.step.startswith("train:") else generation
                    family.add_metric([label, entry.step], entry.tokens_per_s)
            for job in session.scalars(select(Job).where(Job.round_id == round_.id, Job.kind == JobKind.EVALUATE,
                                                         Job.state == JobState.DONE)):
                payload, result = payload_of(job, EvaluatePayload), result_of(job, EvaluateResult)
                if not payload.pass_at and result is not None:
                    accuracy.add_metric([label, _checkpoint_name(session, payload.checkpoint_id)], result.accuracy)
        yield from (progress, steps, generation, training, accuracy)

    def _broker_metrics(self, GaugeMetricFamily, broker_url: str) -> Iterator[Any]:
        from services.monitor import broker_depths, control_app, inspect_workers

        depth = GaugeMetricFamily("w2s_queue_depth", "Messages waiting in the broker", labels=["queue"])
        try:
            for queue, n in broker_depths(broker_url).items():
                depth.add_metric([queue], n)
        except Exception as exc:  # noqa: BLE001 - a broker outage shows as a missing series, not a failed scrape
            log.warning("broker unreachable: %s", exc)
            return
        yield depth
        if not self.inspect_workers:
            return
        consumers = GaugeMetricFamily("w2s_queue_consumers", "Workers consuming the queue", labels=["queue"])
        with control_app(broker_url) as app:
            workers = inspect_workers(app, self.inspect_timeout)
        for queue in QUEUES:
            consumers.add_metric([queue], sum(queue in w["queues"] for w in workers))
        yield consumers


def _checkpoint_name(session, checkpoint_id: int) -> str:
    from db.schema import Checkpoint

    checkpoint = session.get(Checkpoint, checkpoint_id)
    return checkpoint.name if checkpoint is not None else str(checkpoint_id)


def service_registry(settings: Settings, **options: Any):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(settings, **options))
    return registry


def render(settings: Settings, **options: Any) -> str:
    """The exposition text one scrape would return."""
    from prometheus_client import generate_latest

    return generate_latest(service_registry(settings, **options)).decode()


def serve(settings: Settings, host: str, port: int, **options: Any):
    """Start the endpoint in a background thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=service_registry(settings, **options))
