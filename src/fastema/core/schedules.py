"""Decay schedules: where an annealer (fastai's `SchedCos`, ...) puts the decay at a given step."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor

from .checks import check_decay

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
