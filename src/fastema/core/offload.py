"""The offloaded step: the EMA on another device than the model (a CUDA model's EMA in host memory).

A snapshot of the model is copied into a pinned mirror on the EMA's device on a side stream, and
the update runs from it in a background thread; whatever reads the EMA waits for it
(`wait()`), and the model's next writer waits, on the GPU, for the copy (`before_model_write()`,
also done by a global `torch.optim` step pre-hook while any offloaded step lives).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from .steps import Step, Weight, is_dense

_offloaded_steps: weakref.WeakSet[OffloadedStep] = weakref.WeakSet()
# Re-entrant: a garbage collection inside a locked section can run a finalizer that takes it again.
_hook_lock = threading.RLock()
_optimizer_hook = None


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    with _hook_lock:  # another thread may be adding or removing steps
        steps = list(_offloaded_steps)
    for step in steps:
        step.before_model_write()


def _watch_optimizer_steps(step: OffloadedStep) -> None:
    """Register `step` with the global `torch.optim` step pre-hook (installed while any such step lives)."""
    global _optimizer_hook
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    with _hook_lock:
        _offloaded_steps.add(step)
        if _optimizer_hook is None:
            _optimizer_hook = register_optimizer_step_pre_hook(_before_optimizer_step)


def _unwatch_optimizer_steps(step: OffloadedStep | None = None) -> None:
    """Forget `step` (None: one that was garbage-collected); remove the hook when no step is left."""
    global _optimizer_hook
    with _hook_lock:
        if step is not None:
            _offloaded_steps.discard(step)
        # Iterating skips entries whose object is gone, even before the set has pruned them.
        if not any(True for _ in _offloaded_steps) and _optimizer_hook is not None:
            _optimizer_hook.remove()
            _optimizer_hook = None


def optimizer_hook_installed() -> bool:
    """Whether the global optimizer step pre-hook is installed (for tests and diagnostics)."""
    return _optimizer_hook is not None


def mirror_of(tensors: Sequence[Tensor], device: torch.device, pin_memory: bool) -> list[Tensor]:
    """Uninitialised twins of `tensors` on `device`: same dtypes, shapes and (if dense) strides, a buffer per dtype."""
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


class OffloadedStep(Step):
    """EMA tensors on one device, the model's on another: a snapshot of the model into a mirror, then `inner`.

    The mirror lives on the EMA's device, allocated once (pinned host memory for a CUDA model).
    For a CUDA model with a CPU EMA the step does not wait for the GPU:

    - buffers (BatchNorm statistics, which the next forward writes in place) are copied on the
      training stream, so the forward is queued behind their copy;
    - parameters are copied on a side stream that first waits for the training stream (it reads
      what the optimizer has just written); only the next optimizer step writes them, and it
      waits for the copy on the GPU (an event wait, never a host sync) through a global
      `torch.optim` step pre-hook, or `before_model_write()`;
    - the CPU update runs in a background thread once the copies have landed (a blocking event:
      the thread sleeps instead of spinning).
    """

    def __init__(
        self,
        ema_tensors: Sequence[Tensor],
        model_tensors: Sequence[Tensor],
        is_parameter: Sequence[bool],
        make_inner: Callable[[list[Tensor], list[Tensor]], list[Step]],
        background: bool | None = None,
    ) -> None:
        ema_device, model_device = ema_tensors[0].device, model_tensors[0].device
        pin_memory = model_device.type == "cuda" and ema_device.type == "cpu"
        self.background = pin_memory if background is None else background
        order = sorted(range(len(model_tensors)), key=lambda index: is_parameter[index])  # buffers first
        self.model_tensors = [model_tensors[index] for index in order]
        self.num_buffers = sum(not is_parameter[index] for index in order)
        self.mirror = mirror_of(self.model_tensors, ema_device, pin_memory)
        self.inner = make_inner([ema_tensors[index] for index in order], self.mirror)  # EMA vs mirror: one device
        self._future: Future | None = None
        self._stream: torch.cuda.Stream | None = None
        self._copied: torch.cuda.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        if self.background:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastema")
        if self.background and model_device.type == "cuda":
            self._stream = torch.cuda.Stream(model_device)
            self._copied = torch.cuda.Event(blocking=True)
            _watch_optimizer_steps(self)
        self._finalizer = weakref.finalize(self, _release, self._executor, self._stream is not None)

    def step(self, weight: Weight) -> None:
        self.wait()  # the previous update must be done with the mirror before it is overwritten
        stream, copied = self._stream, self._copied
        if stream is None or copied is None:
            torch._foreach_copy_(self.mirror, self.model_tensors)
        else:
            current = torch.cuda.current_stream(stream.device)
            buffers = slice(0, self.num_buffers)
            if self.num_buffers:  # queued before the next forward, which writes them in place
                torch._foreach_copy_(self.mirror[buffers], self.model_tensors[buffers], non_blocking=True)
            stream.wait_stream(current)  # after the optimizer's writes and the buffer copies
            with torch.cuda.stream(stream):
                parameters = slice(self.num_buffers, None)
                if len(self.model_tensors) > self.num_buffers:
                    torch._foreach_copy_(self.mirror[parameters], self.model_tensors[parameters], non_blocking=True)
                copied.record(stream)
        if self._executor is not None:
            self._future = self._executor.submit(self._update_from_mirror, weight)
        else:
            self._update_from_mirror(weight)

    def _update_from_mirror(self, weight: Weight) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # blocks the background thread only, until the mirror has landed
        with torch.no_grad():  # grad mode is per thread
            for step in self.inner:
                step.step(weight)

    def wait(self) -> None:
        """Block until a background update has finished (re-raising its error, if any)."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def before_model_write(self) -> None:
        if self._stream is not None and self._copied is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._copied)

    def stale(self) -> bool:
        return any(step.stale() for step in self.inner)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            _unwatch_optimizer_steps(self)
            self._finalizer()


def _release(executor: ThreadPoolExecutor | None, watched: bool) -> None:
    """What an `OffloadedStep` holds outside itself: its thread and its place under the optimizer hook."""
    if executor is not None:
        executor.shutdown(wait=False)
    if watched:
        _unwatch_optimizer_steps()
