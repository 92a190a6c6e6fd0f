"""`w2sctl checkpoint merge`: a LoRA checkpoint merged into its base model, as a full model.

Thin: resolve the source (a registered model's name or a directory), call
``models.train.checkpoint.merge_lora``, optionally register the result, print.
"""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import select

from cli.context import App, Group, console, pass_app
from db.schema import Checkpoint
from services.errors import InputError


@click.group("checkpoint", cls=Group)
def checkpoint_group() -> None:
    """Trained checkpoints: LoRA merge."""


@checkpoint_group.command("merge")
@click.argument("source")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory to write the merged model to (must not exist).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory; default: the one the adapter was trained on.")
@click.option("--register", "register_as", metavar="NAME",
              help="Register the merged model under NAME (same role; its parent is the adapter's checkpoint).")
@pass_app
def checkpoint_merge(app: App, source: str, out_dir: Path, base_dir: Path | None, register_as: str | None) -> None:
    """Merge the LoRA adapter SOURCE (a registered model name or a directory) into its base model."""
    from models.train.checkpoint import is_lora_checkpoint, merge_lora
    from services.registry import validate_name

    registered = None
    path = Path(source)
    if not path.is_dir():
        with app.session() as session:
            registered = session.scalar(select(Checkpoint).where(Checkpoint.name == source))
            if registered is None:
                raise InputError(f"{source!r} is neither a directory nor a registered model name")
            path = Path(registered.path)
            registered = {"id": registered.id, "role": registered.role, "round_id": registered.round_id,
                          "lineage_root_id": registered.lineage_root_id, "prompt_format": registered.prompt_format}
    if not is_lora_checkpoint(path):
        raise InputError(f"{source}: not a LoRA checkpoint (no adapter_config.json in {path}); nothing to merge")
    if register_as:
        validate_name(register_as, "model name")
        if registered is None:
            raise InputError("--register: give SOURCE as a registered model name, so the merged model has a parent")
    try:
        merged = merge_lora(path, out_dir, base_dir=base_dir)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from None
    console.print(f"merged {path} into a full model at {merged}")
    if register_as:
        with app.session() as session:
            if session.scalar(select(Checkpoint).where(Checkpoint.name == register_as)) is not None:
                raise InputError(f"a model named {register_as!r} already exists (the merged model stays at {merged})")
            session.add(Checkpoint(name=register_as, path=str(merged.resolve()), role=registered["role"],
                                   status="base", parent_id=registered["id"],
                                   lineage_root_id=registered["lineage_root_id"] or registered["id"],
                                   round_id=registered["round_id"], metrics={"merged_from": str(path)},
                                   prompt_format=registered["prompt_format"]))
        console.print(f"registered {register_as!r}")
