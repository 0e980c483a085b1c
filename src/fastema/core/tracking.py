"""What the EMA tracks: (name, model tensor, EMA tensor) bindings, and knowing when they are stale.

A binding pairs every tracked tensor of the model (by state-dict name) with its EMA tensor,
and remembers where both live: the module and key that hold them, their storage address,
device, dtype, shape and strides. `Binding.current()` checks all of that (one pass over the
tensors). It runs only when something may have changed: `changes()` is a counter that moves
whenever any module registers a parameter, buffer or submodule (PyTorch's global
registration hooks: `module.weight = ...`, `load_state_dict(assign=True)`, ...) or converts
its tensors (`nn.Module._apply`, behind `.to()`, `.cuda()`, `.half()`, `to_empty()`, ...).
Reading it costs one call, whatever the number of tensors.

Untracked tensors (frozen parameters, non-persistent buffers) are not averaged. In the EMA's
module they are the model's own storage where the EMA lives beside the model in the same
dtype (so they cost no memory and hold the model's current values), and copies otherwise.
"""

from __future__ import annotations

import copy
import functools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .parallel import local_part

# ---- a counter of module changes -----------------------------------------------------------------------

_changes = [0]
# The latest changes: (module id, tensor name) of a registration, (None, None) for a conversion.
_recent: deque[tuple[int, int | None, str | None]] = deque(maxlen=1024)


def changes() -> int:
    """A number that changes whenever a module anywhere registers or converts tensors."""
    return _changes[0]


def changes_since(seen: int) -> list[tuple[int | None, str | None]] | None:
    """The changes after `seen` as (module id, name) pairs, or None if too many happened to keep them all."""
    if _changes[0] - seen > len(_recent):
        return None
    return [(module_id, name) for count, module_id, name in _recent if count > seen]


def _count_registration(module: nn.Module, name: str, value: object) -> None:
    _changes[0] += 1
    _recent.append((_changes[0], id(module), name))


@functools.cache
def watch_module_changes() -> None:
    """Count module changes from now on (installed once per process, on the first `ModelEMA`).

    The registration hooks are PyTorch's own global hooks. `nn.Module._apply` has no hook, so it
    is wrapped: the wrapper calls the original and then moves the counter, nothing else.
    """
    from torch.nn.modules import module as torch_module

    torch_module.register_module_parameter_registration_hook(_count_registration)
    torch_module.register_module_buffer_registration_hook(_count_registration)
    torch_module.register_module_module_registration_hook(_count_registration)
    original_apply = nn.Module._apply
    if getattr(original_apply, "_fastema_counts_changes", False):
        return

    @functools.wraps(original_apply)
    def _apply(self, *args, **kwargs):
        try:
            return original_apply(self, *args, **kwargs)
        finally:
            _changes[0] += 1
            _recent.append((_changes[0], None, None))

    setattr(_apply, "_fastema_counts_changes", True)  # noqa: B010 - a marker attribute on a function
    nn.Module._apply = _apply  # type: ignore[method-assign]  # the point: _apply has no hook to register


# ---- where tensors live ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where a module holds a tensor: `owner._parameters[key]` or `owner._buffers[key]`."""

    path: str  # the owner's name in the root module ("" for the root)
    key: str
    is_parameter: bool

    @property
    def name(self) -> str:
        return f"{self.path}.{self.key}" if self.path else self.key

    def owner(self, root: nn.Module) -> nn.Module:
        return root.get_submodule(self.path)

    def get(self, root: nn.Module, modules: dict[str, nn.Module] | None = None) -> Tensor | None:
        """The tensor `root` holds here now (None if the module or the key is gone); `modules`: `root`'s by name."""
        if modules is None:
            modules = dict(root.named_modules(remove_duplicate=False))
        owner = modules.get(self.path)
        if owner is None:
            return None
        return (owner._parameters if self.is_parameter else owner._buffers).get(self.key)

    def set(self, root: nn.Module, tensor: Tensor) -> None:
        """Hold `tensor` here (in the EMA's own module; never used on the user's model)."""
        owner = root.get_submodule(self.path)
        if self.is_parameter:
            owner._parameters[self.key] = (
                tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
            )
        else:
            owner._buffers[self.key] = tensor


def tensor_slots(module: nn.Module) -> dict[str, tuple[Slot, Tensor]]:
    """Every parameter, then every buffer, by state-dict name, as `named_parameters()`/`named_buffers()` list them.

    A tensor held in several places (tied weights) appears once, under its first name.
    """
    slots: dict[str, tuple[Slot, Tensor]] = {}
    seen: set[int] = set()
    for is_parameter in (True, False):
        for path, owner in module.named_modules():
            members = owner._parameters if is_parameter else owner._buffers
            for key, tensor in members.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                slot = Slot(path, key, is_parameter)
                slots[slot.name] = (slot, tensor)
    return slots


class IdentityWatch:
    """One tensor watched by identity in the dict of the module holding it (one lookup per check).

    Replacing tensors straight in `_parameters` (FSDP2's `fully_shard` does, for every parameter)
    moves no registration counter; the first tracked tensor watched this way notices it.
    """

    def __init__(self, model: nn.Module, slot: Slot, tensor: Tensor) -> None:
        owner = slot.owner(model)
        self.members = owner._parameters if slot.is_parameter else owner._buffers
        self.key, self.tensor = slot.key, tensor

    def moved(self) -> bool:
        return self.members.get(self.key) is not self.tensor


def tracked_parameters(module: nn.Module, names: list[str]) -> list[Tensor]:
    """The parameters among the tracked tensors `names` (what an attached optimizer must step some of)."""
    slots = tensor_slots(module)
    return [slots[name][1] for name in names if name in slots and slots[name][0].is_parameter]


def all_slots(module: nn.Module) -> list[tuple[Slot, Tensor]]:
    """Every place a tensor is held, tied tensors and shared submodules included (unlike `tensor_slots`)."""
    return [
        (Slot(path, key, is_parameter), tensor)
        for path, owner in module.named_modules(remove_duplicate=False)
        for is_parameter, members in ((True, owner._parameters), (False, owner._buffers))
        for key, tensor in members.items()
        if tensor is not None
    ]


def is_tracked(module: nn.Module, slot: Slot, tensor: Tensor, all_parameters: bool, all_buffers: bool) -> bool:
    """Averaged by default: parameters with `requires_grad` and persistent buffers."""
    if slot.is_parameter:
        return all_parameters or tensor.requires_grad
    return all_buffers or slot.key not in slot.owner(module)._non_persistent_buffers_set


def tracked_tensors(module: nn.Module, all_parameters: bool, all_buffers: bool) -> dict[str, Tensor]:
    """The tensors an EMA averages, by state-dict name."""
    return {
        name: tensor
        for name, (slot, tensor) in tensor_slots(module).items()
        if is_tracked(module, slot, tensor, all_parameters, all_buffers)
    }


# ---- the EMA's copy of the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype the EMA keeps a tensor: `device` (None: beside the model's), `ema_dtype` for floats."""

    device: torch.device | None
    ema_dtype: torch.dtype | None

    def device_for(self, model_tensor: Tensor) -> torch.device:
        return self.device or model_tensor.device

    def dtype_for(self, model_tensor: Tensor) -> torch.dtype:
        if self.ema_dtype is not None and model_tensor.is_floating_point():
            return self.ema_dtype
        return model_tensor.dtype

    def twin(self, model_tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A copy of `model_tensor` where the EMA keeps it (same strides where the layout allows)."""
        dtype = dtype or self.dtype_for(model_tensor)
        return model_tensor.detach().to(device=self.device_for(model_tensor), dtype=dtype, copy=True)

    def untracked(self, model_tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The EMA module's version of an untracked tensor: the model's own storage if it can be, else a copy."""
        dtype = dtype or self.dtype_for(model_tensor)
        if model_tensor.device == self.device_for(model_tensor) and model_tensor.dtype == dtype:
            return model_tensor.detach()
        return self.twin(model_tensor, dtype)


def copy_of_model(
    model: nn.Module, tracked: dict[str, Tensor], placement: Placement, twins: dict[str, Tensor] | None = None
) -> nn.Module:
    """The EMA's module: a deep copy whose tracked tensors are EMA tensors, created directly where they live.

    Creating them there (through deepcopy's memo) means an offloaded EMA of a large model never
    needs a second copy in GPU memory, not even for a moment. Untracked tensors share the
    model's storage where they can (`Placement.untracked`). Tensors computed in the forward
    and kept as attributes (the deprecated `weight_norm` keeps `weight` so) are detached, as
    deepcopy refuses tensors with autograd history. `twins`: the EMA tensors to use, by name
    (`PostHocEMA`'s views of its shared buffer), instead of new copies.
    """
    tracked_names = {id(tensor): name for name, tensor in tracked.items()}
    memo: dict[int, object] = {}
    with torch.no_grad():
        for _, tensor in tensor_slots(model).values():
            name = tracked_names.get(id(tensor))
            if name is None:
                twin = placement.untracked(tensor)
            else:
                twin = twins[name] if twins is not None else placement.twin(tensor)
            memo[id(tensor)] = nn.Parameter(twin, requires_grad=False) if isinstance(tensor, nn.Parameter) else twin
        for submodule in model.modules():
            for value in vars(submodule).values():
                if isinstance(value, Tensor) and id(value) not in memo and value.grad_fn is not None:
                    memo[id(value)] = value.detach()
    ema_module = copy.deepcopy(model, memo)
    for parameter in ema_module.parameters():
        parameter.grad = None
        parameter.requires_grad_(False)
    return ema_module.eval()


# ---- the binding ---------------------------------------------------------------------------------------


def check_tracked_present(names: list[str], model_slots: dict[str, tuple[Slot, Tensor]]) -> None:
    """A RuntimeError if the model lost tensors that the EMA averages (its structure changed)."""
    missing = [name for name in names if name not in model_slots]
    if missing:
        raise RuntimeError(
            f"The model no longer has the tensors {missing} that this EMA averages: its structure changed. "
            "Build a new ModelEMA for the new model (or load its state into one)."
        )


def _layout(tensor: Tensor) -> tuple:
    return tensor.device, tensor.dtype, tuple(tensor.shape), tensor.stride()


def _signature(tensor: Tensor) -> tuple:
    """What a step depends on: the storage address, device, dtype, shape and strides."""
    tensor = local_part(tensor)
    return tensor.data_ptr(), tensor.device, tensor.dtype, tuple(tensor.shape), tensor.stride()


class Binding:
    """Tracked tensors of `model` paired by name with the EMA's (in `ema_module`, or `shards` for a sharded model)."""

    def __init__(
        self,
        model: nn.Module,
        ema_module: nn.Module | None,
        shards: dict[str, Tensor],
        tracked_names: list[str],
        volatile: frozenset[str] = frozenset(),
    ) -> None:
        self.model, self.ema_module = model, ema_module
        model_slots = tensor_slots(model)
        check_tracked_present(tracked_names, model_slots)
        self.names = list(tracked_names)
        self.slots = [model_slots[name][0] for name in self.names]
        self.model_tensors = [model_slots[name][1] for name in self.names]  # DTensors stay DTensors here
        self.model_locals = [local_part(tensor) for tensor in self.model_tensors]  # what the steps read
        self.is_parameter = [slot.is_parameter for slot in self.slots]
        # Tensors that the model replaces all the time (`self.avg = ...` in forward): read through their
        # slots at every update (`_steps.SlotStep`), so their replacement needs no new binding.
        self.volatile = volatile
        if ema_module is None:
            self.ema_tensors = [shards[name] for name in self.names]
            self.untracked: list[Slot] = []
        else:
            ema_modules = dict(ema_module.named_modules(remove_duplicate=False))
            held = [slot.get(ema_module, ema_modules) for slot in self.slots]
            self.ema_tensors = [tensor for tensor in held if tensor is not None]
            if len(self.ema_tensors) != len(held):
                raise RuntimeError("fastema internal error: the EMA's module lost tensors that it averages")
            tracked = set(self.names)
            self.untracked = [slot for name, (slot, _) in model_slots.items() if name not in tracked]
        self.record()

    def slot_of(self, name: str) -> tuple[Slot, nn.Module, int]:
        """(slot, owner module, index) of a tracked tensor, for a step that reads it through its slot."""
        index = self.names.index(name)
        slot = self.slots[index]
        return slot, slot.owner(self.model), index

    def objects(self) -> dict[str, Tensor]:
        """The model's tensor objects by name, tracked and untracked (to see which ones get replaced)."""
        modules = dict(self.model.named_modules(remove_duplicate=False))
        found = {slot.name: slot.get(self.model, modules) for slot in (*self.slots, *self.untracked)}
        return {name: tensor for name, tensor in found.items() if tensor is not None}

    def record(self) -> None:
        """Remember where every tensor is now (after packing, which moves them)."""
        self.signatures = self._signatures()
        self.untracked_signatures = self._untracked_signatures()
        self.recorded_objects = self.objects()
        # (dict holding it, key, tensor, layout) of each steady tracked tensor, for `held_as_recorded`.
        self.held = []
        self.record_links()
        if self.ema_module is not None:
            for slot, tensor in zip(self.slots, self.model_tensors):
                if slot.name not in self.volatile:
                    owner = slot.owner(self.model)
                    holder = owner._parameters if slot.is_parameter else owner._buffers
                    self.held.append((holder, slot.key, tensor, _layout(tensor)))

    def record_links(self) -> None:
        """(children dict, name, child) of every module: a submodule replaced by another may hold other tensors."""
        # By id: dynamo guards a module's identity only through `id()` (module objects themselves by type). The
        # child is kept too: alive, its id cannot be reused by a module built where a freed one was.
        self.links = [
            (parent._modules, name, id(child), child)
            for parent in self.model.modules()
            for name, child in parent._modules.items()
        ]

    def held_as_recorded(self) -> bool:
        """Whether every tracked tensor is still the object its module holds, on its device, in its dtype and layout.

        `current()` without storage addresses (which dynamo cannot trace): inside `torch.compile` this check
        becomes dynamo's guards, evaluated at each call of the graph at no Python cost.
        """
        return all(id(children.get(name)) == known for children, name, known, _ in self.links) and all(
            holder.get(key) is tensor and _layout(tensor) == layout for holder, key, tensor, layout in self.held
        )

    def _untracked_signatures(self) -> list:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        tensors = [slot.get(self.model, modules) for slot in self.untracked]
        return [None if tensor is None else (id(tensor), tensor.data_ptr()) for tensor in tensors]

    def untracked_current(self) -> bool:
        """Whether the model's untracked tensors are where the EMA's module shares or copied them from.

        `p.data = ...` on a frozen parameter moves no counter; reading `ema.module` checks this.
        """
        return self._untracked_signatures() == self.untracked_signatures

    def _watched(self) -> Iterator[Tensor | None]:
        """Every tensor whose place or layout the binding depends on, in a fixed order."""
        model_modules = dict(self.model.named_modules(remove_duplicate=False))
        steady = [slot for slot in self.slots if slot.name not in self.volatile]
        yield from (slot.get(self.model, model_modules) for slot in steady)
        if self.ema_module is not None:
            ema_modules = dict(self.ema_module.named_modules(remove_duplicate=False))
            yield from (slot.get(self.ema_module, ema_modules) for slot in self.slots)
            for slot in self.untracked:
                if slot.name not in self.volatile:
                    yield slot.get(self.model, model_modules)
                    yield slot.get(self.ema_module, ema_modules)

    def _signatures(self) -> list:
        return [None if tensor is None else (id(tensor), _signature(tensor)) for tensor in self._watched()]

    def current(self) -> bool:
        """Whether every tensor is still the same object, in the same place, with the same layout (one pass)."""
        # Ids of the tracked tensors cannot be reused: the binding holds them. An untracked one could be
        # freed and its id reused, but then with another storage address too (unless the allocator hands
        # the same address back, which at worst leaves an untracked copy in the EMA's module stale).
        return self._signatures() == self.signatures

    def pairs(self) -> Iterator[tuple[str, Tensor, Tensor, bool]]:
        """(name, model tensor as the steps read it, EMA tensor, is a parameter)."""
        return zip(self.names, self.model_locals, self.ema_tensors, self.is_parameter)
