"""Deprecated path of `fastema.fastai.checkpoint` (Learner save/load/export with the EMA)."""

from ._extras import warn_moved
from .fastai.checkpoint import export, export_ema, load, save

__all__ = ["export", "export_ema", "load", "save"]
warn_moved("fastema.learner_checkpoint", "fastema.fastai.checkpoint")
