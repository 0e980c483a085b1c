"""Optional frameworks: a missing one raises an ImportError that says which extra to install."""

from __future__ import annotations

import importlib
import warnings


def missing_extra(error: ModuleNotFoundError, extra: str, what: str) -> ImportError:
    """The error to raise when `what` cannot import `error.name`: `pip install "fastema[extra]"` brings it."""
    package = (error.name or "a package").split(".")[0]  # `lightning`, not `lightning.pytorch`
    return ImportError(f'{what} needs {package}, which is not installed: pip install "fastema[{extra}]"')


def require(extra: str, what: str, *modules: str) -> None:
    """Import `modules` (before any work starts), or raise `missing_extra` for the first one missing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            raise missing_extra(error, extra, what) from error


def warn_moved(old: str, new: str) -> None:
    """A module kept at its old import path re-exports its successor and says where that is."""
    warnings.warn(
        f"{old} moved to {new}; import from {new} (the old path goes in a later release)",
        DeprecationWarning,
        stacklevel=3,  # the line that imported the old path (warnings skips importlib's own frames)
    )
