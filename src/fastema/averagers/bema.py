"""BEMA, the bias-corrected EMA (Block & Zhang, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes",
2025, arXiv 2508.00180), built on the engine.

With `s` optimizer steps taken, at `s = update_after` the snapshot theta_0 and the EMA are set to the model's
weights theta; after that, with `t = s - update_after` and `x = lag + multiplier * t`, each update does

    beta = max(x ** -ema_power, min_ema_multiplier)     EMA <- (1 - beta) EMA + beta theta
    alpha = x ** -bias_power                            BEMA = EMA + alpha (theta - theta_0)

Three `ModelEMA`s of the model hold the tensors, so each inherits the engine's placement (`ema_dtype`, `device`
offload, FSDP2 shards), following the model, fused steps and checkpoint format: the EMA (driven with
`update(decay=1 - beta)`), theta_0 (set by `reset()`) and the BEMA weights. An update copies theta into the last
(a `lerp_` of weight 1, which gives theta exactly) and turns that copy into the BEMA weights in place,
`(theta - theta_0) * alpha + EMA`: three more fused kernels per update, so that a `module` kept from before
(`ema_model = bema.module`) holds the BEMA weights after every update, never theta.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import load_into, save_on_rank_0
from ..core.checks import DeviceLike, check_decay, check_foreach, check_update_every
from ..core.hooks import Attachments, RemovableHandle
from ..core.latch import FailureLatch
from ..core.model_ema import ModelEMA
from ..core.state import prepare_load
from ..core.tracking import tracked_parameters

__all__ = ["BEMA"]

STATE_FORMAT = "fastema.BEMA"
STATE_VERSION = 1
HYPERPARAMETERS = ("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier", "update_after", "update_every")
PARTS = ("bema", "ema", "theta0")


def _check_number(value: object, name: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r}; expected a number >= {minimum}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number >= {minimum}")
    return float(value)


class BEMA:
    """Bias-corrected EMA (BEMA) of a model's weights: an EMA with the lag taken out, for any PyTorch loop.

    `update()` after each optimizer step (or `attach(optimizer)`); `module`, `use_ema_weights()`, `copy_to()` and
    `save()` give the BEMA weights `EMA + alpha (theta - theta_0)` of the last update (formulas: the module's
    docstring). Before `update_after` steps they are the model's weights at the last step; the first update is at
    step `update_after + update_every`. Hyperparameters as in the paper and TRL's `BEMACallback` (kappa =
    `ema_power`, eta = `bias_power`, rho = `lag`, gamma = `multiplier`, tau = `update_after`), with TRL's defaults
    except two: `t` counts from `update_after` (as the paper's code does; TRL counts from step 0), and
    `update_every=1` (TRL's 400 makes up for its per-parameter Python loop). Options as for `ModelEMA`:
    `ema_dtype`, `device`, `foreach`, `flatten_model`, `all_parameters`, `all_buffers`, `tensor_names`.
    `state_dict()` holds theta_0, the EMA and the BEMA weights, so a resumed run continues bit for bit.

    Attributes: `num_steps` (calls of `update()`), `num_updates` (BEMA updates), `last_alpha`, `last_beta`,
    `ema` (the plain EMA, a `ModelEMA`: read it, do not update it), `tensor_names`, `model`.
    """

    def __init__(
        self,
        model: nn.Module,
        ema_power: float = 0.5,  # kappa: the EMA's weight on the model is beta_t = (lag + multiplier t) ** -kappa
        bias_power: float = 0.2,  # eta: the bias correction is alpha_t = (lag + multiplier t) ** -eta
        lag: float = 10,  # rho: the schedules' offset, a virtual starting age
        multiplier: float = 1.0,  # gamma: how fast the schedules age per step
        min_ema_multiplier: float = 0.0,  # a floor under beta_t
        update_after: int = 0,  # tau: theta_0 is taken after this many optimizer steps, and t counts from there
        update_every: int = 1,  # update when t is a multiple of this (TRL's update_freq)
        *,
        all_parameters: bool = False,  # also average parameters without `requires_grad`
        all_buffers: bool = False,  # also average non-persistent buffers
        foreach: bool | None = None,  # fused multi-tensor steps (True), for-loops (False), fastest (None)
        device: DeviceLike = None,  # where theta_0, the EMA and the BEMA weights live; None = beside the model
        flatten_model: bool = False,  # pack the model and the EMAs into flat buffers (see ModelEMA)
        ema_dtype: torch.dtype | None = None,  # dtype of their floating tensors; None = the model's
        tensor_names: Sequence[str] | None = None,  # average exactly these (state-dict names); None = by the flags
        compile: bool | None = None,  # compiled steps (True), eager (False), where they pay (None; see ModelEMA)
    ) -> None:
        self.ema_power = _check_number(ema_power, "ema_power", 0.0)
        self.bias_power = _check_number(bias_power, "bias_power", 0.0)
        self.lag = _check_number(lag, "lag", 0.0)
        self.multiplier = _check_number(multiplier, "multiplier", 0.0)
        if self.lag + self.multiplier < 1.0:
            raise ValueError(
                f"Invalid lag, multiplier: {lag}, {multiplier}; lag + multiplier must be >= 1, so that the first "
                "EMA weight (lag + multiplier) ** -ema_power is at most 1"
            )
        self.min_ema_multiplier = check_decay(min_ema_multiplier, "min_ema_multiplier")
        if isinstance(update_after, bool) or not isinstance(update_after, int):
            raise TypeError(f"Invalid update_after: {update_after!r}; expected an int >= 0")
        if update_after < 0:
            raise ValueError(f"Invalid update_after: {update_after!r}; expected an int >= 0")
        self.update_after = update_after
        self.update_every = check_update_every(update_every)
        self.foreach = check_foreach(foreach)
        options: dict[str, Any] = dict(
            all_parameters=all_parameters,
            all_buffers=all_buffers,
            foreach=foreach,
            device=device,
            flatten_model=flatten_model,
            ema_dtype=ema_dtype,
            compile=compile,
        )
        self._bema = ModelEMA(model, tensor_names=tensor_names, **options)
        self.tensor_names = self._bema.tensor_names
        self.ema = ModelEMA(model, tensor_names=self.tensor_names, **options)
        self._theta0 = ModelEMA(model, tensor_names=self.tensor_names, **options)
        self.model, self.sharded, self.flatten_model = self._bema.model, self._bema.sharded, flatten_model
        self.num_steps = self.num_updates = 0
        self.last_alpha = self.last_beta = 1.0
        self._materialised = True  # the BEMA weights are in `_bema` (not the copy of theta an update leaves there)
        self._latch = FailureLatch("reset() or load()/load_state_dict()")
        self._attachments = Attachments()

    def _parts(self) -> dict[str, ModelEMA]:
        return {"bema": self._bema, "ema": self.ema, "theta0": self._theta0}

    # ---- the schedules and the update ----------------------------------------------------------------

    def beta(self, t: int) -> float:
        """The EMA's weight on the model at update `t` (steps since `update_after`): `max(x ** -kappa, floor)`."""
        return max((self.lag + self.multiplier * t) ** -self.ema_power, self.min_ema_multiplier)

    def alpha(self, t: int) -> float:
        """The bias correction's weight at update `t`: `(lag + multiplier t) ** -eta`."""
        return (self.lag + self.multiplier * t) ** -self.bias_power

    def _check_outside(self, what: str) -> None:
        if self.ema_weights_in_use:
            raise RuntimeError(
                f"{what} called inside use_ema_weights(): the model holds the BEMA weights. Call it after the with "
                "block."
            )

    def update(self) -> None:
        """Count an optimizer step and, when one is due, move theta_0, the EMA and the BEMA weights; after each step."""
        self._check_outside("update()")
        self._latch.check()
        self._attachments.check_manual_update()
        step = self.num_steps + 1
        t = step - self.update_after
        try:
            if t < 0:  # burn-in: the BEMA weights are the model's
                self._bema.update(0.0)
                self._materialised = True
            elif t == 0:
                self._restart()
            elif t % self.update_every == 0:
                beta, alpha = self.beta(t), self.alpha(t)
                self.ema.update(1.0 - beta)
                self._bema.update(0.0)  # theta, exactly; turned into the BEMA weights right away
                self._materialised = False
                self.last_alpha, self.last_beta = alpha, beta
                # Now, not on the next read: a `module` kept from before must never hold theta.
                self._materialise()
                self.num_updates += 1
        except Exception as error:  # some of the three moved, others not
            self._latch.fail(error)
        self.num_steps = step

    def _restart(self) -> None:
        for part in self._parts().values():
            part.reset()
        self._materialised = True
        self.last_alpha = self.last_beta = 1.0

    @torch.no_grad()
    def _materialise(self) -> None:
        """Turn the copy of theta the last update left into the BEMA weights in place: (theta - theta_0) alpha + EMA."""
        self._latch.check()
        if self._materialised or self.ema_weights_in_use:
            return
        tensors = [part.ema_tensors() for part in self._parts().values()]
        floating = [index for index, tensor in enumerate(tensors[0]) if tensor.is_floating_point()]
        bema, ema, theta0 = ([group[index] for index in floating] for group in tensors)
        try:
            if self.foreach is False:
                for target, average, start in zip(bema, ema, theta0):
                    target.sub_(start).mul_(self.last_alpha).add_(average)
            else:
                torch._foreach_sub_(bema, theta0)
                torch._foreach_mul_(bema, self.last_alpha)
                torch._foreach_add_(bema, ema)
        except Exception as error:
            self._latch.fail(error)
        self._materialised = True

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call `update()` after every step `optimizer` really takes (see `ModelEMA.attach`)."""
        return self._attachments.attach(self, optimizer, self.update, tracked_parameters(self.model, self.tensor_names))

    def synchronize(self) -> None:
        """Wait for offloaded updates running in the background (no-op otherwise)."""
        for part in self._parts().values():
            part.synchronize()

    def before_model_write(self) -> None:
        """Call before changing the model's weights outside a `torch.optim` step (offloaded only; see `ModelEMA`)."""
        for part in self._parts().values():
            part.before_model_write()

    def close(self) -> None:
        """Release the background threads and streams of an offloaded BEMA."""
        for part in self._parts().values():
            part.close()

    def reset(self) -> None:
        """Start again from the model's current weights, as if built now (the step count too)."""
        self._check_outside("reset()")
        self._restart()
        self.num_steps = self.num_updates = 0
        self._latch.clear()

    # ---- reading -------------------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The BEMA model (eval mode, no gradients); under FSDP2 there is none: use `use_ema_weights()`."""
        self._check_outside("BEMA.module")
        self._materialise()
        return self._bema.module

    @property
    def ema_weights_in_use(self) -> bool:
        """Whether `use_ema_weights()` currently has the BEMA weights in the model."""
        return self._bema.ema_weights_in_use

    @contextmanager
    def use_ema_weights(self) -> Iterator[nn.Module]:
        """Temporarily put the BEMA weights into the live model, in place (see `ModelEMA.use_ema_weights`)."""
        self._check_outside("use_ema_weights()")
        self._materialise()
        with self._bema.use_ema_weights() as model:
            yield model

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Copy the BEMA weights into `model` (default: the tracked model, in place)."""
        self._materialise()
        self._bema.copy_to(model)

    def switch(self) -> None:
        """Switch EMA with the BEMA weights: `copy_to()` the tracked model; the optimizer's state is untouched."""
        self.copy_to()

    # ---- state ---------------------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, float | int]:
        """What the saved counts and tensors mean: a state loads only into a BEMA with the same values."""
        return {key: getattr(self, key) for key in HYPERPARAMETERS}

    def state_dict(self) -> dict:
        """theta_0, the EMA and the BEMA weights (each a `ModelEMA` state, gathered under FSDP2), counts, settings."""
        self._materialise()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            **self.hyperparameters(),
            "num_steps": self.num_steps,
            "num_updates": self.num_updates,
            "last_alpha": self.last_alpha,
            "last_beta": self.last_beta,
            **{key: part.state_dict() for key, part in self._parts().items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from `state_dict()`; every part is checked before anything is written."""
        self._check_outside("load_state_dict()")
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("Invalid state_dict: not a fastema.BEMA state")
        problems = [
            f"{key} {state_dict.get(key)!r} != {value!r} (this BEMA's)"
            for key, value in {"version": STATE_VERSION, **self.hyperparameters()}.items()
            if state_dict.get(key) != value
        ]
        counts = [state_dict.get(key) for key in ("num_steps", "num_updates")]
        decays = [state_dict.get(key) for key in ("last_alpha", "last_beta")]
        if not all(isinstance(count, int) and count >= 0 for count in counts):
            problems.append(f"counts {counts!r} are not non-negative ints")
        if not all(isinstance(value, float) for value in decays):
            problems.append(f"last_alpha, last_beta {decays!r} are not floats")
        writes = []
        for key, part in self._parts().items():
            try:
                writes.append(prepare_load(part, state_dict.get(key)))
            except ValueError as error:
                problems.append(f"{key}: {error}")
        if problems:
            raise ValueError("Invalid state_dict for this BEMA (nothing was loaded): " + "; ".join(problems))
        for write in writes:
            write()
        self.num_steps, self.num_updates = int(state_dict["num_steps"]), int(state_dict["num_updates"])
        self.last_alpha, self.last_beta = float(state_dict["last_alpha"]), float(state_dict["last_beta"])
        self._materialised = True  # the saved BEMA weights were materialised
        self._latch.clear()

    def sharded_state(self, purpose: str | None = None) -> ShardedBEMAState:
        """This BEMA as a `torch.distributed.checkpoint` `Stateful`: `dcp.save({"bema": bema.sharded_state("save")})`.

        Under FSDP2 each rank saves and loads its own shards of theta_0, the EMA and the BEMA weights (see
        `ModelEMA.sharded_state`; give the `purpose`, "save" or "load": without one the states are copies).
        """
        self._check_outside("sharded_state()")
        if purpose != "load":
            self._materialise()
        return ShardedBEMAState(self, purpose)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `state_dict()` atomically (rank 0 only; under FSDP2 every rank must call it)."""
        return save_on_rank_0(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore from a file written by `save()`; a bad file changes nothing."""
        load_into(path, self.load_state_dict, STATE_FORMAT)

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self.hyperparameters().items())
        return f"BEMA({settings}, tensors={len(self.tensor_names)}, num_updates={self.num_updates})"


class ShardedBEMAState:
    """A `BEMA` as a DCP `Stateful`: its three `ModelEMA.sharded_state`s, its counts and its hyperparameters."""

    def __init__(self, bema: BEMA, purpose: str | None) -> None:
        self.bema = bema
        self.parts = {key: part.sharded_state(purpose) for key, part in bema._parts().items()}

    def state_dict(self) -> dict[str, Any]:
        bema = self.bema
        counts = [bema.num_steps, bema.num_updates, bema.update_after, bema.update_every]
        schedule = [getattr(bema, key) for key in HYPERPARAMETERS[:5]] + [bema.last_alpha, bema.last_beta]
        return {
            "counts": torch.tensor(counts, dtype=torch.int64),
            "schedule": torch.tensor(schedule, dtype=torch.float64),
            **{key: part.state_dict() for key, part in self.parts.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the hyperparameters, then load each part (each checked before it is written)."""
        bema = self.bema
        num_steps, num_updates, *counts = state_dict["counts"].tolist()
        *schedule, last_alpha, last_beta = state_dict["schedule"].tolist()
        saved = dict(zip(HYPERPARAMETERS, [*schedule, *counts]))
        differing = [
            f"{key} {saved[key]!r} != {value!r}" for key, value in bema.hyperparameters().items() if saved[key] != value
        ]
        if differing:
            raise ValueError("Invalid sharded BEMA checkpoint (nothing was loaded): " + "; ".join(differing))
        for index, (key, part) in enumerate(self.parts.items()):
            try:
                part.load_state_dict(state_dict[key])
            except ValueError as error:
                if index:  # the parts before it were loaded: the BEMA is a mix until a load or reset
                    bema._latch.error = error
                raise
        bema.num_steps, bema.num_updates = int(num_steps), int(num_updates)
        bema.last_alpha, bema.last_beta = last_alpha, last_beta
        bema._materialised = True
        bema._latch.clear()
