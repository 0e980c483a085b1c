"""Lightning: `fastema.lightning.EMACallback`, an EMA of the LightningModule's weights.

    trainer = Trainer(callbacks=[EMACallback(decay=0.9999)])

Updates after every optimizer step that really happened (gradient accumulation and AMP's
skipped steps respected: it hooks the optimizers' steps), validates and tests with the EMA
weights swapped into the module in place (so `ModelCheckpoint(monitor=...)` sees the EMA's
metrics), and carries its state in Lightning's checkpoints, so `trainer.fit(ckpt_path=...)`
resumes it exactly. Importing `fastema` does not import Lightning; this module does.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone `pytorch_lightning` package
    from pytorch_lightning import Callback  # type: ignore[assignment]  # the same class under its older name

from ._checks import check_flag
from ._trainer import ModelEMAFactory, StepDrivenEMA
from .engine import ModelEMA
from .schedules import DecayWarmup

__all__ = ["EMACallback"]


class EMACallback(Callback):
    """An exponential moving average of the LightningModule's weights (a `ModelEMA`), for `lightning.Trainer`."""

    def __init__(
        self,
        decay: float = 0.9998,  # each update keeps `decay` of the EMA and moves `1 - decay` toward the model
        start: int | float = 0,  # optimizer steps before the EMA starts (int), or a fraction of all steps (float)
        warmup: DecayWarmup | None = None,  # the decay as a function of the update count, e.g. InverseGammaWarmup()
        validate_ema: bool = True,  # validate and test with the EMA weights (swapped in place, restored exactly)
        replace_weights: bool = False,  # at the end of fit, copy the EMA into the module
        **options: Any,  # ModelEMA's: all_parameters, all_buffers, foreach, device, flatten_model, ema_dtype, ...
    ) -> None:
        self.validate_ema = check_flag(validate_ema, "validate_ema")
        self.replace_weights = check_flag(replace_weights, "replace_weights")
        self.ema = StepDrivenEMA(ModelEMAFactory(decay, warmup, options), start)

    @property
    def engine(self) -> ModelEMA | None:
        """The `ModelEMA` of the current (or last) fit."""
        return self.ema.engine

    @property
    def module(self) -> torch.nn.Module:
        """The EMA model."""
        if self.ema.engine is None:
            raise RuntimeError("EMACallback.module: no EMA yet; it is built when fit starts")
        return self.ema.engine.module

    def on_fit_start(self, trainer, pl_module) -> None:
        self.ema.begin(pl_module, trainer.optimizers, trainer.estimated_stepping_batches)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validate_ema:
            self.ema.swap_in()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.ema.swap_out()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        if self.validate_ema:
            self.ema.swap_in()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.ema.swap_out()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.ema.swap_out()  # an evaluation interrupted by an error: the module gets its own weights back

    def on_fit_end(self, trainer, pl_module) -> None:
        self.ema.end(self.replace_weights)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.ema.load_state_dict(state_dict)

    def __getstate__(self) -> dict:
        # `strategy="ddp_spawn"` pickles the callbacks to start the processes: the engine and hooks stay behind.
        state = dict(self.__dict__)
        state["ema"] = StepDrivenEMA(self.ema.make_engine, self.ema.start)
        return state
