"""The root of `w2sctl`: every command group is imported here and added once."""

from __future__ import annotations

import click

from cli.checkpoint import checkpoint_group
from cli.context import Group
from cli.dataset import dataset
from cli.db import db
from cli.demo import demo
from cli.evaluation import eval_group, solve_command
from cli.export import export
from cli.jobs import jobs
from cli.metrics import metrics
from cli.model import model
from cli.pipeline import pipeline
from cli.queues import queues
from cli.round import round_
from cli.worker import worker


@click.group(cls=Group)
@click.version_option(package_name="w2s")
def cli() -> None:
    """w2s: weak-to-strong reasoning as a job service."""


for command in (db, dataset, model, round_, pipeline, jobs, export, worker, demo, solve_command, eval_group, queues,
                metrics, checkpoint_group):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="w2sctl")
