"""The EMA's weights in the live model, in place, and the model's own put back exactly afterwards.

Parameters whose EMA has the model's dtype and device are exchanged with it (no extra memory
beyond one tensor at a time, exact both ways): inside the swap, the EMA's values are in the
model and the model's in the EMA's tensors. Everything else is backed up where the EMA lives
and overwritten: buffers (DDP broadcasts rank 0's at every forward and BatchNorm in train mode
updates them, so they are never exchanged: writes to them inside the swap are discarded), and
parameters kept in another dtype or on another device (a cast would lose EMA precision).

Inside the swap the model's parameters *are* the EMA's: an in-place write to one of them
(found through its version counter; writes through `.data` bypass it) is kept in the EMA on
the way out, whichever way it was swapped, and reported to the caller.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class WeightSwap:
    """One swap: `enter()` puts the EMA in the model, `exit()` puts the model's weights back."""

    def __init__(self, pairs: Sequence[tuple[str, Tensor, Tensor, bool]]) -> None:
        self.pairs = list(pairs)  # (name, model tensor, EMA tensor, is a parameter)
        self.backups: list[Tensor | None] = []  # None: exchanged
        # What the EMA's values were written into: kept even if the model lets go of it (`p.data = ...`).
        self.written_into: list[Tensor] = []
        self.versions: list[int] = []

    @torch.no_grad()
    def enter(self) -> None:
        half_done: tuple[Tensor, Tensor] | None = None  # (model tensor, its own values) while an exchange runs
        try:
            for _, model_tensor, ema_tensor, is_parameter in self.pairs:
                same_kind = (model_tensor.dtype, model_tensor.device) == (ema_tensor.dtype, ema_tensor.device)
                if is_parameter and same_kind:
                    own = model_tensor.clone()
                    half_done = (model_tensor, own)
                    model_tensor.copy_(ema_tensor)
                    ema_tensor.copy_(own)
                    half_done = None
                    self.backups.append(None)
                else:
                    self.backups.append(model_tensor.to(ema_tensor.device, copy=True))
                    model_tensor.copy_(ema_tensor)
        except BaseException:
            # A failure (out of memory, say) part-way: every pair done, and the one under way, put back.
            if half_done is not None:
                half_done[0].copy_(half_done[1])
            self._restore()
            raise
        self.written_into = [model_tensor.detach() for _, model_tensor, _, _ in self.pairs]
        self.versions = [model_tensor._version for _, model_tensor, _, _ in self.pairs]

    def ema_value(self, index: int) -> Tensor:
        """Where the EMA's value of pair `index` is during the swap (in the model when exchanged)."""
        ema_tensor = self.pairs[index][2]
        return self.written_into[index] if self.backups[index] is None else ema_tensor

    @torch.no_grad()
    def exit(self, targets: Sequence[Tensor] | None = None) -> list[str]:
        """Put the model's weights back; return the parameters written in place inside the swap.

        `targets`: where the model now keeps each tensor, if it was moved or replaced inside the
        swap (`model.to(...)`); the EMA's values are read from the tensors the swap wrote them
        into, the model's own are written, converted, wherever the model keeps them now.
        """
        written = []
        for index, ((name, model_tensor, ema_tensor, is_parameter), backup, version) in enumerate(
            zip(self.pairs, self.backups, self.versions)
        ):
            target = model_tensor if targets is None else targets[index]
            ema_values = self.written_into[index]
            changed = is_parameter and ema_values._version != version
            if changed:
                written.append(name)
            if backup is None:  # exchanged: the EMA's values are in the model's storage, the model's in the EMA's
                own = ema_tensor.clone()
                ema_tensor.copy_(ema_values)
                target.copy_(own)
            else:
                if changed:
                    ema_tensor.copy_(ema_values)
                target.copy_(backup)
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


class SwapGuard:
    """An averager's swap session: at most one `WeightSwap` at a time, and what may not run during it."""

    def __init__(self) -> None:
        self.swap: WeightSwap | None = None

    @property
    def active(self) -> bool:
        return self.swap is not None

    def ema_values(self, ema_tensors: Sequence[Tensor]) -> list[Tensor]:
        """The EMA's tensors as they stand, wherever they are (inside a swap, partly in the model: copies then)."""
        if self.swap is None:
            return list(ema_tensors)
        return [self.swap.ema_value(index).detach().clone() for index in range(len(ema_tensors))]

    def check_outside(self, what: str) -> None:
        """Raise if `what` is called while the EMA weights are in the model."""
        if self.swap is not None:
            raise RuntimeError(
                f"{what} called inside use_ema_weights(): the model holds the EMA weights and the EMA's own tensors "
                "hold the model's. Call it after the with block."
            )

    def enter(self, pairs: Sequence[tuple[str, Tensor, Tensor, bool]]) -> WeightSwap:
        """Put the EMA side of `pairs` into the model (restored on failure) and hold the swap."""
        self.check_outside("use_ema_weights()")
        swap = WeightSwap(pairs)
        swap.enter()
        self.swap = swap
        return swap

    def exit(self, find_targets: Callable[[], Sequence[Tensor] | None] | None = None) -> None:
        """Put the model's weights back (see `WeightSwap.exit`); warn, at the `with` line, about in-place writes.

        `find_targets` says where the model keeps its tensors now, if they moved inside the swap. The swap
        is released first: if finding them fails, the model's values still go back into the tensors the
        swap wrote, and the error is raised.
        """
        swap, self.swap = self.swap, None
        if swap is None:
            return
        try:
            targets = None if find_targets is None else find_targets()
        except BaseException:
            swap.exit(None)
            raise
        written = swap.exit(targets)
        if written:
            warnings.warn(
                f"Parameters {list(written)} were written in place inside use_ema_weights(); the writes went into "
                "the EMA (inside the block the model's parameters are the EMA's).",
                UserWarning,
                # SwapGuard.exit <- the averager's use_ema_weights <- contextlib's __exit__ <- the with block
                stacklevel=4,
            )
