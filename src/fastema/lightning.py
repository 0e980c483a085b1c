"""Lightning: `fastema.lightning.EMACallback`, an EMA of the LightningModule's weights.

    trainer = Trainer(callbacks=[EMACallback(decay=0.9999)])

Updates after every optimizer step that really happened (gradient accumulation and AMP's
skipped steps respected: it hooks the optimizers' steps), validates and tests with the EMA
weights swapped into the module in place (so `ModelCheckpoint(monitor=...)` sees the EMA's
metrics), and carries its state in Lightning's checkpoints, so `trainer.fit(ckpt_path=...)`
resumes it exactly. Importing `fastema` does not import Lightning; this module does.
"""

from __future__ import annotations

import ast
import math
import warnings
from typing import Any

from ._extras import missing_extra

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as lightning_missing:  # the standalone `pytorch_lightning` package, or neither
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment]  # the same class under its older name
    except ModuleNotFoundError:
        raise missing_extra(lightning_missing, "lightning", "fastema.lightning") from lightning_missing

from ._trainer import BEMAFactory, ModelEMAFactory, StepDrivenCallback, StepDrivenEMA
from .core.parallel import unwrap_model
from .core.schedules import DecayWarmup, SwitchEMA

__all__ = ["BEMACallback", "EMACallback"]

STATE_KEY = "fastema.EMACallback"


def _legacy_options(key: str) -> dict:
    """The options a fastema 0.1 state key was built from (`EMACallback{...}`), or {} if it cannot be read."""
    try:
        options = ast.literal_eval(key.removeprefix("EMACallback"))
    except (ValueError, SyntaxError):
        return {}
    return options if isinstance(options, dict) else {}


class EMACallback(StepDrivenCallback, Callback):
    """An exponential moving average of the LightningModule's weights (a `ModelEMA`), for `lightning.Trainer`."""

    state_prefix = STATE_KEY
    half_life: float | None = None  # an EMA length in samples (the global batch is read at fit)

    def __init__(
        self,
        decay: float | None = None,  # each update keeps `decay` of the EMA and moves the rest; None: 0.9998
        start: int | float = 0,  # optimizer steps before the EMA starts (int), or a fraction of all steps (float)
        warmup: DecayWarmup | None = None,  # the decay as a function of the update count, e.g. InverseGammaWarmup()
        validate_ema: bool = True,  # validate and test with the EMA weights (swapped in place, restored exactly)
        replace_weights: bool = False,  # at the end of fit, copy the EMA into the module
        name: str | None = None,  # needed for each of several EMACallbacks in one Trainer: their checkpoint keys
        half_life: float | None = None,  # the EMA's length in samples, instead of decay (see ModelEMA)
        switch_every: int | SwitchEMA | None = None,  # Switch EMA: copy the EMA into the module every N epochs
        **options: Any,  # ModelEMA's: all_parameters, all_buffers, foreach, device, flatten_model, ema_dtype, ...
    ) -> None:
        factory = ModelEMAFactory(decay, warmup, options, half_life)
        self._init(validate_ema, replace_weights, name, factory, start, switch_every)
        self._decay = 0.9998 if decay is None else decay  # what fastema 0.1's state keys hold
        self.half_life = half_life

    def _init(self, validate_ema, replace_weights, name, factory, start, switch_every) -> None:
        self._init_flags(validate_ema, replace_weights)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"Invalid name: {name!r}; expected None or a non-empty str")
        self.name = name
        self._checkpoint: object = None  # the checkpoint being resumed, and the other EMA states it holds
        self._others: list[str] = []
        # One update per training batch in which an optimizer stepped (manual optimization may step several).
        self.ema = StepDrivenEMA(factory, start, per_batch=True, switch=switch_every)

    @property
    def state_key(self) -> str:
        # Not built from the options: a resume spelled differently (`flatten_model=True`, a default written
        # out) must find its EMA. What the options change is checked against the saved state on loading.
        return self.state_prefix if self.name is None else f"{self.state_prefix}[{self.name}]"

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._checkpoint = trainer.ckpt_path  # named by the error if the EMA state it holds is refused
        states = checkpoint.get("callbacks") or {}
        self._others = sorted(
            key for key in states if key.startswith(f"{self.state_prefix}[") and key != self.state_key
        )
        if self.state_key in states:
            return
        # fastema 0.1 keyed the state by the callback's options, `EMACallback{'decay': 0.9998, 'start': 0, ...}`.
        legacy = [key for key in states if key.startswith("EMACallback{")]
        if len(legacy) > 1:
            legacy = [key for key in legacy if _legacy_options(key).get("decay") == self._decay]
        if len(legacy) == 1:
            self.load_state_dict(states[legacy[0]])

    def on_fit_start(self, trainer, pl_module) -> None:
        validating = [
            callback for callback in trainer.callbacks if isinstance(callback, EMACallback) and callback.validate_ema
        ]
        if len(validating) > 1:
            raise ValueError(
                f"Invalid callbacks: {len(validating)} EMACallbacks with validate_ema=True; one model holds one EMA "
                "at a time: give validate_ema=False to all but one"
            )
        if self.ema.has_pending_state and trainer.ckpt_path is None:
            self.ema.discard_pending_state()  # restored for an earlier evaluation, not for this fit
        elif trainer.ckpt_path is not None and not self.ema.has_pending_state:
            others = self._others
            hint = f"; it holds {others}: give this callback the name= it was saved under" if others else ""
            warnings.warn(
                f"EMACallback: resuming from {trainer.ckpt_path}, which holds no {self.state_key} state: the EMA "
                f"starts again from the model's weights{hint}",
                UserWarning,
                stacklevel=2,
            )

    def on_train_start(self, trainer, pl_module) -> None:
        # Here, not at on_fit_start: a resumed fit has its global step (and optimizers) back by now.
        batch_size = _global_batch(trainer) if self.half_life is not None else None
        steps = trainer.estimated_stepping_batches
        self.ema.begin(pl_module, trainer.optimizers, steps, trainer.global_step, batch_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ema.end_batch(trainer.global_step)
        if trainer.is_last_batch:  # before the epoch's validation and checkpoints
            self.ema.end_epoch(trainer.current_epoch + 1)

    def _evaluation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not self.ema.running:
            return  # the sanity check before training: no EMA of this fit yet
        if trainer.state.fn != "fit":  # validate()/test() on their own: a checkpoint's EMA, if one was restored
            self.ema.load_pending_for_evaluation(pl_module)
            engine = self.ema.engine
            if self.validate_ema and engine is not None and engine.model is not unwrap_model(pl_module):
                warnings.warn(
                    "EMACallback: evaluating another module than the one whose EMA this callback holds; the EMA is "
                    "not used",
                    UserWarning,
                    stacklevel=3,
                )
                return
        if self.validate_ema:
            self.ema.swap_in()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._evaluation_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.ema.swap_out()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._evaluation_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.ema.swap_out()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.ema.end()  # the module gets its own weights back (an interrupted evaluation); the hooks go

    def on_fit_end(self, trainer, pl_module) -> None:
        self.ema.warn_if_not_started("EMACallback")
        self.ema.end(self.replace_weights)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.ema.load_state_dict(state_dict, source=self._checkpoint)

    def __getstate__(self) -> dict:
        # `strategy="ddp_spawn"` pickles the callbacks to start the processes: the engine and hooks stay behind.
        state = dict(self.__dict__)
        state["ema"] = StepDrivenEMA(self.ema.make_engine, self.ema.start, per_batch=True, switch=self.ema.switch)
        return state


def _global_batch(trainer) -> float | None:
    """Samples per optimizer step, all ranks together: the loader's batch size x accumulation x world size."""
    loader = trainer.train_dataloader
    batch = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if not isinstance(batch, int):
        return None  # several loaders, or a sampler of its own: give batch_size= to the callback
    return float(batch * trainer.accumulate_grad_batches * trainer.world_size)


class BEMACallback(EMACallback):
    """BEMA, the bias-corrected EMA (a `fastema.BEMA`), for `lightning.Trainer`: as `EMACallback`, its own state key."""

    state_prefix = "fastema.BEMACallback"

    def __init__(
        self,
        ema_power: float = 0.5,  # kappa: the EMA's weight on the model is (lag + multiplier t) ** -kappa
        bias_power: float = 0.2,  # eta: the bias correction is (lag + multiplier t) ** -eta
        lag: float = 10,  # rho: the schedules' offset
        multiplier: float = 1.0,  # gamma: how fast the schedules age per step
        min_ema_multiplier: float = 0.0,  # a floor under the EMA's weight on the model
        update_after: int = 0,  # theta_0 is taken after this many optimizer steps (after `start`)
        update_every: int = 1,  # update when t is a multiple of this
        start: int | float = 0,  # optimizer steps before BEMA starts (int), or a fraction of all steps (float)
        validate_ema: bool = True,  # validate and test with the BEMA weights (swapped in place, restored exactly)
        replace_weights: bool = False,  # at the end of fit, copy the BEMA weights into the module
        name: str | None = None,  # needed for each of several BEMACallbacks in one Trainer: their checkpoint keys
        switch_every: int | SwitchEMA | None = None,  # Switch EMA with the BEMA weights, every N epochs
        **options: Any,  # BEMA's: all_parameters, all_buffers, foreach, device, flatten_model, ema_dtype
    ) -> None:
        settings = dict(
            ema_power=ema_power,
            bias_power=bias_power,
            lag=lag,
            multiplier=multiplier,
            min_ema_multiplier=min_ema_multiplier,
            update_after=update_after,
            update_every=update_every,
        )
        self._init(validate_ema, replace_weights, name, BEMAFactory({**settings, **options}), start, switch_every)
        self._decay = math.nan  # no fastema 0.1 state key is a BEMA's
