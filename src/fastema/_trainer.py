"""What the trainer integrations share: an EMA driven by the optimizers' step hooks.

Lightning and the Hugging Face `Trainer` both step torch optimizers; a step post-hook on them
runs after every step that really happened: once per optimizer step under gradient
accumulation, never for a step that an AMP `GradScaler` skipped. `StepDrivenEMA` counts those
steps, starts the EMA after `start` of them, updates it after each one, swaps it into the model
for evaluation and carries its state into the frameworks' checkpoints. It holds no EMA math of
its own: that is `ModelEMA`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from numbers import Integral, Real
from typing import Any

from torch import nn

from ._hooks import RemovableHandle, attach_to_optimizer
from .engine import ModelEMA
from .schedules import DecayWarmup

STATE_FORMAT = "fastema.StepDrivenEMA"
STATE_VERSION = 1


def check_start(value: object) -> int | float:
    """When an EMA starts: an int number of optimizer steps, or a float fraction of all steps in [0, 1)."""
    accepted = "an int number of optimizer steps >= 0 or a float fraction of training in [0, 1)"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid start: {value!r}; expected {accepted}")
    if isinstance(value, Integral):
        if value < 0:
            raise ValueError(f"Invalid start: {value}; expected {accepted}")
        return int(value)
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"Invalid start: {value}; expected {accepted}")
    return float(value)


class ModelEMAFactory:
    """Builds each fit's `ModelEMA` (a picklable callable: Lightning's `ddp_spawn` pickles the callbacks)."""

    def __init__(self, decay: float, warmup: DecayWarmup | None, options: dict[str, Any]) -> None:
        self.decay, self.warmup, self.options = decay, warmup, options
        self(nn.Linear(1, 1))  # every option checked now, when the callback is built, not at fit

    def __call__(self, model: nn.Module) -> ModelEMA:
        return ModelEMA(model, self.decay, warmup=self.warmup, **self.options)


class StepDrivenEMA:
    """A `ModelEMA` updated by optimizer step hooks, with a start, evaluation swaps and a checkpointable state."""

    def __init__(self, make_engine: Callable[[nn.Module], Any], start: int | float) -> None:
        self.make_engine = make_engine
        self.start = check_start(start)
        self.engine: Any = None
        self.steps = 0  # optimizer steps since the fit began (or since the run began, when resumed)
        self.started = False
        self._start_step = 0
        self._handles: list[RemovableHandle] = []
        self._swap: ExitStack | None = None
        self._pending: dict | None = None  # a checkpoint's state that arrived before the engine

    def begin(self, model: nn.Module, optimizers: Iterable[Any], total_steps: int | None) -> None:
        """Build the engine on `model` (where it trains) and hook it to the optimizers."""
        self.end()
        self.engine = self.make_engine(model)
        if isinstance(self.start, float):
            if not total_steps:
                raise ValueError(
                    f"Invalid start: {self.start} (a fraction), but the number of training steps is unknown"
                )
            self._start_step = round(self.start * total_steps)
        else:
            self._start_step = self.start
        self.steps, self.started = 0, self._start_step == 0
        self._handles = [attach_to_optimizer(optimizer, self._after_step) for optimizer in optimizers]
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def _after_step(self) -> None:
        self.steps += 1
        if self.started:
            self.engine.update()
        elif self.steps >= self._start_step:
            self.engine.reset()  # the EMA starts from the weights after `start` steps
            self.started = True

    @property
    def averaging(self) -> bool:
        """Whether there is an EMA that differs from the model: started and updated at least once."""
        return self.engine is not None and self.started and self.engine.num_updates > 0

    def swap_in(self, *args: Any) -> None:
        """Put the EMA weights into the model for an evaluation (a no-op before the EMA has moved)."""
        if self._swap is None and self.averaging:
            self._swap = ExitStack()
            self._swap.enter_context(self.engine.use_ema_weights(*args))

    def swap_out(self) -> None:
        """Put the model's own weights back, exactly."""
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    def end(self, replace_weights: bool = False) -> None:
        """Detach from the optimizers (and copy the EMA into the model if asked)."""
        self.swap_out()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if replace_weights and self.averaging:
            self.engine.copy_to()

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "engine": self.engine.state_dict() if self.engine else None,
            "steps": self.steps,
            "started": self.started,
        }

    def load_state_dict(self, state: object) -> None:
        """Restore from `state_dict()`: now if the engine exists, else when `begin` builds it."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"Invalid EMA state: not a {STATE_FORMAT} v{STATE_VERSION} state")
        if self.engine is None:
            self._pending = state
            return
        if state["engine"] is not None:
            self.engine.load_state_dict(state["engine"])
        self.steps, self.started = int(state["steps"]), bool(state["started"])
