"""What the trainer integrations share: an EMA driven by the optimizers' step hooks.

Lightning and the Hugging Face `Trainer` both step torch optimizers; a step post-hook on them
runs after every step that really happened: once per optimizer step under gradient
accumulation, never for a step that an AMP `GradScaler` skipped. `StepDrivenEMA` counts those
steps, starts the EMA after `start` of them, updates it after each one, swaps it into the model
for evaluation and carries its state into the frameworks' checkpoints. It holds no EMA math of
its own: that is `ModelEMA`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from numbers import Integral, Real
from typing import Any

from torch import nn

from .averagers.bema import BEMA
from .core.checks import check_flag
from .core.hooks import RemovableHandle, attach_to_optimizer
from .core.model_ema import ModelEMA
from .core.parallel import unwrap_model
from .core.schedules import DecayWarmup, SwitchEMA, check_switch

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
    """Builds each fit's `ModelEMA` (a picklable callable: Lightning's `ddp_spawn` pickles the callbacks).

    With `half_life`, the decay comes from the global batch the framework reports (`batch_size` in the
    options overrides it: give it when `half_life` counts tokens).
    """

    def __init__(
        self, decay: float | None, warmup: DecayWarmup | None, options: dict[str, Any], half_life: float | None = None
    ) -> None:
        self.decay, self.warmup, self.options, self.half_life = decay, warmup, options, half_life
        # Every option checked now, when the callback is built, not at fit. `tensor_names` name the
        # real model's tensors: checked for type here, against the model when the EMA is built.
        names = options.get("tensor_names")
        if names is not None and (isinstance(names, str) or not all(isinstance(name, str) for name in names)):
            raise TypeError(f"Invalid tensor_names: {names!r}; expected a sequence of state-dict names")
        checked = {k: v for k, v in options.items() if k != "tensor_names"}
        if half_life is not None:
            checked.setdefault("batch_size", 1.0)  # the real one is known at fit
        ModelEMA(nn.Linear(1, 1), decay, warmup=warmup, half_life=half_life, **checked)

    def __call__(self, model: nn.Module, batch_size: float | None = None) -> ModelEMA:
        options = dict(self.options)
        if self.half_life is not None:
            options.setdefault("batch_size", batch_size)
            if options["batch_size"] is None:
                raise ValueError(
                    "Invalid batch_size: None; half_life needs the global batch, which this trainer does not report: "
                    "give EMACallback(..., batch_size=...) (samples or tokens per optimizer step, all ranks together)"
                )
        return ModelEMA(model, self.decay, warmup=self.warmup, half_life=self.half_life, **options)


class BEMAFactory:
    """Builds each fit's `BEMA` (picklable, as `ModelEMAFactory`); every setting checked when the callback is built."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        BEMA(nn.Linear(1, 1), **{k: v for k, v in settings.items() if k != "tensor_names"})

    def __call__(self, model: nn.Module, batch_size: float | None = None) -> BEMA:
        return BEMA(model, **self.settings)


class StepDrivenEMA:
    """A `ModelEMA` moved after optimizer steps, with a start, evaluation swaps and a checkpointable state.

    `per_batch=False`: one update after every optimizer step (the step hook). `per_batch=True`:
    the hooks only note that a step happened and `end_batch()` updates once (Lightning's manual
    optimization may step several optimizers in one batch; the EMA should see the batch's result).
    Steps are counted from the run's start (`begin(..., steps_so_far=...)`), so `start` means the
    same whether a run is resumed or not.
    """

    def __init__(
        self,
        make_engine: Callable[..., Any],
        start: int | float,
        per_batch: bool = False,
        switch: SwitchEMA | int | None = None,
    ) -> None:
        self.make_engine = make_engine
        self.start = check_start(start)
        self.per_batch = per_batch
        self.switch = check_switch(switch)
        self.batch_size: float | None = None  # the global batch, for an EMA length in samples
        self.engine: Any = None
        self.steps = 0  # optimizer steps (batches with one, per_batch) since the run began
        self.started = False
        self.running = False
        self._start_step = 0
        self._stepped = False
        self._handles: list[RemovableHandle] = []
        self._swap: ExitStack | None = None
        self._pending: dict | None = None  # a checkpoint's state that arrived before the engine it is for
        self._source: object = None  # where the last state loaded came from, for its errors

    def begin(
        self,
        model: nn.Module,
        optimizers: Iterable[Any],
        total_steps: float | None,
        steps_so_far: int = 0,
        batch_size: float | None = None,
    ) -> None:
        """Start (or continue) averaging `model` (where it trains) and hook the optimizers.

        The EMA continues when the same model continues from where the last run of this EMA
        stopped (a second `fit` on the same trainer); otherwise a new one is built. `batch_size`:
        the global batch of this run (samples per optimizer step), for an EMA length in samples.
        """
        self.batch_size = batch_size
        continuing = (
            self.engine is not None
            and self.engine.model is unwrap_model(model)
            and self._pending is None
            and steps_so_far == self.steps
            and steps_so_far > 0
        )
        self.end()
        if isinstance(self.start, float):
            if not total_steps or not math.isfinite(total_steps):
                raise ValueError(
                    f"Invalid start: {self.start} (a fraction of training), but the number of training steps is "
                    f"unknown ({total_steps}); give start as an int number of steps"
                )
            self._start_step = round(self.start * total_steps)
        else:
            self._start_step = self.start
        if not continuing:
            self.engine = self.make_engine(model, batch_size)
            self.steps, self.started = steps_so_far, steps_so_far >= self._start_step
            if self.started and steps_so_far > 0:
                self.engine.reset()  # resumed past `start` without the EMA's state: it starts from here
        self._stepped = False
        self._handles = [attach_to_optimizer(optimizer, self._after_step) for optimizer in optimizers]
        self.running = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load(pending)

    def _after_step(self) -> None:
        if self.per_batch:
            self._stepped = True
        else:
            self._advance(self.steps + 1, stepped=True)

    def end_batch(self, steps: int) -> None:
        """After a training batch (per_batch): one update if any optimizer stepped in it.

        `steps`: the framework's count of optimizer steps so far (Lightning's `global_step`, which
        counts every optimizer's steps): `start` and a continuing run are measured in it.
        """
        stepped, self._stepped = self._stepped, False
        self._advance(steps, stepped)

    def _advance(self, steps: int, stepped: bool) -> None:
        self.steps = steps
        if self.started:
            if stepped:
                self.engine.update()
                # Not before the first real update (update_every > 1): the EMA still holds its start weights.
                due = self.switch is not None and self.switch.due(self.engine.num_steps, "step")
                if due and self.engine.num_updates:
                    self.engine.switch()
        elif self.steps >= self._start_step:
            self.engine.reset()  # the EMA starts from the weights after `start` steps
            self.started = True

    def end_epoch(self, epochs: int) -> None:
        """At the end of an epoch's training (`epochs` done): Switch EMA, if one is due."""
        if self.switch is not None and self.averaging and self.switch.due(epochs, "epoch"):
            self.engine.switch()

    @property
    def averaging(self) -> bool:
        """Whether there is an EMA that differs from the model: started and updated at least once."""
        return self.engine is not None and self.started and self.engine.num_updates > 0

    def swap_in(self, *args: Any) -> None:
        """Put the EMA weights into the model for an evaluation (a no-op before the EMA has moved)."""
        if self._swap is None and self.averaging:
            swap = ExitStack()
            swap.enter_context(self.engine.use_ema_weights(*args))
            self._swap = swap

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
        self.running = False
        if replace_weights and self.averaging:
            self.engine.copy_to()

    def warn_if_not_started(self, who: str) -> None:
        """At the end of training: say so if `start` was never reached (there is no EMA to use)."""
        if self.engine is not None and not self.started:
            warnings.warn(
                f"{who}: training ended after {self.steps} optimizer steps, before start ({self._start_step}); "
                "there is no EMA (reading it raises) and replace_weights did nothing",
                UserWarning,
                stacklevel=3,
            )

    def ema_module(self, who: str) -> nn.Module:
        """The EMA model, or a RuntimeError if there is none yet."""
        if self.engine is None:
            raise RuntimeError(f"{who}.module: no EMA yet; it is built when training starts")
        if not self.started:
            raise RuntimeError(
                f"{who}.module: the EMA has not started: {self.steps} optimizer steps so far, start is "
                f"{self._start_step}"
            )
        return self.engine.module

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "engine": self.engine.state_dict() if self.engine else None,
            "steps": self.steps,
            "started": self.started,
        }

    def load_state_dict(self, state: object, source: object = None) -> None:
        """Restore from `state_dict()`: now during a run, else when the next run (or evaluation) begins.

        `source` (the checkpoint it came from) is named by the error if the state is refused.
        """
        where = "" if source is None else f" in {source}"
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"Invalid EMA state{where}: not a {STATE_FORMAT} v{STATE_VERSION} state")
        self._source = source
        if self.running:
            self._load(state)
        else:
            self._pending = state

    @property
    def has_pending_state(self) -> bool:
        return self._pending is not None

    def discard_pending_state(self) -> None:
        self._pending = None

    def load_pending_for_evaluation(self, model: nn.Module) -> None:
        """Outside training: a checkpoint's EMA restored for an evaluation, into the EMA of `model`."""
        if self._pending is None:
            return
        if self.engine is None or self.engine.model is not unwrap_model(model):
            self.engine = self.make_engine(model, self.batch_size)
        pending, self._pending = self._pending, None
        self._load(pending)

    def _load(self, state: dict) -> None:
        saved = state["engine"]
        if saved is not None:
            try:
                self.engine.load_state_dict(saved)  # refuses another update_every or other tracked tensors
            except ValueError as error:
                if self._source is None:
                    raise
                raise ValueError(f"Invalid EMA state in {self._source}: {error}") from error
            # An EMA length in samples rescales the decay to a new batch size itself (and logs it).
            rescaled = getattr(self.engine, "length", None) is not None
            if not rescaled and isinstance(saved.get("decay"), float) and saved["decay"] != self.engine.decay:
                warnings.warn(
                    f"The EMA was saved with decay={saved['decay']}; it continues with this callback's "
                    f"decay={self.engine.decay}",
                    UserWarning,
                    stacklevel=4,
                )
        self.steps, self.started = int(state["steps"]), bool(state["started"])


class StepDrivenCallback:
    """What the Lightning and Hugging Face callbacks share: the flags, the engine and the EMA model."""

    ema: StepDrivenEMA

    def _init_flags(self, validate_ema: bool, replace_weights: bool) -> None:
        self.validate_ema = check_flag(validate_ema, "validate_ema")
        self.replace_weights = check_flag(replace_weights, "replace_weights")

    @property
    def engine(self) -> Any:
        """The `ModelEMA` (or `BEMA`) of the current (or last) run."""
        return self.ema.engine

    @property
    def module(self) -> nn.Module:
        """The EMA model (raises before the EMA has started)."""
        return self.ema.ema_module(type(self).__name__)
