"""Decay schedules: where an annealer (fastai's `SchedCos`, ...) puts the decay at a given step."""

from __future__ import annotations

from collections.abc import Callable

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
