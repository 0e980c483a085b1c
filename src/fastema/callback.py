"""Deprecated path of `fastema.fastai` (the fastai callbacks)."""

from ._extras import warn_moved
from .fastai import EMACallback, EMASchedule, PostHocEMACallback, posthoc_sweep

__all__ = ["EMACallback", "EMASchedule", "PostHocEMACallback", "posthoc_sweep"]
warn_moved("fastema.callback", "fastema.fastai")
