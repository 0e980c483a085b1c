"""fastai callbacks: EMACallback, EMASchedule and PostHocEMACallback, fastai events translated into engine calls."""

from __future__ import annotations

import math
import sys
from contextlib import ExitStack
from numbers import Integral, Real
from types import FrameType
from typing import cast

import torch

from .._extras import missing_extra

try:
    from fastai.callback.core import Callback
    from fastai.learner import Learner, Recorder
    from fastcore.basics import store_attr
except ModuleNotFoundError as error:
    raise missing_extra(error, "fastai", "fastema.fastai (the fastai callbacks)") from error

from ..core.checks import (
    DeviceLike,
    check_compile,
    check_decay,
    check_device,
    check_ema_dtype,
    check_flag,
    check_flatten_model,
    check_foreach,
    check_update_every,
)
from ..core.model_ema import ModelEMA
from ..core.parallel import unwrap_model
from ..core.schedules import (
    DEFAULT_DECAY,
    DecayWarmup,
    SampleLength,
    SwitchEMA,
    check_switch,
    make_annealer,
    scheduled_decay,
)
from ..core.state import CONFIG_KEYS, check_state_dict
from ..core.tracking import tensor_slots
from ..posthoc import PostHocEMA
from . import checkpoint as learner_checkpoint
from .checkpointing import EMACheckpointing

try:  # fastai's default annealer; imported here so that the engine never needs fastai
    from fastai.callback.schedule import SchedCos
except ImportError:  # pragma: no cover - fastai always ships it
    SchedCos = None

__all__ = ["EMACallback", "EMASchedule"]

CHECKPOINT_FORMAT = "fastema.EMACallback"
CHECKPOINT_VERSION = 1


def _check_position(value: object, name: str, *, is_finish: bool) -> int | float:
    """A point in training: a float fraction of all steps, or an int epoch index."""
    float_range = "(0, 1]" if is_finish else "[0, 1)"
    int_floor = 1 if is_finish else 0
    accepted = f"a float fraction of training in {float_range} or an int epoch index >= {int_floor}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r}; expected {accepted}")
    if isinstance(value, Integral):
        if value < int_floor:
            raise ValueError(f"Invalid {name}: {value}; expected {accepted}")
        return int(value)
    value = float(value)
    if not (0.0 < value <= 1.0 if is_finish else 0.0 <= value < 1.0):
        raise ValueError(f"Invalid {name}: {value}; expected {accepted}")
    return value


def _position_to_step(value: int | float, name: str, n_epoch: int, n_iter: int) -> int:
    """Global training-step index of a position (an int is an epoch, converted *before* any schedule math)."""
    if isinstance(value, int):
        if value > n_epoch:
            raise ValueError(f"Invalid {name}: epoch {value}, but this fit has only {n_epoch} epochs")
        return value * n_iter
    return round(value * n_epoch * n_iter)


def _innermost_call(learn, functions) -> object | None:
    """The innermost of `functions` (Learner methods) running now on `learn`, by walking the call stack.

    fastai fires no event when an exception ends a fit, and `learn.validate()`/`get_preds()` fire
    `before_fit`/`after_fit` from the Learner's own context manager: the stack tells them apart.
    """
    codes = {function.__code__: function for function in functions}
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        function = codes.get(frame.f_code)
        if function is not None and frame.f_locals.get("self") is learn:
            return function
        frame = frame.f_back
    return None


def _fit_running(learn) -> bool:
    """Whether `learn.fit` is executing now."""
    return _innermost_call(learn, (Learner._do_fit,)) is not None


def _in_validation_context(learn) -> bool:
    """Whether fit events come from `learn.validate()`/`get_preds()` (the Learner used as a context manager)."""
    return _innermost_call(learn, (Learner._do_fit, Learner.__enter__, Learner.__exit__)) in (
        Learner.__enter__,
        Learner.__exit__,
    )


def _resumed_epoch(learn) -> int:
    """The `start_epoch` of the running fit: fastai implements it with a `SkipToEpoch` callback."""
    for callback in learn.cbs:
        if type(callback).__name__ == "SkipToEpoch":
            return int(getattr(callback, "_skip_to", 0))
    return 0


def _global_batch(learn) -> float:
    """Samples per optimizer step, all processes together: the batch size x GradientAccumulation x world size."""
    from fastai.torch_core import num_distrib

    batch = learn.dls.train.bs
    # GradientAccumulation(n_acc) steps once the batches since the last step hold at least n_acc samples.
    n_acc = getattr(getattr(learn, "gradient_accumulation", None), "n_acc", 0)
    return float(batch * max(1, math.ceil(n_acc / batch)) * max(1, num_distrib()))


def _half_life(decay: float, batch_size: float) -> float:
    """The half-life in samples of a decay per step of `batch_size` samples (inf when the EMA stands still)."""
    if decay >= 1.0:
        return math.inf
    return 0.0 if decay <= 0.0 else batch_size * math.log(0.5) / math.log(decay)


def _copy_engine_state(source: ModelEMA, target: ModelEMA) -> None:
    """`target` takes `source`'s EMA and counts; shard by shard for a sharded EMA (no rank gathers it)."""
    if source.sharded:
        target.sharded_state("load").load_state_dict(source.sharded_state("save").state_dict())
    else:
        target.load_state_dict(source.state_dict())


# The keyword arguments EMACallback and EMASchedule share after their own. Their signatures spell them out (the
# seed's signatures, fastai's docments and the docs need them there); this is the one list that passes them on.
SHARED_OPTIONS = (
    "ema_device",
    "validate_ema",
    "replace_weights",
    "foreach",
    "resume",
    "all_parameters",
    "all_buffers",
    "flatten_model",
    "ema_dtype",
    "update_every",
    "switch_every",
    "compile",
)


def _shared_options(arguments: dict) -> dict:
    """The shared options among a constructor's `locals()`."""
    return {name: arguments[name] for name in SHARED_OPTIONS}


class AveragingCallback(Callback, EMACheckpointing):
    "What every fastema callback does with fastai's events: start, update on real steps, validate with the EMA"

    # After TrainEvalCallback (-10) has moved the model to its device, and after the loggers
    # (Recorder.order + 1) so that `ema_decay` lands on the step they just logged.
    order = Recorder.order + 2
    checkpoint_format = ""  # the "format" of the EMA file `learn.save` writes: each callback its own
    switch_every: SwitchEMA | None = None  # Switch EMA: when to copy the average into the model

    def _init_events(self, start: int | float, skip_ema: bool) -> None:
        self.start = _check_position(start, "start", is_finish=False)
        self.skip_ema = check_flag(skip_ema, "skip_ema")
        self.engine = None  # the engine doing the averaging, built in `before_fit`
        self._active = self._started = self._resumed = False
        self._step_cancelled = self._updated = False
        self._validation_depth = self._ignored_fit_events = 0
        self._ema_swap: ExitStack | None = None
        self._loaded: dict | None = None  # where a checkpoint restored by `learn.load` stood

    @property
    def _engine(self):
        """The engine of the running (or last) fit; the events that use it run only once it exists."""
        if self.engine is None:
            raise RuntimeError("fastema internal error: the EMA callback has no engine yet")
        return self.engine

    def __getstate__(self) -> dict:
        # `learn.export()` pickles the callbacks: the engine (threads, streams, a model copy) stays behind.
        state = dict(self.__dict__)
        state.update(engine=None, _ema_swap=None, _loaded=None, _active=False, _started=False, _validation_depth=0)
        return state

    def _compute_steps(self, n_epoch: int, n_iter: int) -> None:
        if isinstance(self.start, int) and self.start >= n_epoch:
            raise ValueError(f"Invalid start: epoch {self.start}, but this fit has only {n_epoch} epochs (0-based)")
        self._start_step = _position_to_step(self.start, "start", n_epoch, n_iter)
        if self._start_step >= n_epoch * n_iter:
            raise ValueError(f"Invalid start: {self.start} falls after the last of this fit's {n_epoch * n_iter} steps")

    # ---- what each callback decides --------------------------------------------------------------------

    def _start_fit(self, loaded_engine, loaded: dict | None) -> tuple[ModelEMA | PostHocEMA, bool]:
        """This fit's engine and whether it has started already (resumed)."""
        raise NotImplementedError

    def _begin(self) -> None:
        """The EMA starts now (at `start`)."""

    def _update(self) -> None:
        raise NotImplementedError

    def _ema_weights(self):
        """A context manager that puts the EMA into the model for validation."""
        return self._engine.use_ema_weights()

    def _finish_fit(self) -> None:
        """After a fit in which the EMA started: the averaged weights into the model, or as `learn.model_ema`."""
        if self.replace_weights:
            self._engine.copy_to()
        else:
            self._publish(self._engine)

    def _publish(self, engine) -> None:
        # A sharded (FSDP2, ZeRO-3) EMA is shards only: no module to hand out (validate with it, or save it).
        self.learn.model_ema = None if engine.sharded else engine.module

    # ---- fastai's events ---------------------------------------------------------------------------------

    def before_fit(self):
        if _in_validation_context(self.learn):
            self._ignored_fit_events += 1
            if not _fit_running(self.learn):  # learn.validate()/get_preds() after an interrupted validation
                self.restore_model_weights()
            return
        self._active = False
        if hasattr(self.learn, "lr_finder"):  # lr_find runs its own fit: leave the EMA alone
            return
        others = [cb for cb in self.learn.cbs if isinstance(cb, AveragingCallback) and cb is not self]
        if others:
            raise ValueError(
                f"Invalid callbacks: {1 + len(others)} EMA callbacks on one Learner "
                f"({self}, {', '.join(map(str, others))}). "
                "Their validations would swap weights over each other; use one EMA callback per Learner (a second "
                "EMA can be kept with fastema.ModelEMA in a callback of your own)."
            )
        self.restore_model_weights()  # an interrupted validation of an earlier fit may have left them swapped
        self._compute_steps(self.n_epoch, len(self.dls.train))
        loaded_engine, loaded, self._loaded = self.engine, self._loaded, None
        self._resumed = False
        self.engine, self._started = self._start_fit(loaded_engine, loaded)
        self._step_cancelled = self._updated = False
        self._validation_depth = 0
        self._active = True  # only once everything above succeeded: a refused fit leaves the callback idle

    def before_batch(self):
        if not (self._active and self.training) or self._started:
            return
        if self.epoch * self.n_iter + self.iter >= self._start_step:
            self._begin()
            self._started = True

    def before_step(self):
        # An offloaded EMA may still be copying the weights (on a side stream): the optimizer waits for it on the GPU.
        if self._active and self._started and hasattr(self._engine, "before_model_write"):
            self._engine.before_model_write()

    def after_cancel_step(self):
        # MixedPrecision cancels the step when the grad scaler finds inf/NaN; fastai still calls after_step.
        self._step_cancelled = True

    def after_step(self):
        if self._active and self._started and not (self.skip_ema and self._step_cancelled):
            self._update()
            self._updated = True

    def after_cancel_batch(self):
        # GradientAccumulation cancels accumulation batches before the optimizer step (no after_step).
        if self._active and self.training and self._started and not self.skip_ema and not self._updated:
            self._update()
            self._updated = True

    def after_batch(self):
        if not (self._active and self.training):
            return
        if self._updated:
            self._after_update()
            self._switch_if_due(self._engine.num_steps, "step")
        self._step_cancelled = self._updated = False

    def after_train(self):
        # The end of the epoch's training: before its validation and before SaveModelCallback's checkpoint.
        if self._active:
            self._switch_if_due(self.epoch + 1, "epoch")

    def _switch_if_due(self, count: int, unit: str) -> None:
        switch = self.switch_every
        if switch is not None and self._started and self._engine.num_updates and switch.due(count, unit):
            self._engine.switch()

    def _after_update(self) -> None:
        """After a batch whose step moved the EMA (logging)."""

    def _validates_with_ema(self) -> bool:
        """Whether validation in fit uses the EMA weights (read at each validation: the attribute may change)."""
        return bool(self.validate_ema)

    def before_validate(self):
        # Only inside a running fit: after one that failed or was refused, validate() uses the model's weights.
        if not (self._active and self._started and self._validates_with_ema() and _fit_running(self.learn)):
            return
        self._validation_depth += 1
        if self._validation_depth == 1:
            self._ema_swap = ExitStack()
            self._ema_swap.enter_context(self._ema_weights())

    def after_validate(self):
        if self._validation_depth == 0:
            return
        self._validation_depth -= 1
        if self._validation_depth == 0:
            self.restore_model_weights()

    def restore_model_weights(self):
        "Put the model's own weights back if an interrupted validation (e.g. Ctrl-C) left the EMA's in it"
        if self._ema_swap is not None:
            swap, self._ema_swap = self._ema_swap, None
            swap.close()
        self._validation_depth = 0

    def ema_checkpoint(self) -> dict | None:
        "What `learn.save` writes beside the model: the engine's state and where this callback stood (None before any)"
        return self._checkpoint()

    def check_ema_checkpoint(self, state: object, path) -> None:
        "Raise a ValueError naming `path` unless `state` fits this Learner's model; changes nothing"
        state = self._check_checkpoint_header(state, path)
        try:
            # A throwaway engine (not flattened: packing would move the model's storage) that only reads the model.
            self._new_engine(flatten_model=False).load_state_dict(state["engine"])
        except ValueError as error:
            raise ValueError(f"Invalid EMA checkpoint {path}: {error}") from error

    def _checkpoint(self, **extra: object) -> dict | None:
        """The EMA file `learn.save` writes: engine state, whether the EMA started, and `extra` (None before any)."""
        if self.engine is None:
            return None
        self._check_saveable()
        return {
            "format": self.checkpoint_format,
            "version": CHECKPOINT_VERSION,
            "engine": self._engine.state_dict(),
            "started": self._started,
            **extra,
        }

    def _check_checkpoint_header(self, state: object, path) -> dict:
        """`state`, or a ValueError naming `path` unless it is an EMA file of this callback's kind and version."""
        if (
            not isinstance(state, dict)
            or state.get("format") != self.checkpoint_format
            or state.get("version") != CHECKPOINT_VERSION
            or not isinstance(state.get("started"), bool)
        ):
            raise ValueError(
                f"Invalid EMA checkpoint {path}: not a {self.checkpoint_format} v{CHECKPOINT_VERSION} file"
            )
        return state

    def _check_saveable(self) -> None:
        self._restore_if_interrupted()
        if self._engine.ema_weights_in_use:  # mid-validation the model and the EMA hold each other's weights
            raise RuntimeError(
                "Cannot save during EMA validation: the model holds the EMA weights; save after_validate"
            )

    def _restore_if_interrupted(self) -> None:
        """Before reading the EMA outside a fit: undo a swap that an exception left behind."""
        if self._ema_swap is not None and not _fit_running(self.learn):
            self.restore_model_weights()

    def after_fit(self):
        if self._ignored_fit_events:
            self._ignored_fit_events -= 1
            return
        if not self._active:
            return
        self.restore_model_weights()
        self._active = False
        if self._started:
            self._finish_fit()


class EMACallback(AveragingCallback):
    "Exponential moving average of the model's weights, updated after every optimizer step"

    log_decay = False
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(
        self,
        decay: float = 0.9998,  # EMA decay: each update keeps `decay` of the EMA, moves `1-decay` toward the model
        start: int | float = 0,  # when the EMA starts: float = fraction of training steps, int = epoch index
        ema_device: DeviceLike = None,  # where the EMA weights live; None = beside the model's weights
        validate_ema: bool = True,  # validate with the EMA weights (swapped into the model in place)
        replace_weights: bool = False,  # after fit, copy the EMA into the model instead of setting `learn.model_ema`
        foreach: bool | None = None,  # fused multi-tensor step (True), for-loop (False), fastest supported (None)
        resume: bool = False,  # continue from the EMA in `learn.model_ema` left by an earlier fit
        all_parameters: bool = False,  # also average parameters without `requires_grad`
        all_buffers: bool = False,  # also average non-persistent buffers
        skip_ema: bool = True,  # no update when a callback cancelled the step or batch (no optimizer step happened)
        flatten_model: bool = False,  # pack model and EMA into flat buffers: one lerp_ per step (see ModelEMA)
        ema_dtype: torch.dtype | None = None,  # dtype of the EMA's floating tensors, e.g. torch.float32 for bf16 models
        update_every: int = 1,  # update every N-th optimizer step only, with decay**N (see ModelEMA.update)
        switch_every: int | SwitchEMA | None = None,  # Switch EMA: copy the EMA into the model every N epochs
        compile: bool | None = None,  # compiled step (True), eager (False), choose (None; see ModelEMA)
        half_life: float | None = None,  # the EMA's length in samples instead of `decay`: 0.5 ** (batch / half_life)
        batch_size: float | None = None,  # samples (or tokens) per optimizer step; None: bs x accumulation x world
    ):
        self.decay = check_decay(decay, "decay")
        if half_life is not None:
            if self.decay != DEFAULT_DECAY:
                raise ValueError(f"Invalid decay: {decay} together with half_life={half_life}; give one of them")
            SampleLength(half_life, 1.0 if batch_size is None else batch_size)  # checked now, the batch at fit
        elif batch_size is not None:
            raise ValueError(f"Invalid batch_size: {batch_size!r}; it is used only with half_life")
        self.half_life, self.batch_size = half_life, batch_size
        self._init_common(start, skip_ema, **_shared_options(locals()))

    def _init_common(self, start: int | float, skip_ema: bool, **options) -> None:
        """Check and store the options EMACallback and EMASchedule share (each checked once, here)."""
        check_device(options["ema_device"], "ema_device")
        for name in ("validate_ema", "replace_weights", "resume", "all_parameters", "all_buffers"):
            check_flag(options[name], name)
        check_flatten_model(options["flatten_model"], check_foreach(options["foreach"]))
        check_ema_dtype(options["ema_dtype"])
        check_update_every(options["update_every"])
        options["switch_every"] = check_switch(options["switch_every"])
        check_compile(options["compile"])
        store_attr("", **options)  # these only: not `start` and `skip_ema` from this frame
        self._init_events(start, skip_ema)

    half_life: float | None = None  # EMASchedule's decay is scheduled, not a half-life
    batch_size: float | None = None
    # A callback pickled before `compile=` existed: the default, not fastai's lookup of `learn.model.compile`.
    compile: bool | None = None

    def _sample_length(self) -> dict:
        """`half_life` and this Learner's global batch, for the engine (empty without a half-life)."""
        if self.half_life is None:
            return {}
        return {"half_life": self.half_life, "batch_size": self.batch_size or _global_batch(self.learn)}

    def _decay_at(self, step: int) -> float:
        return self.decay

    @property
    def _engine(self) -> ModelEMA:
        return cast(ModelEMA, AveragingCallback._engine.fget(self))  # type: ignore[attr-defined]  # a property

    def _start_fit(self, loaded_engine, loaded):
        if self.half_life is not None:  # from this fit's global batch: the EMA scaling rule when it changed
            self.decay = SampleLength(**self._sample_length()).decay
        decay = self._decay_at(self._start_step)
        if loaded is not None and loaded_engine is not None and _resumed_epoch(self.learn) > 0:
            # `learn.load(...)` then `fit(..., start_epoch=k)`: continue exactly where the checkpoint stood,
            # with the tensors it tracked (a checkpoint saved unfrozen can be resumed in a frozen Learner).
            engine = self._new_engine(decay, tensor_names=loaded_engine.tensor_names)
            _copy_engine_state(loaded_engine, engine)
            return engine, loaded["started"]
        engine = self._new_engine(decay)
        # A sharded EMA has no learn.model_ema (shards only): it continues from the callback's own engine.
        sharded = loaded_engine is not None and loaded_engine.sharded
        previous = loaded_engine if sharded else getattr(self.learn, "model_ema", None)
        if self.resume and previous is not None:  # without one (the first fit of fine_tune), start afresh
            try:
                engine.copy_from(previous)
            except ValueError as error:
                raise ValueError(f"Invalid resume: the previous EMA does not match the model ({error})") from error
            self._resumed = True
            return engine, True
        return engine, False

    def _new_engine(
        self, decay: float, tensor_names: list[str] | None = None, flatten_model: bool | None = None
    ) -> ModelEMA:
        length = self._sample_length()
        return ModelEMA(
            self.learn.model,
            None if length else decay,
            **length,
            all_parameters=self.all_parameters,
            all_buffers=self.all_buffers,
            foreach=self.foreach,
            device=self.ema_device,
            flatten_model=self.flatten_model if flatten_model is None else flatten_model,
            ema_dtype=self.ema_dtype,
            update_every=self.update_every,
            tensor_names=tensor_names,
            compile=self.compile,
        )

    def ema_checkpoint(self) -> dict | None:
        "What `learn.save` writes beside the model: the EMA state and where this callback stood (None before any EMA)"
        return self._checkpoint(decay=self.decay)

    def check_ema_checkpoint(self, state: object, path) -> None:
        "Raise a ValueError naming `path` unless `state` fits this Learner's model; changes nothing"
        state = self._check_checkpoint_header(state, path)
        # The EMA that `restore_ema_checkpoint` builds averages the tensors the checkpoint names (which
        # parameters were trainable when it was saved may differ from now), in `ema_dtype` if set.
        try:
            check_decay(state.get("decay"), "decay")  # the decay this callback stood at: EMASchedule resumes it
        except (TypeError, ValueError) as error:
            raise ValueError(f"Invalid EMA checkpoint {path}: {error}") from error
        engine_state = state.get("engine")
        saved = engine_state.get("tensors") if isinstance(engine_state, dict) else None
        if not isinstance(saved, dict) or not saved:
            raise ValueError(f"Invalid EMA checkpoint {path}: it holds no EMA tensors")
        model_tensors = {name: tensor for name, (_, tensor) in tensor_slots(unwrap_model(self.learn.model)).items()}
        expected = {name: model_tensors[name] for name in saved if name in model_tensors}
        try:
            config = {key: getattr(self, key) for key in CONFIG_KEYS}
            check_state_dict(engine_state, expected, self.decay, self.ema_dtype, config)
        except ValueError as error:
            raise ValueError(f"Invalid EMA checkpoint {path}: {error}") from error

    def restore_ema_checkpoint(self, state: dict) -> None:
        "Install a checked checkpoint: `learn.model_ema` is its EMA; `fit(..., start_epoch=k)` continues it"
        engine = self._new_engine(self.decay, tensor_names=list(state["engine"]["tensors"]))
        engine.load_state_dict(state["engine"])
        self.install_sharded_checkpoint(engine, state["started"], state["decay"])

    def sharded_ema_checkpoint(self) -> dict | None:
        "The EMA's entries in a sharded (DCP) `learn.save`: its shards and where this callback stood"
        if self.engine is None:
            return None
        self._check_saveable()
        position = {"started": torch.tensor(self._started), "decay": torch.tensor(self.decay, dtype=torch.float64)}
        return {"ema": self._engine.sharded_state("save"), "ema_callback": position}

    def sharded_candidate(self, tensor_names: list[str]) -> ModelEMA:
        "A new engine averaging `tensor_names`, for a sharded `learn.load` to read into and check"
        # Not flattened: packing would move the model's storage before the checkpoint is known to fit
        # (the next fit builds its engine as configured).
        return self._new_engine(self.decay, tensor_names=tensor_names, flatten_model=False)

    def install_sharded_checkpoint(self, engine: ModelEMA, started: bool, decay: float) -> None:
        "Make a loaded and checked engine this callback's EMA; `fit(..., start_epoch=k)` continues it"
        self.engine = engine
        self._loaded = {"started": started}
        self._publish(engine)
        self._restore_current_decay(decay)

    def _restore_current_decay(self, decay: float) -> None:
        pass  # EMACallback's `decay` is its configuration: the one given to this callback wins

    def _begin(self) -> None:
        self._engine.reset()

    def _update(self) -> None:
        # The global step comes from epoch and iter, which stay right when resuming with start_epoch.
        self.decay = self._decay_at(self.epoch * self.n_iter + self.iter)
        self._engine.update(self.decay)

    def _after_update(self) -> None:
        if self.log_decay:
            self._log_decay()

    def _log_decay(self):
        tensorboard = getattr(self.learn, "tensor_board", None)
        # The half-life in samples that the decay amounts to at this Learner's global batch.
        half_life = _half_life(self.decay, self.batch_size or _global_batch(self.learn))
        if tensorboard is not None and getattr(tensorboard, "run", False):
            tensorboard.writer.add_scalar("ema_decay", self.decay, self.train_iter)
            tensorboard.writer.add_scalar("ema_half_life", half_life, self.train_iter)
        wandb_callback = getattr(self.learn, "wandb", None)
        if wandb_callback is not None and getattr(wandb_callback, "run", False):
            import wandb

            wandb.log({"ema_decay": self.decay, "ema_half_life": half_life}, step=wandb_callback._wandb_step)


class EMASchedule(EMACallback):
    "EMACallback whose decay warms up from `start_decay` to `final_decay` (from `start` to `finish`, or by a warm-up)"

    log_decay = True

    def __init__(
        self,
        start_decay: float = 0.9,  # decay when the EMA starts
        final_decay: float = 0.9998,  # decay from `finish` on
        start: int | float = 0,  # when the EMA starts: float = fraction of training steps, int = epoch index
        finish: int | float = 0.3,  # when `final_decay` is reached: float = fraction of training steps, int = epoch
        schedule=SchedCos,  # fastai annealer `schedule(start_decay, final_decay)(pct)`, or a DecayWarmup (see below)
        ema_device: DeviceLike = None,  # where the EMA weights live; None = beside the model's weights
        validate_ema: bool = True,  # validate with the EMA weights (swapped into the model in place)
        replace_weights: bool = False,  # after fit, copy the EMA into the model instead of setting `learn.model_ema`
        foreach: bool | None = None,  # fused multi-tensor step (True), for-loop (False), fastest supported (None)
        resume: bool = False,  # continue from the EMA in `learn.model_ema` left by an earlier fit
        all_parameters: bool = False,  # also average parameters without `requires_grad`
        all_buffers: bool = False,  # also average non-persistent buffers
        skip_ema: bool = True,  # no update when a callback cancelled the step or batch (no optimizer step happened)
        flatten_model: bool = False,  # pack model and EMA into flat buffers: one lerp_ per step (see ModelEMA)
        ema_dtype: torch.dtype | None = None,  # dtype of the EMA's floating tensors, e.g. torch.float32 for bf16 models
        update_every: int = 1,  # update every N-th optimizer step only, with decay**N (see ModelEMA.update)
        switch_every: int | SwitchEMA | None = None,  # Switch EMA: copy the EMA into the model every N epochs
        compile: bool | None = None,  # compiled step (True), eager (False), choose (None; see ModelEMA)
    ):
        self.start_decay = check_decay(start_decay, "start_decay")
        self.final_decay = check_decay(final_decay, "final_decay")
        self.start = _check_position(start, "start", is_finish=False)
        self.finish = _check_position(finish, "finish", is_finish=True)
        if isinstance(schedule, type) and issubclass(schedule, DecayWarmup):
            schedule = schedule()  # passed like SchedCos, as the class: its default formula
        self.schedule = schedule
        # A DecayWarmup ramps with the steps since `start` toward final_decay; start_decay and finish do not apply.
        self._warmup = schedule if isinstance(schedule, DecayWarmup) else None
        if self._warmup is None:
            if type(self.start) is type(self.finish) and self.finish <= self.start:
                raise ValueError(f"Invalid finish: {self.finish}; it must come after start={self.start}")
            self._annealer = make_annealer(schedule, self.start_decay, self.final_decay)
        self.decay = self.start_decay  # the current decay, updated at every EMA step
        self._init_common(start, skip_ema, **_shared_options(locals()))

    def _compute_steps(self, n_epoch: int, n_iter: int) -> None:
        super()._compute_steps(n_epoch, n_iter)
        if self._warmup is not None:
            return
        self._finish_step = _position_to_step(self.finish, "finish", n_epoch, n_iter)
        if self._finish_step <= self._start_step:
            raise ValueError(
                f"Invalid finish: {self.finish} is step {self._finish_step} of this fit, not after "
                f"start={self.start} (step {self._start_step})"
            )

    def _restore_current_decay(self, decay: float) -> None:
        self.decay = check_decay(decay, "decay")  # the decay of the latest update before the checkpoint

    def _decay_at(self, step: int) -> float:
        if self._resumed:  # the EMA from an earlier fit has warmed up already
            return self.final_decay
        if self._warmup is not None:
            return float(self._warmup(step - self._start_step + 1, self.final_decay))
        return scheduled_decay(self._annealer, self.final_decay, step, self._start_step, self._finish_step)


learner_checkpoint.install()
