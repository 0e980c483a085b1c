"""Checkpoint files: written atomically, read with `weights_only=True`, errors that name the file."""

from __future__ import annotations

import glob
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from .parallel import rank

_TEMPORARY_SUFFIX = ".tmp"


def _temporary_name(path: Path) -> str:
    """`.name.HOST.PID.RANDOM.tmp` beside `path`: whose it is, so that a later save can clean up after a kill."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}"


def _remove_abandoned_temporaries(path: Path) -> None:
    """Delete temporaries of `path` left by killed writers: this host's, from processes that no longer exist."""
    if os.name != "posix":  # elsewhere os.kill(pid, 0) does not merely ask: it ends the process
        return
    host = socket.gethostname()
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*{_TEMPORARY_SUFFIX}"):
        owner = candidate.name[len(path.name) + 2 : -len(_TEMPORARY_SUFFIX)].rsplit(".", 2)  # HOST, PID, RANDOM
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue
        try:
            os.kill(int(owner[1]), 0)
        except ProcessLookupError:
            candidate.unlink(missing_ok=True)
        except OSError:  # alive but not ours to signal, or no way to ask
            continue


def atomic_save(obj: object, path: str | os.PathLike, **torch_save_kwargs) -> Path:
    """`torch.save` to a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or kill at any moment leaves either the previous file or the new one, never a
    truncated mix: the rename is atomic on POSIX and Windows file systems (a symlink is written
    through; a hard link to the old file keeps the old contents). The file gets the
    permissions a plain `torch.save` would give it (the umask's, or those of the file it
    replaces), and temporaries that killed writers left behind are removed.
    """
    path = Path(path)
    if path.is_symlink():  # write through the link, as torch.save does, not over it
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(path)
    temporary = path.parent / _temporary_name(path)
    try:
        # Mode 0o666 through the umask, as open() gives (mkstemp would give 0o600).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise type(error)(error.errno, f"Cannot write checkpoint {path}: {error.strerror}") from error
    try:
        with os.fdopen(descriptor, "wb") as stream:
            if path.exists():
                os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
            torch.save(obj, stream, **torch_save_kwargs)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
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


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> object:
    """`torch.load(weights_only=True)`; a missing, truncated or corrupt file raises an error naming it.

    `mmap=True` maps the tensors' bytes instead of reading them (for headers, or streaming one file at a time).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # zip, pickle and EOF errors all mean the same to the caller
        raise RuntimeError(
            f"Cannot read checkpoint {path}: truncated, corrupt or not a weights-only torch file ({error})"
        ) from error


def save_on_rank_0(state: object, path: str | os.PathLike) -> Path:
    """`atomic_save(state, path)` on rank 0 only (under `torch.distributed`); the path, on every rank."""
    if rank() == 0:
        atomic_save(state, path)
    return Path(path)


def load_into(path: str | os.PathLike, load_state_dict: Callable[[dict], None], kind: str) -> None:
    """Read the checkpoint at `path` and pass it to `load_state_dict`; a bad file raises a ValueError naming it."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise ValueError(f"Invalid checkpoint {path}: not a {kind} state")
    try:
        load_state_dict(state)
    except ValueError as error:
        raise ValueError(f"Invalid checkpoint {path}: {error}") from error
