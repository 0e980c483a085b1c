"""fastema: an exponential moving average of model weights, fused and exact, with fastai callbacks."""

from importlib.metadata import PackageNotFoundError, distribution
from typing import TYPE_CHECKING

from ._compat import install as _install_compat

# `X as X`: an explicit re-export, for type checkers and linters (`__all__` below is computed).
from .averagers.bema import BEMA as BEMA
from .core.model_ema import ModelEMA as ModelEMA
from .core.schedules import DecayWarmup as DecayWarmup
from .core.schedules import ExponentialWarmup as ExponentialWarmup
from .core.schedules import InverseGammaWarmup as InverseGammaWarmup
from .core.schedules import SwitchEMA as SwitchEMA
from .posthoc.averager import PostHocEMA as PostHocEMA
from .posthoc.snapshots import synthesize as synthesize

if TYPE_CHECKING:
    from .fastai.callbacks import EMACallback as EMACallback
    from .fastai.callbacks import EMASchedule as EMASchedule
    from .fastai.posthoc import PostHocEMACallback as PostHocEMACallback

_install_compat()  # fastema 0.1's module paths, for old pickles

__version__ = "0.1.0"

_CALLBACKS = ("EMACallback", "EMASchedule", "PostHocEMACallback")  # need fastai: imported when asked for


def _installed(name: str) -> bool:
    """Whether a distribution is installed, read from its metadata (nothing is imported)."""
    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


__all__ = sorted(
    [
        "BEMA",
        "DecayWarmup",
        "ExponentialWarmup",
        "InverseGammaWarmup",
        "ModelEMA",
        "PostHocEMA",
        "SwitchEMA",
        "__version__",
        "synthesize",
        # Without fastai, `from fastema import *` must still work.
        *(_CALLBACKS if _installed("fastai") else ()),
    ]
)


def __getattr__(name: str) -> object:
    # The callbacks need fastai; import it only when they are asked for, so that `ModelEMA` works in plain
    # PyTorch environments.
    if name in _CALLBACKS:
        from . import fastai  # without fastai: an ImportError that says `pip install "fastema[fastai]"`

        return getattr(fastai, name)
    raise AttributeError(f"module 'fastema' has no attribute {name!r}")
