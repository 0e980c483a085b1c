"""The offloaded step: an EMA on another device than the model (`ema_device='cpu'` for a CUDA model).

Each step snapshots the model's tensors into a mirror on the EMA's device, allocated once
(pinned host memory for a CUDA model, so the copy can run asynchronously), and updates the EMA
from the mirror with the usual fused kernels on that device.

For a CUDA model with a CPU EMA the step does not wait: the device-to-host copy runs on a side
stream that first waits for the training stream (so it reads the weights the optimizer has just
written), and the CPU `lerp_` runs in a background thread once the copy has landed. Before the
next optimizer step writes the weights, the training stream waits for the copy on the GPU (an
event wait, never a host sync): `torch.optim` optimizers do this through a global step pre-hook,
the fastai callback in `before_step`, and anything else can call `ModelEMA.before_model_write()`.
Whatever reads the EMA (`ModelEMA.module`, `state_dict`, validation) first waits for the thread.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._foreach import is_dense

_pending_copies: weakref.WeakSet[MirrorGroup] = weakref.WeakSet()
_optimizer_hook = None


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    for group in list(_pending_copies):
        group.before_model_write()


def _install_optimizer_hook() -> None:
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_pre_hook(_before_optimizer_step)


def mirror_of(tensors: Sequence[Tensor], device: torch.device, pin_memory: bool) -> list[Tensor]:
    """Uninitialised twins of `tensors` on `device` (same dtypes, shapes and, where dense, strides), one buffer per dtype."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in tensors:
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    flats = {
        dtype: torch.empty(size, device=device, dtype=dtype, pin_memory=pin_memory) for dtype, size in sizes.items()
    }
    offsets = dict.fromkeys(sizes, 0)
    mirror = []
    for tensor in tensors:
        stride = tensor.stride() if is_dense(tensor) else torch.empty(tensor.shape, device="meta").stride()
        mirror.append(flats[tensor.dtype].as_strided(tensor.shape, stride, offsets[tensor.dtype]))
        offsets[tensor.dtype] += tensor.numel()
    return mirror


class MirrorGroup:
    """EMA tensors on one device, model tensors on another."""

    def __init__(
        self, ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor],
        make_groups: Callable[[Sequence[Tensor], Sequence[Tensor]], list], background: bool | None = None,
    ) -> None:
        ema_device, model_device = ema_tensors[0].device, model_tensors[0].device
        # Pinned host memory lets the device-to-host copy run asynchronously.
        pin_memory = model_device.type == "cuda" and ema_device.type == "cpu"
        self.background = pin_memory if background is None else background
        self.model_tensors = list(model_tensors)
        self.mirror = mirror_of(self.model_tensors, ema_device, pin_memory)
        self.groups = make_groups(list(ema_tensors), self.mirror)  # EMA vs mirror: same device
        self._future: Future | None = None
        self._copied = self._stream = None
        if self.background:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastema")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        if self.background and model_device.type == "cuda":
            self._stream = torch.cuda.Stream(model_device)
            self._copied = torch.cuda.Event()
            _pending_copies.add(self)
            _install_optimizer_hook()

    def step(self, weight: float) -> None:
        """Snapshot the model into the mirror, then move the EMA toward it (in the background if enabled)."""
        self.wait()  # the previous update must be done with the mirror before it is overwritten
        if self._stream is None:
            torch._foreach_copy_(self.mirror, self.model_tensors)
        else:
            # The copy reads what the training stream's optimizer step wrote: wait for it on the GPU.
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
            with torch.cuda.stream(self._stream):
                torch._foreach_copy_(self.mirror, self.model_tensors, non_blocking=True)
                self._copied.record(self._stream)
        if self.background:
            self._future = self._executor.submit(self._update_from_mirror, weight)
        else:
            self._update_from_mirror(weight)

    def _update_from_mirror(self, weight: float) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # blocks the background thread only, until the mirror has landed
        with torch.no_grad():  # grad mode is per thread
            for group in self.groups:
                group.step(weight)

    def wait(self) -> None:
        """Block until a background update has finished (re-raising its error, if any)."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def before_model_write(self) -> None:
        """Make the current CUDA stream wait (on the GPU) until the last snapshot of the model is taken."""
        if self._copied is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._copied)
