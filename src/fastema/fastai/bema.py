"""fastai and BEMA: `BEMACallback`, the bias-corrected EMA (Block & Zhang 2025) updated after each optimizer step."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from .._extras import missing_extra

try:
    import fastai.callback.core  # noqa: F401  - the callbacks below are fastai callbacks
except ModuleNotFoundError as error:
    raise missing_extra(error, "fastai", "fastema.fastai (the fastai callbacks)") from error

from ..averagers.bema import BEMA
from ..core.checks import DeviceLike, check_flag
from ..core.schedules import SwitchEMA, check_switch
from .callbacks import AveragingCallback, _resumed_epoch

__all__ = ["BEMACallback"]


BEMA_CHECKPOINT_FORMAT = "fastema.BEMACallback"


class BEMACallback(AveragingCallback):
    "BEMA, the bias-corrected EMA (Block & Zhang 2025) of the model's weights: a `fastema.BEMA` updated after each step"

    checkpoint_format = BEMA_CHECKPOINT_FORMAT

    def __init__(
        self,
        ema_power: float = 0.5,  # kappa: the EMA's weight on the model is (lag + multiplier t) ** -kappa
        bias_power: float = 0.2,  # eta: the bias correction is (lag + multiplier t) ** -eta
        lag: float = 10,  # rho: the schedules' offset
        multiplier: float = 1.0,  # gamma: how fast the schedules age per step
        min_ema_multiplier: float = 0.0,  # a floor under the EMA's weight on the model
        update_after: int = 0,  # theta_0 is taken after this many optimizer steps (counted from `start`)
        update_every: int = 1,  # update when t is a multiple of this
        start: int | float = 0,  # when BEMA starts: float = fraction of training steps, int = epoch index
        validate_ema: bool = True,  # validate with the BEMA weights (swapped into the model in place)
        replace_weights: bool = False,  # after fit, copy the BEMA weights into the model instead of `learn.model_ema`
        skip_ema: bool = True,  # no update when a callback cancelled the step or batch (no optimizer step happened)
        switch_every: int | SwitchEMA | None = None,  # Switch EMA with the BEMA weights, every N epochs
        ema_device: DeviceLike = None,  # where theta_0, the EMA and the BEMA weights live; None = beside the model
        foreach: bool | None = None,  # fused multi-tensor steps (True), loops (False), fastest (None)
        all_parameters: bool = False,  # also average parameters without `requires_grad`
        all_buffers: bool = False,  # also average non-persistent buffers
        flatten_model: bool = False,  # pack the model and the EMAs into flat buffers
        ema_dtype: torch.dtype | None = None,  # dtype of their floating tensors, e.g. torch.float32 for bf16 models
        compile: bool | None = None,  # compiled steps (True), eager (False), where they pay (None; see ModelEMA)
    ):
        self.settings: dict[str, Any] = dict(
            ema_power=ema_power,
            bias_power=bias_power,
            lag=lag,
            multiplier=multiplier,
            min_ema_multiplier=min_ema_multiplier,
            update_after=update_after,
            update_every=update_every,
            device=ema_device,
            foreach=foreach,
            all_parameters=all_parameters,
            all_buffers=all_buffers,
            flatten_model=flatten_model,
            ema_dtype=ema_dtype,
            compile=compile,
        )
        BEMA(nn.Linear(1, 1), **self.settings)  # everything BEMA checks, checked now rather than at fit
        self.validate_ema = check_flag(validate_ema, "validate_ema")
        self.replace_weights = check_flag(replace_weights, "replace_weights")
        self.switch_every = check_switch(switch_every)
        self._init_events(start, skip_ema)

    @property
    def _engine(self) -> BEMA:
        return cast(BEMA, AveragingCallback._engine.fget(self))  # type: ignore[attr-defined]  # a property

    def _new_engine(self, flatten_model: bool | None = None) -> BEMA:
        settings = dict(self.settings)
        if flatten_model is not None:
            settings["flatten_model"] = flatten_model
        return BEMA(self.learn.model, **settings)

    def _start_fit(self, loaded_engine, loaded):
        engine = self._new_engine()
        if loaded is not None and loaded_engine is not None and _resumed_epoch(self.learn) > 0:
            engine.load_state_dict(loaded_engine.state_dict())  # `learn.load` then `fit(..., start_epoch=k)`
            return engine, loaded["started"]
        return engine, False

    def _begin(self) -> None:
        self._engine.reset()  # theta_0 and the step count start at `start`

    def _update(self) -> None:
        self._engine.update()

    def restore_ema_checkpoint(self, state: dict) -> None:
        "Install a checked checkpoint: `learn.model_ema` is its BEMA model; `fit(..., start_epoch=k)` continues it"
        engine = self._new_engine()
        engine.load_state_dict(state["engine"])
        self.engine = engine
        self._loaded = {"started": state["started"]}
        self._publish(engine)
