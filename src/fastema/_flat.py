"""The packed layout (`flatten_model=True`): model and EMA tensors live in one flat buffer each.

On CPU a multi-tensor step still pays a dispatch per tensor, and small tensors run on one
thread, so models with hundreds of small tensors (MobileNet, EfficientNet) take about twice
the time of one `lerp_` over the same number of elements. Packing removes that gap: every
tracked floating tensor of one (device, dtype) becomes a view into a single buffer, with its
own shape and strides, and the EMA is packed the same way, so an update is one `lerp_`.
The tensor objects are kept (`Tensor.set_` swaps their storage), so optimizers, DDP and
anything else that holds the model's parameters keep working.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._foreach import fused_step_supported, is_averaged, is_dense
from ._grouping import group_tensor_pairs


def _byte_extent(tensor: Tensor) -> tuple[int, int]:
    """First and one-past-last byte that `tensor` can touch."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()) if size > 0)
    return tensor.data_ptr(), tensor.data_ptr() + span * tensor.element_size()


def overlapping_tensors(tensors: Iterable[Tensor]) -> set[int]:
    """`id`s of tensors whose memory overlaps another tensor's (packing them would break the aliasing)."""
    by_storage: dict[int, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        if tensor.numel() > 0:
            by_storage[tensor.untyped_storage().data_ptr()].append(tensor)
    overlapping: set[int] = set()
    for sharing in by_storage.values():
        spans = sorted((*_byte_extent(tensor), id(tensor)) for tensor in sharing)
        for (_, end, first_id), (start, _, second_id) in zip(spans, spans[1:]):
            if start < end:
                overlapping.update((first_id, second_id))
    return overlapping


def pack(tensors: Sequence[Tensor], layouts: Sequence[Tensor]) -> Tensor:
    """Move `tensors` into one new flat buffer, each keeping its object, shape and the strides of its `layouts` twin."""
    first = tensors[0]
    flat = torch.empty(sum(tensor.numel() for tensor in tensors), device=first.device, dtype=first.dtype)
    storage = flat.untyped_storage()
    offset = 0
    with torch.no_grad():
        for tensor, layout in zip(tensors, layouts):
            flat.as_strided(layout.shape, layout.stride(), offset).copy_(tensor)
            tensor.set_(storage, offset, layout.shape, layout.stride())
            offset += tensor.numel()
    return flat


class FlatGroup:
    """A (device, dtype) group packed into one model buffer and one EMA buffer: one `lerp_` (or `copy_`) per step."""

    def __init__(self, ema_tensors: list[Tensor], model_tensors: list[Tensor]) -> None:
        self.averaged = is_averaged(model_tensors[0])  # integer buffers (BatchNorm counts) are copied
        self.model_flat = pack(model_tensors, model_tensors)
        # Same order and strides as the model, so element i of both buffers is the same weight.
        self.ema_flat = pack(ema_tensors, model_tensors)
        same_kind = (self.ema_flat.device, self.ema_flat.dtype) == (self.model_flat.device, self.model_flat.dtype)
        # A wider EMA dtype or another device: the staged or mirrored step, over the two flat buffers.
        self.inner = None if same_kind else group_tensor_pairs([self.ema_flat], [self.model_flat], None)

    def step(self, weight: float) -> None:
        """Move every EMA tensor of the group toward the model by `weight` (= 1 - decay)."""
        if self.inner is not None:
            for group in self.inner:
                group.step(weight)
        elif self.averaged:
            self.ema_flat.lerp_(self.model_flat, weight)
        else:
            self.ema_flat.copy_(self.model_flat)


def split_packable(
    ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], all_model_tensors: Iterable[Tensor]
) -> tuple[list[FlatGroup], list[Tensor], list[Tensor]]:
    """Pack every pair that can be packed into per-(device, dtype) `FlatGroup`s; return them and the rest.

    Packable: a non-empty dense model tensor with a fused step, of the EMA tensor's shape,
    with no memory overlap with another tensor of the model (the EMA may live on another
    device or in a wider dtype; then the flat buffers get the staged or mirrored step). Integer
    buffers are packed too (into their own buffer), so the copy of the counts is one call.
    """
    overlapping = overlapping_tensors(all_model_tensors)
    buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    rest_ema: list[Tensor] = []
    rest_model: list[Tensor] = []
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors, strict=True):
        packable = (
            ema_tensor.shape == model_tensor.shape
            and model_tensor.numel() > 0
            and is_dense(model_tensor)
            and id(model_tensor) not in overlapping
            and fused_step_supported(model_tensor.device, model_tensor.dtype)
        )
        if packable:
            key = (model_tensor.device, model_tensor.dtype, ema_tensor.device, ema_tensor.dtype)
            ema_list, model_list = buckets.setdefault(key, ([], []))
            ema_list.append(ema_tensor)
            model_list.append(model_tensor)
        else:
            rest_ema.append(ema_tensor)
            rest_model.append(model_tensor)
    groups = [FlatGroup(ema_list, model_list) for ema_list, model_list in buckets.values()]
    return groups, rest_ema, rest_model
