"""The EMA's weights in the live model, in place, and the model's own put back exactly afterwards.

Parameters whose EMA has the model's dtype and device are exchanged with it (no extra memory
beyond one tensor at a time, exact both ways): inside the swap, the EMA's values are in the
model and the model's in the EMA's tensors. Everything else is backed up where the EMA lives
and overwritten: buffers (DDP broadcasts rank 0's at every forward and BatchNorm in train mode
updates them, so they are never exchanged: writes to them inside the swap are discarded), and
parameters kept in another dtype or on another device (a cast would lose EMA precision).

Inside the swap the model's parameters *are* the EMA's: an in-place write to one of them
(found through its version counter) is kept in the EMA on the way out, whichever way it was
swapped, and reported to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class WeightSwap:
    """One swap: `enter()` puts the EMA in the model, `exit()` puts the model's weights back."""

    def __init__(self, pairs: Sequence[tuple[str, Tensor, Tensor, bool]]) -> None:
        self.pairs = list(pairs)  # (name, model tensor, EMA tensor, is a parameter)
        self.backups: list[Tensor | None] = []  # None: exchanged
        self.versions: list[int] = []

    @torch.no_grad()
    def enter(self) -> None:
        try:
            for _, model_tensor, ema_tensor, is_parameter in self.pairs:
                same_kind = (model_tensor.dtype, model_tensor.device) == (ema_tensor.dtype, ema_tensor.device)
                if is_parameter and same_kind:
                    _exchange(model_tensor, ema_tensor)
                    self.backups.append(None)
                else:
                    self.backups.append(model_tensor.to(ema_tensor.device, copy=True))
                    model_tensor.copy_(ema_tensor)
        except BaseException:
            self._restore()
            raise
        self.versions = [model_tensor._version for _, model_tensor, _, _ in self.pairs]

    def ema_value(self, index: int) -> Tensor:
        """Where the EMA's value of pair `index` is during the swap (in the model when exchanged)."""
        _, model_tensor, ema_tensor, _ = self.pairs[index]
        return model_tensor if self.backups[index] is None else ema_tensor

    @torch.no_grad()
    def exit(self) -> list[str]:
        """Put the model's weights back; return the parameters written in place inside the swap."""
        written = []
        for (name, model_tensor, ema_tensor, is_parameter), backup, version in zip(
            self.pairs, self.backups, self.versions
        ):
            if is_parameter and model_tensor._version != version:
                written.append(name)
                if backup is not None:  # an exchanged tensor carries the write back by itself
                    ema_tensor.copy_(model_tensor)
        self._restore()
        return written

    def _restore(self) -> None:
        for (_, model_tensor, ema_tensor, _), backup in zip(self.pairs, self.backups):
            if backup is None:
                _exchange(model_tensor, ema_tensor)
            else:
                model_tensor.copy_(backup)


def _exchange(first: Tensor, second: Tensor) -> None:
    held = first.clone()
    first.copy_(second)
    second.copy_(held)
