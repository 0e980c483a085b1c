"""The failure latch: an update that failed part-way leaves an EMA incomplete, and nothing may read it as if whole."""

from __future__ import annotations

from typing import NoReturn


class FailureLatch:
    """Holds the error of a failed update; `check()` raises until something overwrites the whole EMA (`clear()`)."""

    def __init__(self, remedy: str) -> None:
        self.remedy = remedy  # what the user can call to continue: "reset() or load()/load_state_dict()"
        self.error: BaseException | None = None

    def fail(self, error: BaseException, hint: str = "") -> NoReturn:
        """Latch `error` and raise it as the RuntimeError every later call will see."""
        self.error = error
        message = f"An EMA update failed ({error}); the EMA is now incomplete. {hint}{self.remedy}."
        raise RuntimeError(message) from error

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(
                f"The EMA is incomplete: an earlier update failed ({self.error}). Call {self.remedy} to continue."
            ) from self.error

    def clear(self) -> None:
        self.error = None
