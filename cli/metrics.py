"""`w2sctl metrics`: Prometheus metrics of the service."""

from __future__ import annotations

import time

import click

from cli.context import App, Group, console, pass_app

DEFAULT_METRICS_PORT = 9464  # any free port will do; workers take their own with W2S_METRICS_PORT


@click.group(cls=Group)
def metrics() -> None:
    """Prometheus metrics of the service (workers export their own with W2S_METRICS_PORT)."""


@metrics.command("serve")
@click.option("--host", default="0.0.0.0", show_default=True, envvar="W2S_METRICS_ADDR")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_METRICS_PORT, show_default=True)
@click.option("--no-inspect", is_flag=True, help="Do not ask workers (Celery inspect) at each scrape.")
@pass_app
def metrics_serve(app: App, host: str, port: int, no_inspect: bool) -> None:
    """Serve /metrics: jobs by state and queue, queue depth, round progress, tokens/s, eval accuracy."""
    from services.logs import configure_logging
    from services.metrics import serve

    configure_logging(fmt=app.settings.log_format)
    with app.session():
        pass  # the schema check, once, before the first scrape
    try:
        server, _thread = serve(app.settings, host, port, inspect_workers=not no_inspect)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    console.print(f"serving metrics on http://{host}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


@metrics.command("show")
@click.option("--no-inspect", is_flag=True, help="Do not ask workers (Celery inspect).")
@pass_app
def metrics_show(app: App, no_inspect: bool) -> None:
    """Print what one scrape of `metrics serve` would return."""
    from services.metrics import render

    with app.session():
        pass
    click.echo(render(app.settings, inspect_workers=not no_inspect), nl=False)
