"""Decay schedules: where an annealer (fastai's `SchedCos`, ...) puts the decay at a given step, warm-ups, and
the EMA's length in samples (`SampleLength`, the EMA scaling rule)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from numbers import Real
from typing import cast

import torch
from torch import Tensor

from .checks import check_decay

logger = logging.getLogger("fastema")

DEFAULT_DECAY = 0.9998

Annealer = Callable[[float], float]


def make_annealer(schedule: object, start_decay: float, final_decay: float) -> Annealer:
    """Build `schedule(start_decay, final_decay)` once and check it behaves like a fastai annealer."""
    if not callable(schedule):
        raise TypeError(
            f"Invalid schedule: {schedule!r}; expected a fastai annealer such as SchedCos, SchedLin, "
            "SchedExp or partial(SchedPoly, power=...), called as schedule(start, end)(pct)"
        )
    annealer = schedule(start_decay, final_decay)
    if not callable(annealer):
        raise TypeError(f"Invalid schedule: schedule(start_decay, final_decay) returned {annealer!r}, not a callable")
    return annealer


def scheduled_decay(annealer: Annealer, final_decay: float, step: int, start_step: int, finish_step: int) -> float:
    """Decay for the update at global `step`: annealed between start and finish, `final_decay` after."""
    pct = (step - start_step) / (finish_step - start_step)
    if pct >= 1.0:
        return final_decay
    return float(annealer(max(pct, 0.0)))


class DecayWarmup:
    """A decay that ramps up with the step count: `warmup(step, decay)` for the `step`-th step (1-based).

    Usable as `ModelEMA(..., warmup=...)` and as `EMASchedule(schedule=...)`, where `decay`
    is `final_decay` and the steps are counted from `start`. Inside `torch.compile` or a CUDA
    graph `step` is an int64 tensor, and the decay must come back as a tensor (no host sync).
    """

    def __call__(self, step: int | Tensor, decay: float) -> float | Tensor:
        raise NotImplementedError


def _check_positive(value: object, name: str) -> None:
    """A finite number > 0: a TypeError for a non-number, a ValueError for a bad number."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r}; expected a finite number > 0")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number > 0")


class ExponentialWarmup(DecayWarmup):
    """YOLOv5/ultralytics' ramp: `decay * (1 - exp(-step / tau))`, about `decay` after a few `tau` steps."""

    def __init__(self, tau: float = 2000.0) -> None:
        _check_positive(tau, "tau")
        self.tau: float = float(tau)

    def __call__(self, step: int | Tensor, decay: float) -> float | Tensor:
        if isinstance(step, Tensor):
            return decay * (1.0 - torch.exp(-step.double() / self.tau))
        return decay * (1.0 - math.exp(-step / self.tau))

    def __repr__(self) -> str:
        return f"ExponentialWarmup(tau={self.tau})"


class InverseGammaWarmup(DecayWarmup):
    """The warm-up of timm `ModelEmaV3`, diffusers `EMAModel` and ema-pytorch.

    `1 - (1 + t / inv_gamma) ** -power` with `t = step - 1`, clamped to [min_decay, decay];
    the first step has decay 0 (the EMA copies the model). power=2/3 suits runs of ~1M
    steps, 3/4 shorter ones (the decay reaches 0.999 after ~31.6K and ~10K steps).
    """

    def __init__(self, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0) -> None:
        for name, value in (("inv_gamma", inv_gamma), ("power", power)):
            _check_positive(value, name)
        self.inv_gamma, self.power = float(inv_gamma), float(power)
        self.min_decay = check_decay(min_decay, "min_decay")

    def __call__(self, step: int | Tensor, decay: float) -> float | Tensor:
        t = step - 1
        if isinstance(t, Tensor):
            ramp = (1.0 - (1.0 + t.double() / self.inv_gamma) ** -self.power).clamp(max=decay).clamp(min=self.min_decay)
            return torch.where(t <= 0, 0.0, ramp)
        if t <= 0:
            return 0.0
        return max(self.min_decay, min(decay, 1.0 - (1.0 + t / self.inv_gamma) ** -self.power))

    def __repr__(self) -> str:
        return f"InverseGammaWarmup(inv_gamma={self.inv_gamma}, power={self.power}, min_decay={self.min_decay})"


def check_warmup(value: object) -> DecayWarmup | None:
    """None or a `DecayWarmup` (ExponentialWarmup, InverseGammaWarmup or a subclass)."""
    if value is not None and not isinstance(value, DecayWarmup):
        raise TypeError(f"Invalid warmup: {value!r}; expected None, ExponentialWarmup(...) or InverseGammaWarmup(...)")
    return value


class SampleLength:
    """The EMA's length in samples (or tokens) rather than in steps: it forgets half of itself every `half_life`.

    Each optimizer step sees `batch_size` samples (all ranks and accumulated micro-batches
    together; tokens if `half_life` is in tokens), so the decay per step is
    `0.5 ** (batch_size / half_life)`, and an update that covers N steps (`update_every=N`) uses
    its N-th power. A batch k times larger gives `decay ** k`: the EMA scaling rule of Busbridge
    et al. ("How to Scale Your EMA", NeurIPS 2023), which keeps the EMA the same per sample.
    """

    def __init__(self, half_life: float, batch_size: float) -> None:
        _check_positive(half_life, "half_life")
        _check_positive(batch_size, "batch_size")
        self.half_life, self.batch_size = float(half_life), float(batch_size)

    @property
    def decay(self) -> float:
        """The decay of one optimizer step."""
        return 0.5 ** (self.batch_size / self.half_life)

    def __repr__(self) -> str:
        return f"SampleLength(half_life={self.half_life}, batch_size={self.batch_size})"


def decay_from(decay: object, half_life: object, batch_size: object) -> tuple[float, SampleLength | None]:
    """The decay per step: `decay` (None: the default), or from `half_life` and `batch_size`; never both."""
    if half_life is None:
        if batch_size is not None:
            raise ValueError(f"Invalid batch_size: {batch_size!r}; it is used only with half_life")
        return check_decay(DEFAULT_DECAY if decay is None else decay, "decay"), None
    if decay is not None:
        raise ValueError(
            f"Invalid decay: {decay!r} together with half_life={half_life!r}; give one of them (half_life with "
            "batch_size sets the decay)"
        )
    if batch_size is None:
        raise ValueError("Invalid batch_size: None; half_life needs the samples (or tokens) per optimizer step")
    length = SampleLength(cast(float, half_life), cast(float, batch_size))
    return length.decay, length


def note_rescaled(saved: dict, length: SampleLength | None) -> None:
    """Log it when a state saved with another batch size is resumed: the decay follows the EMA scaling rule."""
    saved_batch, saved_decay = saved.get("batch_size"), saved.get("decay")
    if length is None or not isinstance(saved_batch, float) or saved_batch == length.batch_size:
        return
    logger.warning(
        "fastema: the EMA continues with batch size %g (saved with %g): decay %s -> %s = decay ** %g "
        "(the EMA scaling rule; half-life %g samples)",
        length.batch_size,
        saved_batch,
        saved_decay,
        length.decay,
        length.batch_size / saved_batch,
        length.half_life,
    )


class SwitchEMA:
    """When Switch EMA (Li et al., 2024) copies the EMA into the model: at the multiples of `every` from `start` to
    `end` (inclusive; None: to the end of training), counted in epochs (`unit="epoch"`, at the end of each epoch's
    training) or in optimizer steps since the EMA started (`unit="step"`, right after the update). Training goes
    on from the copied weights with the optimizer's state as it was.
    """

    def __init__(self, every: int = 1, unit: str = "epoch", start: int = 0, end: int | None = None) -> None:
        for name, value, floor in (("every", every, 1), ("start", start, 0), ("end", end, 1)):
            if name == "end" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Invalid {name}: {value!r}; expected an int >= {floor}")
            if value < floor:
                raise ValueError(f"Invalid {name}: {value}; expected an int >= {floor}")
        if unit not in ("epoch", "step"):
            raise ValueError(f"Invalid unit: {unit!r}; expected 'epoch' or 'step'")
        if end is not None and end < start:
            raise ValueError(f"Invalid end: {end}; it must not come before start={start}")
        self.every, self.unit, self.start, self.end = every, unit, start, end

    def due(self, count: int, unit: str) -> bool:
        """Whether to switch now, after `count` epochs or optimizer steps (`unit`)."""
        return (
            unit == self.unit
            and count > 0
            and count % self.every == 0
            and count >= self.start
            and (self.end is None or count <= self.end)
        )

    def __repr__(self) -> str:
        return f"SwitchEMA(every={self.every}, unit={self.unit!r}, start={self.start}, end={self.end})"


def check_switch(value: object) -> SwitchEMA | None:
    """`switch_every`: None (no switching), an int N (every N epochs) or a `SwitchEMA`."""
    if value is None or isinstance(value, SwitchEMA):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(
                f"Invalid switch_every: {value}; expected None, an int number of epochs >= 1 or a SwitchEMA"
            )
        return SwitchEMA(every=value)
    raise TypeError(f"Invalid switch_every: {value!r}; expected None, an int number of epochs or a SwitchEMA(...)")
