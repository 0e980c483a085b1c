"""fastema: an exponential moving average of model weights, fused and exact, with fastai callbacks."""

from .engine import ModelEMA
from .posthoc import PostHocEMA, synthesize
from .schedules import DecayWarmup, ExponentialWarmup, InverseGammaWarmup

__version__ = "0.1.0"

__all__ = [
    "DecayWarmup",
    "EMACallback",
    "EMASchedule",
    "ExponentialWarmup",
    "InverseGammaWarmup",
    "ModelEMA",
    "PostHocEMA",
    "PostHocEMACallback",
    "__version__",
    "synthesize",
]


def __getattr__(name: str):
    # The callbacks need fastai; import it only when they are asked for, so that
    # `ModelEMA` works in plain PyTorch environments.
    if name in ("EMACallback", "EMASchedule", "PostHocEMACallback"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'fastema' has no attribute {name!r}")
