"""Grouping tensor pairs once, and the fused (multi-tensor) and for-loop EMA kernels.

Every kernel has the same signature, `kernel(ema_tensors, model_tensors, weight)`, and
updates `ema_tensors` in place: floating tensors move toward the model by `weight`
(`ema.lerp_(model, weight)` is `ema + weight * (model - ema)`, i.e.
`decay * ema + (1 - decay) * model` with `weight = 1 - decay`), other tensors are copied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Kernel = Callable[[list[Tensor], list[Tensor], float], None]


def lerp_fused(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: float) -> None:
    """One multi-tensor launch per chunk of tensors (same device and dtype on both sides)."""
    torch._foreach_lerp_(ema_tensors, model_tensors, weight)


def lerp_loop(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: float) -> None:
    """One `lerp_` per tensor: the reference implementation of `lerp_fused`."""
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
        ema_tensor.lerp_(model_tensor, weight)


def copy_fused(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: float) -> None:
    """Copy integer/bool buffers (`num_batches_tracked`): a count is never averaged."""
    torch._foreach_copy_(ema_tensors, model_tensors)


def copy_loop(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: float) -> None:
    """Per-tensor copy (also converts device and dtype)."""
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
        ema_tensor.copy_(model_tensor)


def is_averaged(tensor: Tensor) -> bool:
    """Floating and complex tensors are averaged; integer and bool tensors are copied."""
    return tensor.is_floating_point() or tensor.is_complex()


def is_dense(tensor: Tensor) -> bool:
    """Whether `tensor` covers a gap-free block of memory (any dimension order, e.g. channels-last)."""
    expected_stride = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda size_stride: size_stride[1]):
        if size == 1:
            continue
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


@functools.cache
def fused_step_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the multi-tensor kernels run for this device and dtype (probed once)."""
    try:
        ema_probe = torch.zeros(2, device=device, dtype=dtype)
        model_probe = torch.ones(2, device=device, dtype=dtype)
        if is_averaged(ema_probe):
            torch._foreach_lerp_([ema_probe], [model_probe], 0.5)
        else:
            torch._foreach_copy_([ema_probe], [model_probe])
    except (RuntimeError, NotImplementedError):
        return False
    return True


@functools.cache
def loop_step_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether plain `lerp_` runs for this device and dtype (float8 types, for one, do not)."""
    try:
        torch.zeros(2, device=device, dtype=dtype).lerp_(torch.ones(2, device=device, dtype=dtype), 0.5)
    except (RuntimeError, NotImplementedError):
        return False
    return True


class LayoutSentinels:
    """A few tensors whose storage address reveals a `.to(...)` since they were recorded.

    `Module._apply` (behind `.to()`, `.cuda()`, `.half()`, ...) gives new storage to every
    tensor it converts; what it converts is decided per device, dtype and, for a
    memory-format change, rank. So the first tensor of each (device, dtype, rank) is enough
    to notice, at one `data_ptr()` each per step instead of one per tensor.
    """

    def __init__(self, *tensor_lists: Sequence[Tensor]) -> None:
        first: dict[tuple, Tensor] = {}
        for index, tensors in enumerate(tensor_lists):  # e.g. the model's and the EMA's, watched separately
            for tensor in tensors:
                first.setdefault((index, tensor.device, tensor.dtype, tensor.dim()), tensor)
        self.tensors = list(first.values())
        self.addresses = [tensor.data_ptr() for tensor in self.tensors]

    def moved(self) -> bool:
        """True when a sentinel's storage was replaced since construction."""
        for tensor, address in zip(self.tensors, self.addresses):
            if tensor.data_ptr() != address:
                return True
        return False


@dataclass
class TensorGroup:
    """Tensors that one kernel call updates together, grouped once when the EMA is built."""

    kernel: Kernel
    ema_tensors: list[Tensor]
    model_tensors: list[Tensor]

    def step(self, weight: float) -> None:
        """Move this group's EMA tensors toward the model by `weight` (= 1 - decay)."""
        self.kernel(self.ema_tensors, self.model_tensors, weight)
