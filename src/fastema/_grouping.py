"""Which step each (EMA, model) pair of tensor lists gets: fused, staged (mixed dtypes) or mirrored (two devices)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._foreach import (
    TensorGroup, copy_fused, copy_loop, fused_step_supported, is_averaged, lerp_fused, lerp_loop, loop_step_supported,
)
from ._mixed import StagedGroup
from ._offload import MirrorGroup

Group = TensorGroup | StagedGroup | MirrorGroup


def group_tensor_pairs(
    ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], foreach: bool | None
) -> list[Group]:
    """Group (EMA, model) pairs by device and dtype and pick each group's step.

    Same device and dtype: `_foreach_lerp_`. Same device, a wider EMA dtype: `StagedGroup`.
    Another device: `MirrorGroup` (a snapshot of the model on the EMA's device, then the
    same choice there). `foreach=None` picks the fused kernels wherever they run, `True`
    insists on them (raising where they cannot run), `False` uses per-tensor loops.
    """
    buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors, strict=True):
        key = (ema_tensor.device, ema_tensor.dtype, model_tensor.device, model_tensor.dtype)
        ema_list, model_list = buckets.setdefault(key, ([], []))
        ema_list.append(ema_tensor)
        model_list.append(model_tensor)

    groups: list[Group] = []
    for (ema_device, ema_dtype, model_device, model_dtype), (ema_list, model_list) in buckets.items():
        if ema_device != model_device:
            groups.append(MirrorGroup(ema_list, model_list, lambda ema, mirror: group_tensor_pairs(ema, mirror, foreach)))
            continue
        averaged = is_averaged(ema_list[0])
        if averaged and not loop_step_supported(ema_device, ema_dtype):
            raise ValueError(f"Cannot average tensors of dtype {ema_dtype} on {ema_device}: lerp_ is not implemented")
        fused_ok = fused_step_supported(ema_device, ema_dtype)
        if foreach and not fused_ok:
            raise ValueError(
                f"Invalid foreach: True, but the fused multi-tensor step does not run for {ema_dtype} "
                f"tensors on {ema_device}; use foreach=None (automatic) or False (for-loop)"
            )
        use_fused = fused_ok if foreach is None else foreach
        if ema_dtype != model_dtype and averaged and is_averaged(model_list[0]):
            groups.append(StagedGroup(ema_list, model_list, use_fused))
        elif ema_dtype != model_dtype:
            groups.append(TensorGroup(copy_loop, ema_list, model_list))  # copy_ converts; a count is never averaged
        elif averaged:
            groups.append(TensorGroup(lerp_fused if use_fused else lerp_loop, ema_list, model_list))
        else:
            groups.append(TensorGroup(copy_fused if use_fused else copy_loop, ema_list, model_list))
    return groups
