"""The tracker: the EMA's tensors, paired with the model's, the update plan, and following the model.

`ModelEMA` delegates here everything that depends on where the model's tensors are: the pairs
(`tracking.Binding`), the plan made from them once (`plan.plan_update`), the check at each
update that they have not moved (one counter, one dict lookup), and, when they have, moving
the EMA along and planning again. The plan's failure latch lives here too: a step or a wait that
fails part-way leaves the EMA incomplete, and every later read or update raises until a reset or
a load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from .counting import Counts
from .latch import FailureLatch
from .parallel import is_sharded, layout_of, local_part, reshard, unwrap_model
from .plan import Plan, plan_update
from .steps import Weight, capturing, is_dense, traced_step
from .swap import SwapGuard
from .tracking import (
    Binding,
    IdentityWatch,
    Placement,
    all_slots,
    changes,
    changes_since,
    check_tracked_present,
    copy_of_model,
    tensor_slots,
)
from .underflow import Underflow
from .zero import PartitionWatch, is_partitioned

_REPLAN_HINT = (
    "If a tracked tensor was changed by hand (p.data = ... with another dtype, device or shape), call refresh(); "
    "then call "
)


class Tracker:
    """The EMA's tensors (a module copy, or this rank's shards under FSDP2) kept paired with the model's."""

    def __init__(
        self,
        model: nn.Module,
        tracked: dict[str, Tensor],
        placement: Placement,
        *,
        foreach: bool | None,
        flatten: bool,
        compile: bool | None = None,
    ) -> None:
        self.model = model
        self.names = list(tracked)
        self.placement = placement
        self.foreach, self.flatten, self.compile = foreach, flatten, compile
        # FSDP2 (`fully_shard`): DTensor parameters; the EMA keeps this rank's shard of each, no module copy.
        self.sharded = any(is_sharded(tensor) for tensor in tracked.values())
        if self.sharded and flatten:
            raise ValueError("Invalid flatten_model: True, but the model is sharded (FSDP2), which owns its storage")
        self.module: nn.Module | None = None
        self.shards: dict[str, Tensor] = {}
        if self.sharded:
            self.shards = {name: placement.twin(local_part(tensor)) for name, tensor in tracked.items()}
        else:
            self.module = copy_of_model(model, tracked, placement)
        self.latch = FailureLatch("reset() or load()/load_state_dict()")
        self.plan = Plan([])
        self.replacements: dict[str, int] = {}  # how often the model replaced each tensor object
        self.volatile: frozenset[str] = frozenset()
        self.bind()

    # ---- pairing and planning ------------------------------------------------------------------------

    def bind(self) -> None:
        """Pair the model's tensors with the EMA's and plan the update (done once, and after the model changed)."""
        self.plan = Plan([])  # the old plan dropped first: the buffers it packed are free to move again
        binding = self.binding = Binding(self.model, self.module, self.shards, self.names, self.volatile)
        all_model_tensors = [local_part(tensor) for _, tensor in all_slots(self.model)]
        self.plan = plan_update(
            binding.ema_tensors,
            binding.model_locals,
            binding.is_parameter,
            foreach=self.foreach,
            flatten=self.flatten,
            compile=self.compile,
            all_model_tensors=all_model_tensors,
            volatile=[binding.slot_of(name) for name in binding.names if name in self.volatile],
        )
        self.volatile_keys = {
            (id(slot.owner(self.model)), slot.key)
            for slot in (*binding.slots, *binding.untracked)
            if slot.name in self.volatile
        }
        binding.record()  # packing gave tensors new addresses
        _check_no_shared_storage(binding.ema_tensors, all_model_tensors)
        # One tracked tensor watched by identity at every update: replacing tensors straight in `_parameters`
        # (FSDP2's `fully_shard` does, after this EMA was built) moves no counter. Not for an FSDP2 EMA, whose
        # model swaps unsharded copies in and out at every forward; ZeRO-3 partitions are watched by address.
        steady = [index for index, name in enumerate(binding.names) if name not in self.volatile]
        self.sentinel: IdentityWatch | PartitionWatch | None = None
        if steady and not self.sharded:
            self.sentinel = IdentityWatch(self.model, binding.slots[steady[0]], binding.model_tensors[steady[0]])
        zero = [index for index, tensor in enumerate(binding.model_tensors) if is_partitioned(tensor)]
        if zero:
            self.sentinel = PartitionWatch(
                [binding.names[index] for index in zero],
                [binding.model_tensors[index] for index in zero],
                [binding.model_locals[index] for index in zero],
                [binding.ema_tensors[index] for index in zero],
            )
        # For sharded tensors, what gathers the EMA's parts into a full tensor: the DTensor, or a `ZeroLayout`.
        self.layouts: dict[str, Any] = {  # values: Tensor | ZeroLayout
            name: layout_of(tensor) for name, tensor in zip(self.names, binding.model_tensors) if is_sharded(tensor)
        }
        self.underflow = Underflow(binding.ema_tensors)
        self.plan.rebaseline()
        self.seen_changes = changes()

    def ensure_current(self) -> None:
        """Follow the model if it changed. One counter, one dict lookup and a few storage use counts.

        Inside `torch.compile` or a CUDA-graph capture: see below (after `p.data = ...` with the same layout
        the graph reads the new data; with another layout, dtype or device its guards see it).
        """
        if capturing():
            if self.sharded or self.plan.offloaded:
                raise RuntimeError(
                    "ModelEMA.update() of a sharded EMA (DTensor: FSDP2, tensor parallel; DeepSpeed ZeRO-3) or of an "
                    "offloaded one (on another device than the model, updated in a background thread) cannot run "
                    "inside torch.compile or a CUDA graph: call it outside (e.g. under torch.compiler.disable)"
                )
            # Dynamo cannot trace storage addresses, and the change counter moves whenever any module is
            # built anywhere (compiling builds some): a guard on it would recompile the caller's graph each
            # time. Inside a graph each tracked tensor's object and layout are checked instead (as guards).
            if not self.binding.held_as_recorded() or self.plan.slots_stale():
                torch.compiler.disable(self.follow)()  # eager: a graph break, only when the model did change
            return
        if self.sentinel is not None and self.sentinel.moved():
            self.follow()
            return
        if self.seen_changes != changes():
            if not self._only_volatile_changes():
                self.follow()
                return
            self.seen_changes = changes()
        if self.plan.stale():
            self.follow()

    @property
    def device(self) -> torch.device:
        """Where the EMA's tensors are (the first one's device): where captured counts live."""
        tensors = self.binding.ema_tensors
        return tensors[0].device if tensors else torch.device("cpu")

    def _only_volatile_changes(self) -> bool:
        """Whether every module change since the last check re-registered a tensor read through its slot."""
        if not self.volatile_keys:
            return False
        recent = changes_since(self.seen_changes)
        return recent is not None and all(change in self.volatile_keys for change in recent)

    def follow(self, force: bool = False) -> None:
        """Something may have moved: check the binding, and if it is out of date move the EMA along and re-plan."""
        self.synchronize()
        reshard(self.model)
        if not force and self.binding.current() and not self.plan.slots_stale():
            self.plan.rebaseline()
            self.binding.record()  # a replaced submodule may hold the same tensors: record their new holders
            self.seen_changes = changes()
            return
        before = self.binding.recorded_objects
        self.plan.close()
        self._relocate()
        self.bind()
        # Tensors the model keeps replacing (`self.avg = ...` in forward) are read through their slots
        # from now on: each replacement would otherwise cost a new binding and plan.
        replaced = [name for name, tensor in self.binding.objects().items() if before.get(name, tensor) is not tensor]
        for name in replaced:
            self.replacements[name] = self.replacements.get(name, 0) + 1
        volatile = frozenset(name for name, count in self.replacements.items() if count >= 2)
        if volatile != self.volatile:
            self.volatile = volatile
            self.bind()

    @torch.no_grad()
    def _relocate(self) -> None:
        """Put each EMA tensor beside its model tensor (or on `device`), in its layout, keeping its dtype and values.

        An EMA tensor still on the meta device (the model was built there, then materialised
        with `to_empty()`) starts from the model's values. Every place of the EMA's module then
        holds what the model's does: the EMA tensor where the model holds a tracked tensor (so
        weights the model ties or unties are tied or untied alike), and the model's own storage
        (or a copy) where it holds an untracked one.
        """
        model_slots = tensor_slots(self.model)
        check_tracked_present(self.names, model_slots)
        ema_modules = {} if self.module is None else dict(self.module.named_modules(remove_duplicate=False))
        ema_by_model_tensor: dict[int, Tensor] = {}
        for name in self.names:
            slot, model_tensor = model_slots[name]
            ema_tensor = self.shards[name] if self.module is None else slot.get(self.module, ema_modules)
            local = local_part(model_tensor)
            if is_sharded(model_tensor) and not self.sharded:
                raise RuntimeError(
                    f"The model's tensor {name} is now sharded (a DTensor or a ZeRO-3 partition): the model was "
                    "sharded (FSDP2 fully_shard, DeepSpeed ZeRO-3) after this ModelEMA was built, so it would "
                    "average tensors the model no longer trains. Build the ModelEMA after fully_shard(model) or "
                    "deepspeed.initialize(...)."
                )
            if ema_tensor is None or ema_tensor.shape != local.shape:
                raise RuntimeError(
                    f"The model's tensor {name} changed shape from "
                    f"{None if ema_tensor is None else tuple(ema_tensor.shape)} to {tuple(local.shape)}: its structure "
                    "changed. Build a new ModelEMA for the new model."
                )
            moved = self._follow_placement(ema_tensor, local)
            if moved is not None and self.module is None:
                self.shards[name] = ema_tensor = moved
            elif moved is not None:
                _replace_data(ema_tensor, moved)
            ema_by_model_tensor[id(model_tensor)] = ema_tensor
        if self.module is None:
            return
        untracked: dict[int, Tensor] = {}  # one EMA-side tensor per model tensor, so ties stay ties
        for slot, model_tensor in all_slots(self.model):
            current = slot.get(self.module, ema_modules)
            if slot.path not in ema_modules:
                continue  # a submodule the model gained: not part of this EMA
            wanted = ema_by_model_tensor.get(id(model_tensor))
            if wanted is None:
                wanted = untracked.get(id(model_tensor))
            if wanted is None:
                dtype = current.dtype if current is not None else self.placement.dtype_for(model_tensor)
                wanted = self.placement.untracked(model_tensor, dtype)
                if slot.is_parameter:
                    wanted = nn.Parameter(wanted, requires_grad=False)
                untracked[id(model_tensor)] = wanted
            if current is not wanted:
                slot.set(self.module, wanted)

    def _follow_placement(self, ema_tensor: Tensor, model_tensor: Tensor) -> Tensor | None:
        """The EMA tensor's data moved beside `model_tensor` and laid out like it (None: nothing to do)."""
        if ema_tensor.device.type == "meta" and model_tensor.device.type != "meta":
            return self.placement.twin(model_tensor, ema_tensor.dtype)
        device = self.placement.device_for(model_tensor)
        laid_out = not is_dense(model_tensor) or ema_tensor.stride() == model_tensor.stride()
        if ema_tensor.device == device and laid_out:
            return None
        stride = model_tensor.stride() if is_dense(model_tensor) else ema_tensor.contiguous().stride()
        moved = torch.empty_strided(ema_tensor.shape, stride, dtype=ema_tensor.dtype, device=device)
        return moved.copy_(ema_tensor)

    def ema_by_name(self) -> dict[str, Tensor]:
        """The EMA's tensors (this rank's parts) by state-dict name, as they stand."""
        return dict(zip(self.names, self.binding.ema_tensors))

    def tensors_after_swap(self) -> list[Tensor] | None:
        """Where the model keeps its tracked tensors as a swap ends, if they moved since the binding (None: not).

        One pass over the model: `p.data = ...` moves no counter, so the binding is compared.
        """
        reshard(self.model)  # FSDP2: drop unsharded copies that hold EMA values
        if self.binding.current():
            return None
        slots = tensor_slots(self.model)
        return [local_part(slots[name][1]) for name in self.names]

    # ---- running the plan ----------------------------------------------------------------------------

    def step(self, weight: Weight) -> None:
        """One update of every pair with `weight` (1 - decay), without autograd; a failure part-way latches."""
        # What `torch.no_grad()` does, without its Python context-manager cost (a few microseconds).
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        first = self.sentinel if isinstance(self.sentinel, PartitionWatch) and self.sentinel.pending else None
        try:
            if torch.compiler.is_compiling():  # traced into the caller's graph: the objects, not the plan's views
                traced_step(self.binding.ema_tensors, traced_models(self), weight)  # type: ignore[arg-type]
                return
            if first is not None:  # ZeRO-3: the first update of a binding is read back (zero.PartitionWatch)
                first.before_first()
            self.plan.step(weight)
            if first is not None:
                first.after_first(weight)
        except Exception as error:
            self.fail(error)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    def synchronize(self) -> None:
        """Wait until an offloaded update running in the background has finished; its failure latches."""
        try:
            self.plan.wait()
        except Exception as error:
            self.fail(error)

    def wait_forgetting_failure(self) -> None:
        """Wait for a background update, forgetting a failure: the caller overwrites the whole EMA."""
        try:
            self.plan.wait()
        except Exception:
            return

    def fail(self, error: BaseException) -> NoReturn:
        """An update failed part-way: the EMA is incomplete until reset or loaded."""
        self.latch.fail(error, _REPLAN_HINT)

    @torch.no_grad()
    def overwrite(self, values: dict[str, Tensor] | None) -> None:
        """Set EMA tensors by name (None: all, from the model), following the model first; clears a failure.

        The whole EMA is written (the names not given keep values that were whole), so a
        background update still in flight is waited for and its failure forgotten.
        """
        self.wait_forgetting_failure()
        self.ensure_current()
        binding = self.binding
        sources = dict(zip(binding.names, binding.model_locals)) if values is None else values
        for name, ema_tensor in zip(binding.names, binding.ema_tensors):
            if name in sources:
                ema_tensor.copy_(sources[name])
        self.latch.clear()

    # ---- copying and pickling ------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # Threads, streams and the plan's views are rebuilt on unpickling.
        self.synchronize()
        state = dict(self.__dict__)
        for name in ("plan", "binding", "layouts", "sentinel", "underflow"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.plan = Plan([])
        self.bind()


def traced_models(tracker: Tracker) -> list[Tensor]:
    """The model's tensors for a traced update; those it replaces in every forward read through their slots."""
    if not tracker.volatile:
        return tracker.binding.model_locals
    modules = dict(tracker.model.named_modules(remove_duplicate=False))
    return [
        slot.get(tracker.model, modules) if slot.name in tracker.volatile else tensor  # type: ignore[misc]
        for slot, tensor in zip(tracker.binding.slots, tracker.binding.model_locals)
    ]


def migrate_v01(state: dict) -> dict:
    """The pickled state of a ModelEMA written by fastema 0.1 (the tracker's parts were its own attributes then)."""
    tracker = Tracker.__new__(Tracker)
    tracker.__setstate__(
        {
            "model": state["model"],
            "names": state["tensor_names"],
            "placement": state["_placement"],
            "foreach": state["foreach"],
            "flatten": state["flatten_model"],
            "sharded": state["sharded"],
            "module": state["_module"],
            "shards": state["_shards"],
            "latch": state["_latch"],
            "replacements": state.get("_replacements", {}),
            "volatile": state.get("_volatile", frozenset()),
            "compile": False,
        }
    )
    counts = Counts(state["decay"])
    counts.num_updates, counts.num_steps, counts.last_decay = (state.pop(key) for key in Counts.NAMES)
    kept = {"length": None, "compile": False, **{key: value for key, value in state.items() if not key.startswith("_")}}
    return {**kept, "_tracker": tracker, "_counts": counts, "_swap": SwapGuard(), "_attachments": state["_attachments"]}


def matching(tracker: Tracker, module: nn.Module, purpose: str) -> list[Tensor]:
    """`module`'s tensors in tracking order, or a ValueError listing every name/shape mismatch."""
    if tracker.sharded:
        raise RuntimeError(f"{purpose} with another module is not supported for a sharded (FSDP2) EMA")
    by_name = {name: tensor for name, (_, tensor) in tensor_slots(unwrap_model(module)).items()}
    missing = [name for name in tracker.names if name not in by_name]
    mismatched = [
        f"{name}: {tuple(by_name[name].shape)} != {tuple(ema_tensor.shape)}"
        for name, ema_tensor in tracker.ema_by_name().items()
        if name in by_name and by_name[name].shape != ema_tensor.shape
    ]
    if missing or mismatched:
        raise ValueError(f"Invalid module for {purpose}: missing tensors {missing}, shape mismatches {mismatched}")
    return [by_name[name] for name in tracker.names]


def same_shapes(tracker: Tracker, sources: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of `sources` (another EMA's, by name) that this EMA tracks, or a ValueError on any shape."""
    own = tracker.ema_by_name()
    shared = {name: tensor for name, tensor in sources.items() if name in own}
    if not shared:
        raise ValueError("Invalid copy_from: the other EMA averages none of this EMA's tensors (no name in common)")
    differing = [tuple(tensor.shape) for name, tensor in shared.items() if tensor.shape != own[name].shape]
    if differing:
        raise ValueError(f"Invalid copy_from: the other EMA's tensors have other shapes ({differing[:3]})")
    return shared


def named_tensors(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """The model's tensors with these state-dict names, or a clear error."""
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"Invalid tensor_names: {names!r}; expected a sequence of state-dict names")
    available = {name: tensor for name, (_, tensor) in tensor_slots(model).items()}
    missing = [name for name in names if name not in available]
    if missing or not names or len(set(names)) != len(names):
        raise ValueError(
            f"Invalid tensor_names: {list(names)!r}; expected distinct names of the model's parameters and buffers "
            f"(not found: {missing})"
        )
    return {name: available[name] for name in names}


def _replace_data(tensor: Tensor, data: Tensor) -> None:
    """Give a tensor of the EMA's module new data, keeping the object (and so weights tied to it)."""
    try:
        tensor.data = data
    except RuntimeError:  # another kind of tensor (meta -> real): `.data =` cannot, swapping can
        swap_tensors = getattr(torch.utils, "swap_tensors", None)  # torch >= 2.3
        if swap_tensors is None:
            raise RuntimeError(
                "An EMA built on the meta device can follow the model to real memory with torch >= 2.3 only; "
                "with this torch, build the ModelEMA after to_empty() and the initialisation."
            ) from None
        swap_tensors(tensor, nn.Parameter(data, requires_grad=False) if isinstance(tensor, nn.Parameter) else data)


def _check_no_shared_storage(ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor]) -> None:
    """The EMA must never average into the model's own storage (an internal invariant, checked at each binding)."""
    model_storages = {local_part(tensor).untyped_storage().data_ptr() for tensor in model_tensors}
    model_storages.discard(0)  # meta and empty tensors have no storage
    shared = [tensor for tensor in ema_tensors if tensor.untyped_storage().data_ptr() in model_storages]
    if shared:
        raise RuntimeError(
            "fastema internal error: an EMA tensor shares storage with the model, so updates would write into the "
            "model. Please report this with the model's structure; build a new ModelEMA meanwhile."
        )
