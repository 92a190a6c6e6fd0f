"""The checkpoint store: one directory (W2S_CHECKPOINT_DIR, a shared volume in a cluster) that
every trained checkpoint and job work directory lives under. Names become paths only here."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from services.errors import InputError


def checkpoint_path(store: Path, name: str) -> Path:
    """`store/name`, refusing a name that could point elsewhere: empty, absolute, with `..`, or
    resolving (through symlinks) outside the store."""
    if not name or not name.strip():
        raise InputError("checkpoint name: empty")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or name.startswith(("/", "\\", "~")):
        raise InputError(f"checkpoint name {name!r}: an absolute path; names are relative to the checkpoint store")
    if ".." in parts:
        raise InputError(f"checkpoint name {name!r}: '..' is not allowed; names stay inside the checkpoint store")
    root = Path(store).resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise InputError(f"checkpoint name {name!r}: resolves to {path}, outside the checkpoint store {root}")
    return root / name
