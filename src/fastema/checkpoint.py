"""Checkpoint files: written atomically, read with `weights_only=True`, errors that name the file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(obj: object, path: str | os.PathLike, **torch_save_kwargs) -> Path:
    """`torch.save` to a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or kill at any moment leaves either the previous file or the new one, never a
    truncated mix: the rename is atomic on POSIX and Windows file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            torch.save(obj, stream, **torch_save_kwargs)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """`torch.load(weights_only=True)`; a missing, truncated or corrupt file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # zip, pickle and EOF errors all mean the same to the caller
        raise RuntimeError(
            f"Cannot read checkpoint {path}: truncated, corrupt or not a weights-only torch file ({error})"
        ) from error
