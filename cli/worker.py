"""`w2sctl worker`: a Celery worker for some roles or queues."""

from __future__ import annotations

import click

from cli.context import App, pass_app
from db.session import ensure_schema
from services.config import QUEUES


@click.command("worker")
@click.option("--role", "roles", default=None, help="weak, strong, train or control (comma-separated for several).")
@click.option("--queues", default=None, help=f"Queues to consume, instead of --role (default: {','.join(QUEUES)}).")
@click.option("--gpus", default=None, help="GPU indices, e.g. 0,1: model roles run one process per GPU.")
@click.option("--concurrency", type=int, default=None, help="Processes (default: 1 per GPU for model roles, else 1).")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default=None,
              help="Engine for the models (vllm: one solo process over all --gpus; start one worker per GPU set).")
@click.option("--loglevel", default="info", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default: celery@<host>).")
@pass_app
def worker(app: App, roles: str | None, queues: str | None, gpus: str | None, concurrency: int | None,
           backend: str | None, loglevel: str, hostname: str | None) -> None:
    """Consume jobs from the broker (W2S_BROKER_URL)."""
    import os

    from celery.utils.nodenames import default_nodename, host_format

    from workers.roles import apply_gpus, celery_argv, plan_worker
    from workers.watchdog import start_watchdog

    if app.settings.embedded:
        raise click.ClickException("W2S_BROKER_URL is not set: embedded mode runs jobs in-process, no worker needed")
    plan = plan_worker(roles=roles, queues=queues, gpus=gpus, concurrency=concurrency, backend=backend)
    ensure_schema(app.settings.database_url)
    apply_gpus(plan)
    os.environ["W2S_WORKER_NAME"] = host_format(default_nodename(hostname))  # job owners name the node
    # The worker's settings are read once more, now that its GPUs and name are in the environment
    # its pool processes inherit (workers.app: the Celery app's edge).
    from workers.app import app as celery_app
    from workers.app import settings as worker_settings

    if plan.watchdog:
        start_watchdog(worker_settings, worker_settings.delivery.watchdog_s)
    threads, source = app.torch_threads
    click.echo(f"worker {os.environ['W2S_WORKER_NAME']}: torch intra-op threads: {threads} per process ({source})")
    celery_app.worker_main(celery_argv(plan, loglevel=loglevel, hostname=hostname))
