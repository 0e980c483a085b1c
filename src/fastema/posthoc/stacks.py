"""The K EMAs of a PostHocEMA side by side: one (K, elements) buffer per device and dtype, the K EMA modules
viewing it, the update's steps (`StackedStep`: the model read once for all K), and following the model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.parallel import is_sharded, local_part
from ..core.plan import Plan, kernel_steps, pack_model
from ..core.steps import StackedStep, Step, fused_step_supported, is_averaged, layout_strides
from ..core.swap import SwapGuard
from ..core.tracking import IdentityWatch, Placement, changes, copy_of_model, tensor_slots


class StackedEMAs:
    """K EMAs of `model`'s `tracked` tensors in stacked buffers, stepped together; counts copied once for all."""

    def __init__(
        self,
        model: nn.Module,
        tracked: dict[str, Tensor],
        num_emas: int,
        ema_dtype: torch.dtype | None,
        foreach: bool | None,
        flatten_model: bool,
    ) -> None:
        self.model, self.names, self.num_emas = model, list(tracked), num_emas
        self.ema_dtype, self.foreach, self.flatten_model = ema_dtype, foreach, flatten_model
        self._build(tracked)

    def _build(self, tracked: dict[str, Tensor]) -> None:
        """The K stacked buffers, the K EMA modules viewing them, and the update's steps."""
        placement = Placement(None, self.ema_dtype)
        # The layout the EMAs are built in: the model's tensors must keep it (their values are read in memory order).
        self.built_layouts = {name: _layout(tensor) for name, tensor in tracked.items()}
        averaged = [name for name, tensor in tracked.items() if is_averaged(tensor)]
        copied = [name for name in tracked if name not in set(averaged)]
        # One stack per (device, EMA dtype): row k is EMA k, its columns the model's elements in memory order.
        groups: dict[tuple, list[str]] = {}
        for name in averaged:
            tensor = tracked[name]
            groups.setdefault((tensor.device, placement.dtype_for(tensor)), []).append(name)
        self.views: list[dict[str, Tensor]] = [{} for _ in range(self.num_emas)]
        self.groups: list[tuple[Tensor, list[str], list[int]]] = []
        for (device, dtype), names in groups.items():
            offsets, total = [], 0
            for name in names:
                offsets.append(total)
                total += tracked[name].numel()
            stack = torch.empty(self.num_emas, total, device=device, dtype=dtype)
            for name, offset in zip(names, offsets):
                tensor = tracked[name]
                for index, views in enumerate(self.views):
                    view = stack.as_strided(tensor.shape, layout_strides(tensor), index * total + offset)
                    view.copy_(tensor.detach())
                    views[name] = view
            self.groups.append((stack, names, offsets))
        self.copies = {name: placement.twin(tracked[name]) for name in copied}  # counts: copied, one for all K
        self.modules = [
            copy_of_model(self.model, tracked, placement, twins={**views, **self.copies}) for views in self.views
        ]
        self.plan_steps()

    def plan_steps(self) -> None:
        """The update's steps, from the model's tensors as they are now."""
        slots = tensor_slots(self.model)
        model_tensors = {name: local_part(slots[name][1]) for name in self.names}
        steps: list[Step] = []
        for stack, names, offsets in self.groups:
            fused = fused_step_supported(stack.device, stack.dtype) if self.foreach is None else self.foreach
            pieces, piece_offsets = [model_tensors[name] for name in names], list(offsets)
            packed = False
            if self.flatten_model:
                every_tensor = [local_part(tensor) for _, tensor in slots.values()]
                pieces, piece_offsets = pack_model(pieces, piece_offsets, every_tensor)
                packed = len(pieces) < len(names)
            # A packed buffer is read, not the tensors: `p.data = ...` must be noticed on its storage's use count.
            steps.append(StackedStep(stack, pieces, piece_offsets, fused, watch_storage=packed))
        if self.copies:
            names = list(self.copies)
            steps += kernel_steps(
                [self.copies[name] for name in names],
                [model_tensors[name] for name in names],
                [slots[name][0].is_parameter for name in names],
                self.foreach,
            )
        self.plan = Plan(steps)
        self.stacked = [step for step in steps if isinstance(step, StackedStep)]
        self.model_tensors = model_tensors
        first = self.names[0]  # watched by identity: `fully_shard` after construction is refused
        self.sentinel = IdentityWatch(self.model, *slots[first])
        self.signature = _layout_signature(model_tensors)
        self.seen_changes = changes()

    def ensure_current(self) -> None:
        """Follow the model: new tensors or storage are re-read; a change of shape, memory layout or device raises."""
        if self.seen_changes == changes() and not self.plan.stale() and not self.sentinel.moved():
            return
        slots = tensor_slots(self.model)
        missing = [name for name in self.names if name not in slots]
        if missing:
            raise RuntimeError(f"The model no longer has the tensors {missing} that this PostHocEMA averages")
        if any(is_sharded(slots[name][1]) for name in self.names):
            raise RuntimeError(
                "The model was sharded (FSDP2 fully_shard) after this PostHocEMA was built; PostHocEMA does not "
                "support sharded models yet"
            )
        current = {name: local_part(slots[name][1]) for name in self.names}
        # Compared with the layout the EMAs were built in, not with the tensor objects: `model.to(...)`
        # and `p.data = ...` change a Parameter's data and keep the object.
        for name, tensor in current.items():
            if _layout(tensor) != self.built_layouts[name]:
                raise RuntimeError(
                    f"The model's tensor {name} changed shape, memory layout or device; PostHocEMA follows new "
                    "tensors and dtypes only. Build it after moving or converting the model."
                )
        if _layout_signature(current) == self.signature and all(
            current[name] is self.model_tensors[name] for name in self.names
        ):
            for stacked in self.stacked:
                stacked.rebaseline()  # a transient view of a packed buffer, nothing moved
            self.seen_changes = changes()
            return
        self.plan = Plan([])  # drop the old steps (and their hold on packed buffers) before planning anew
        self.stacked = []
        self.plan_steps()

    def views_of(self, index: int) -> dict[str, Tensor]:
        """EMA `index`'s tracked tensors by name (views of the stacks; the copied counts are shared by all)."""
        views = self.views[index]
        return {name: views[name] if name in views else self.copies[name] for name in self.names}

    def step(self, weights: list[float]) -> None:
        """One update of the K EMAs, EMA k moving by `weights[k]` (1 - its decay)."""
        for stacked in self.stacked:
            stacked.set_weights(weights)
        self.plan.step(0.0)


def _layout(tensor: Tensor) -> tuple:
    return tuple(tensor.shape), layout_strides(tensor), tensor.device


def _layout_signature(tensors: dict[str, Tensor]) -> list[tuple]:
    return [(tensor.data_ptr(), tensor.dtype, tensor.device, layout_strides(tensor)) for tensor in tensors.values()]


def migrate_v01(state: dict) -> dict:
    """The pickled state of a PostHocEMA written by fastema 0.1 (the stacks' parts were its own attributes then)."""
    stacks = StackedEMAs.__new__(StackedEMAs)
    stacks.model, stacks.names, stacks.num_emas = state["model"], state["tensor_names"], len(state["sigma_rels"])
    stacks.ema_dtype, stacks.foreach, stacks.flatten_model = (
        state["ema_dtype"],
        state["foreach"],
        state["flatten_model"],
    )
    stacks.built_layouts, stacks.views, stacks.groups = state["_built_layouts"], state["_views"], state["_groups"]
    stacks.copies, stacks.modules = state["_copies"], state["_modules"]
    stacks.plan_steps()
    kept = {key: value for key, value in state.items() if not key.startswith("_") or key == "_snapshot_dir_checked"}
    return {
        **kept,
        "_stacks": stacks,
        "_swap": SwapGuard(),
        "_latch": state["_latch"],
        "_attachments": state["_attachments"],
    }
