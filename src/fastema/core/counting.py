"""How far an EMA has come (updates done, optimizer steps seen, the last decay) and the weight of each update.

Eagerly the counts are Python numbers. Inside `torch.compile` or a CUDA-graph capture an update
cannot change Python numbers: each new value would be a recompile, or be lost at replay. There
the counts move into tensors on the EMA's device, as PyTorch's `capturable` optimizers keep
`step`, and the decay, the warm-up and the weight are computed in tensors too: no host sync, and
a decay given as a tensor (or a float dynamo has made dynamic) changes nothing in the graph.
Once in tensors the counts stay there; reading `num_updates` then reads the tensor (a sync).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checks import check_decay
from .schedules import DecayWarmup
from .steps import capturing

if TYPE_CHECKING:
    from .tracker import Tracker


class Counts:
    """`num_updates`, `num_steps` and `last_decay` of one EMA: Python numbers, or tensors once captured."""

    NAMES = ("num_updates", "num_steps", "last_decay")

    def __init__(self, decay: float) -> None:
        self.num_updates = 0
        self.num_steps = 0
        self.last_decay: float | None = decay
        self.tensors: dict[str, Tensor] | None = None  # the counts, once an update ran captured

    def get(self, name: str) -> Any:
        if self.tensors is None:
            return getattr(self, name)
        value = self.tensors[name].item()
        if name != "last_decay":
            return int(value)
        return None if math.isnan(value) else value  # no decay yet (a sharded state can say so)

    def set(self, name: str, value: Any) -> None:
        if self.tensors is None:
            setattr(self, name, value)
        else:  # in place: a captured CUDA graph keeps writing these very tensors
            self.tensors[name].fill_(math.nan if value is None else value)

    def _in_tensors(self, device: torch.device) -> dict[str, Tensor]:
        if self.tensors is None:
            self.tensors = {
                "num_updates": torch.tensor(self.num_updates, dtype=torch.int64, device=device),
                "num_steps": torch.tensor(self.num_steps, dtype=torch.int64, device=device),
                "last_decay": torch.tensor(
                    math.nan if self.last_decay is None else self.last_decay, dtype=torch.float64, device=device
                ),
            }
        return self.tensors

    def update(
        self,
        tracker: Tracker,
        decay: float | Tensor | None,
        default_decay: float,
        update_every: int,
        warmup: DecayWarmup | None,
    ) -> None:
        """One call of `ModelEMA.update()`: count it, and update the EMA if it is due."""
        if self.tensors is None and not isinstance(decay, Tensor) and not capturing():
            self._update_eagerly(tracker, decay, default_decay, update_every, warmup)
        else:
            self._update_in_tensors(tracker, decay, default_decay, update_every, warmup)

    def _update_eagerly(
        self,
        tracker: Tracker,
        decay: float | None,
        default_decay: float,
        update_every: int,
        warmup: DecayWarmup | None,
    ) -> None:
        if decay is not None:
            decay = check_decay(decay, "decay")
        step = self.num_steps + 1
        if step % update_every:
            self.num_steps = step
            return
        if decay is None:
            decay = default_decay if warmup is None else float(warmup(step, default_decay))
        tracker.ensure_current()  # may raise (a changed structure): then this call did not count
        self.num_steps = step
        weight = 1.0 - decay**update_every
        if 0.0 < weight < tracker.underflow.weight:
            tracker.underflow.warn(decay, weight, update_every)
        tracker.step(weight)
        self.num_updates += 1
        self.last_decay = decay

    def _update_in_tensors(
        self,
        tracker: Tracker,
        decay: float | Tensor | None,
        default_decay: float,
        update_every: int,
        warmup: DecayWarmup | None,
    ) -> None:
        if update_every != 1:
            raise ValueError(
                f"Invalid update_every: {update_every} inside torch.compile, a CUDA graph or with a tensor decay; "
                "these updates run every step (update_every=1): call update() only on the steps you want"
            )
        traced = torch.compiler.is_compiling()
        decay = _checked(decay, traced)  # before anything counts
        known = default_decay if decay is None and warmup is None else decay
        if not traced and isinstance(known, float) and 0.0 < 1.0 - known < tracker.underflow.weight:
            tracker.underflow.warn(known, 1.0 - known, update_every)
        tracker.ensure_current()
        counts = self._in_tensors(tracker.device)
        counts["num_steps"].add_(1)
        if decay is None:
            decay = default_decay if warmup is None else warmup(counts["num_steps"], default_decay)
        last_decay = counts["last_decay"]
        # Written in place, never built from a Python number: a CUDA graph cannot capture a copy from the host.
        # A float is added to a zero, not filled: `fill_` would make dynamo specialise on it (a recompile each).
        if isinstance(decay, Tensor):
            last_decay.copy_(decay.detach().reshape(()))
        else:
            last_decay.zero_().add_(decay)
        tracker.step(1.0 - last_decay)
        counts["num_updates"].add_(1)


def _checked(decay: float | Tensor | None, traced: bool) -> float | Tensor | None:
    """A number in [0, 1], or a tensor of one floating value.

    A tensor's value is not read (that would wait for its device; capturable optimizers trust a tensor `lr`
    alike), nor a float inside `torch.compile`, where it may be a symbol that a comparison would specialise.
    """
    if not isinstance(decay, Tensor):
        return decay if decay is None or traced else check_decay(decay, "decay")
    if decay.numel() != 1 or not decay.is_floating_point():
        raise ValueError(
            f"Invalid decay: a tensor of shape {tuple(decay.shape)} and dtype {decay.dtype}; "
            "a tensor decay must hold one floating value in [0, 1]"
        )
    return decay


class Count:
    """A count of `ModelEMA` read and written through its `Counts` (a Python number, or a tensor once captured)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, ema: object, owner: type | None = None) -> Any:
        if ema is None:
            return self  # the descriptor itself, as properties do
        return ema._counts.get(self.name)  # type: ignore[attr-defined]

    def __set__(self, ema: object, value: Any) -> None:
        ema._counts.set(self.name, value)  # type: ignore[attr-defined]
