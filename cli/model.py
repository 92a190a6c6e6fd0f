"""`w2sctl model`: register and list checkpoints."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table
from sqlalchemy import select

from cli.context import App, Group, console, pass_app
from db.schema import Checkpoint


@click.group(cls=Group)
def model() -> None:
    """Local model checkpoints (Hugging Face directories in safetensors)."""


@model.command("register")
@click.argument("name")
@click.option("--path", "path", required=True, type=click.Path(path_type=Path), help="Local checkpoint directory.")
@click.option("--role", type=click.Choice(["weak", "strong"]), required=True, help="Weak teacher or strong student.")
@click.option("--prompt-format", type=click.Choice(["plain", "chat"]), default="plain", show_default=True,
              help="plain: the reference's prompts (base models); chat: each prompt as a user turn of the "
                   "tokenizer's chat template (instruct models). Its trained students inherit it.")
@click.option("--decoding", "decoding", multiple=True, metavar="KEY=VALUE|neutral",
              help="Write over a generation_config.json decoding setting whenever the model loads "
              "(e.g. repetition_penalty=1.0); 'neutral': every setting it changes, back to plain decoding.")
@pass_app
def model_register(app: App, name: str, path: Path, role: str, prompt_format: str, decoding: tuple[str, ...]) -> None:
    from models.backends.decoding import decoding_changes, describe, parse_overrides, read_generation_config
    from services.registry import register_model

    file_config = read_generation_config(path)
    try:
        overrides = parse_overrides(decoding, file_config)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--decoding") from None
    with app.session() as session:
        checkpoint = register_model(session, name=name, path=path, role=role, prompt_format=prompt_format,
                                    decoding=overrides)
        console.print(f"registered {role} model {checkpoint.name!r} at {checkpoint.path}"
                      + (" (chat prompts)" if prompt_format == "chat" else ""))
    line = describe(*decoding_changes(file_config), overrides)
    if line:
        console.print(line, soft_wrap=True, markup=False)


@model.command("list")
@pass_app
def model_list(app: App) -> None:
    """Every checkpoint: registered models and the candidates rounds trained."""
    with app.session() as session:
        table = Table("id", "name", "role", "status", "parent", "round", "eval acc", "path")
        names = dict(session.execute(select(Checkpoint.id, Checkpoint.name)).all())
        for ckpt in session.scalars(select(Checkpoint).order_by(Checkpoint.id)):
            accuracy = (ckpt.metrics or {}).get("eval_accuracy")
            table.add_row(str(ckpt.id), ckpt.name, ckpt.role, ckpt.status, names.get(ckpt.parent_id, ""),
                          str(ckpt.round_id or ""), "" if accuracy is None else f"{accuracy:.1%}", ckpt.path)
        console.print(table)
