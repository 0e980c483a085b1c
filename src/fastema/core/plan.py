"""The update plan: (EMA tensor, model tensor) pairs turned once into a flat list of steps.

Pairs are grouped by the devices and dtypes of both sides, and each group gets one step from
`steps`: fused (`_foreach_lerp_`) or a loop for one device and dtype, staged for a wider EMA
dtype, offloaded for another device. With `flatten_model=True` the planner first packs what
it can into one buffer per group (`PackedStep`), so an update is a single `lerp_`:

- tensors that already tile a block of one storage (a contiguous-parameters buffer of the
  user's, or the buffer another EMA packed) are read there, in place: nothing moves;
- tensors that are the only users of their storage are moved into a new buffer with
  `p.data = view`, which keeps each tensor object, its gradient-accumulator node (so DDP's and
  other hooks on it keep firing), its shape and strides;
- anything else (storage shared with views the user holds, overlapping tensors, tensors with
  gaps) is left where it is and stepped unpacked.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .compiled import CompiledStep, compilable, compile_by_default
from .native import NativeStep, native_available, native_kind
from .offload import OffloadedStep
from .steps import (
    KernelStep,
    PackedStep,
    SlotStep,
    StagedStep,
    Step,
    Weight,
    copy_fused,
    copy_loop,
    fused_step_supported,
    is_averaged,
    is_dense,
    lerp_fused,
    lerp_loop,
    loop_step_supported,
    storage_use_count,
)
from .tracking import Slot


class Plan:
    """The steps of one update, in order, and what the engine asks of them together."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self._watching = [step for step in steps if type(step).stale is not Step.stale]
        self._waiting = [step for step in steps if type(step).wait is not Step.wait]

    def step(self, weight: Weight) -> None:
        for step in self.steps:
            step.step(weight)

    def stale(self) -> bool:
        return any(step.stale() for step in self._watching)

    def slots_stale(self) -> bool:
        """Whether a tensor read through its slot changed kind (the binding does not watch those)."""
        return any(step.stale() for step in self.steps if isinstance(step, SlotStep))

    def rebaseline(self) -> None:
        for step in self.steps:
            if isinstance(step, PackedStep):
                step.rebaseline()

    def wait(self) -> None:
        for step in self._waiting:
            step.wait()

    def before_model_write(self) -> None:
        for step in self._waiting:
            step.before_model_write()

    def close(self) -> None:
        for step in self.steps:
            step.close()

    def all_steps(self) -> list[Step]:
        """Every step, also those inside packed, offloaded and compiled steps."""
        found, pending = [], list(self.steps)
        while pending:
            step = pending.pop(0)
            found.append(step)
            pending += getattr(step, "inner", []) + getattr(step, "eager", [])
        return found

    @property
    def offloaded(self) -> bool:
        """Whether a step runs on another device in a background thread (`OffloadedStep`), wherever it is."""
        return any(isinstance(step, OffloadedStep) for step in self.all_steps())

    @property
    def packed(self) -> list[PackedStep]:
        return [step for step in self.steps if isinstance(step, PackedStep)]

    @property
    def compiled(self) -> list[CompiledStep]:
        """The compiled steps, also those inside packed and offloaded steps."""
        return [step for step in self.all_steps() if isinstance(step, CompiledStep)]

    @property
    def native(self) -> list[NativeStep]:
        """The native steps, also those inside packed steps."""
        return [step for step in self.all_steps() if isinstance(step, NativeStep)]

    def compile_seconds(self) -> float:
        """Seconds spent compiling (or building the native kernel for) this plan's steps so far, cache hits included."""
        steps: list[CompiledStep | NativeStep] = [*self.compiled, *self.native]
        return sum(step.compile_seconds or 0.0 for step in steps)


def plan_update(
    ema_tensors: Sequence[Tensor],
    model_tensors: Sequence[Tensor],
    is_parameter: Sequence[bool],
    *,
    foreach: bool | None,
    flatten: bool,
    compile: bool | None = False,
    all_model_tensors: Iterable[Tensor] = (),
    volatile: Sequence[tuple[Slot, nn.Module, int]] = (),
) -> Plan:
    """The plan for these pairs; `flatten` packs them first (`all_model_tensors`: every tensor of the model).

    `compile`: each group's averaged pairs get one compiled step (`CompiledStep`) over their eager step
    (None: the native CPU kernel where it takes the group, else where `compile_by_default` says it pays).

    `volatile`: (slot, owner, index) of tensors the model keeps replacing, read through their slots.
    """
    steps: list[Step] = []
    if volatile:
        steps.append(
            SlotStep(
                [ema_tensors[index] for _, _, index in volatile],
                [(owner, slot.key, slot.is_parameter) for slot, owner, _ in volatile],
            )
        )
    skipped = {index for _, _, index in volatile}
    rest: Sequence[int] = [index for index in range(len(model_tensors)) if index not in skipped]
    if flatten:
        packs, rest = _pack(ema_tensors, model_tensors, is_parameter, all_model_tensors, rest)
        for ema_flat, model_flat, kind in packs:
            inner = kernel_steps([ema_flat], [model_flat], [kind], foreach, compile)
            steps.append(PackedStep(ema_flat, model_flat, inner))
    steps += kernel_steps(
        [ema_tensors[index] for index in rest],
        [model_tensors[index] for index in rest],
        [is_parameter[index] for index in rest],
        foreach,
        compile,
    )
    return Plan(steps)


def kernel_steps(
    ema_tensors: Sequence[Tensor],
    model_tensors: Sequence[Tensor],
    is_parameter: Sequence[bool],
    foreach: bool | None,
    compile: bool | None = False,
) -> list[Step]:
    """Group pairs by device and dtype and give each group its step.

    Same device and dtype: `_foreach_lerp_` (or a loop). Same device, a wider EMA dtype:
    `StagedStep`. Another device: `OffloadedStep` (a snapshot of the model on the EMA's device,
    then the same choice there). `foreach=None` picks the fused kernels wherever they run,
    `True` insists on them (raising where they cannot run), `False` uses per-tensor loops.
    `compile` wraps the step of each group of averaged pairs in a `CompiledStep`; None wraps CPU float32
    EMAs of float32 or bfloat16 tensors in a `NativeStep` (unless `foreach` names PyTorch's kernels), and
    the other groups where `compile_by_default` says a compiled step pays.
    """
    steps: list[Step] = []
    if compile is None and foreach is None:
        steps, rest = native_steps(ema_tensors, model_tensors, is_parameter, foreach)
        ema_tensors, model_tensors = [ema_tensors[i] for i in rest], [model_tensors[i] for i in rest]
        is_parameter = [is_parameter[i] for i in rest]
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for index, (ema_tensor, model_tensor) in enumerate(zip(ema_tensors, model_tensors, strict=True)):
        buckets[(ema_tensor.device, ema_tensor.dtype, model_tensor.device, model_tensor.dtype)].append(index)
    for (ema_device, ema_dtype, model_device, model_dtype), indices in buckets.items():
        ema_list = [ema_tensors[index] for index in indices]
        model_list = [model_tensors[index] for index in indices]
        if ema_device != model_device:
            steps.append(
                OffloadedStep(
                    ema_list,
                    model_list,
                    [is_parameter[index] for index in indices],
                    # Compiled there only when asked for: its first step would compile in the background thread.
                    lambda ema, mirror: kernel_steps(ema, mirror, [True] * len(ema), foreach, compile or False),
                )
            )
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
        step: Step
        if ema_dtype != model_dtype and averaged and is_averaged(model_list[0]):
            step = StagedStep(ema_list, model_list, use_fused)
        elif ema_dtype != model_dtype:
            step = KernelStep(copy_loop, ema_list, model_list)  # copy_ converts; a count is never averaged
        elif averaged:
            step = KernelStep(lerp_fused if use_fused else lerp_loop, ema_list, model_list)
        else:
            step = KernelStep(copy_fused if use_fused else copy_loop, ema_list, model_list)
        wanted = compile_by_default(ema_device, ema_dtype, model_dtype) if compile is None else compile
        if wanted and all(compilable(ema, model) for ema, model in zip(ema_list, model_list)):
            step = CompiledStep(ema_list, model_list, [step], warn=compile is True)
        steps.append(step)
    return steps


def native_steps(
    ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], is_parameter: Sequence[bool], foreach: bool | None
) -> tuple[list[Step], list[int]]:
    """A `NativeStep` per (kind, model dtype) for the pairs the native kernel takes, and the indices of the others."""
    taken: dict[tuple[str, torch.dtype], list[int]] = defaultdict(list)
    if native_available():
        for index, (ema_tensor, model_tensor) in enumerate(zip(ema_tensors, model_tensors, strict=True)):
            kind = native_kind(ema_tensor, model_tensor)
            if kind is not None:
                taken[(kind, model_tensor.dtype)].append(index)
    steps: list[Step] = []
    for (kind, _), indices in taken.items():
        ema_list, model_list = [ema_tensors[i] for i in indices], [model_tensors[i] for i in indices]
        eager = kernel_steps(ema_list, model_list, [is_parameter[i] for i in indices], foreach, compile=False)
        steps.append(NativeStep(ema_list, model_list, eager, copy=kind == "copy"))
    used = {index for indices in taken.values() for index in indices}
    return steps, [index for index in range(len(ema_tensors)) if index not in used]


# ---- packing -------------------------------------------------------------------------------------------


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
        for (_, end, first_id), (start, _, second_id) in itertools.pairwise(spans):
            if start < end:
                overlapping.update((first_id, second_id))
    return overlapping


def _adjacent_runs(tensors: list[tuple[int, Tensor]]) -> list[list[tuple[int, Tensor]]]:
    """Tensors of one storage, split into runs that tile consecutive blocks with no gap between them."""
    runs: list[list[tuple[int, Tensor]]] = []
    end = None
    for index, tensor in sorted(tensors, key=lambda pair: pair[1].storage_offset()):
        if end != tensor.storage_offset():
            runs.append([])
        runs[-1].append((index, tensor))
        end = tensor.storage_offset() + tensor.numel()
    return runs


def _pack(
    ema_tensors: Sequence[Tensor],
    model_tensors: Sequence[Tensor],
    is_parameter: Sequence[bool],
    all_model_tensors: Iterable[Tensor],
    candidates: Sequence[int],
) -> tuple[list[tuple[Tensor, Tensor, bool]], list[int]]:
    """Packed (EMA buffer, model buffer, holds parameters) triples, and the indices left unpacked.

    Packable: a non-empty dense model tensor with a fused step, of the EMA tensor's shape, with
    no memory overlap with another tensor of the model. An EMA on another device or in another
    dtype still packs (the buffers then get the staged or offloaded step); buffers and
    parameters are packed apart when offloaded, as their copies run on different streams.
    """
    overlapping = overlapping_tensors(all_model_tensors)
    buckets: dict[tuple, list[tuple[int, Tensor]]] = defaultdict(list)
    rest: list[int] = []
    for index in candidates:
        ema_tensor, model_tensor = ema_tensors[index], model_tensors[index]
        packable = (
            ema_tensor.shape == model_tensor.shape
            and model_tensor.numel() > 0
            and model_tensor.device.type != "meta"
            and is_dense(model_tensor)
            and id(model_tensor) not in overlapping
            and fused_step_supported(model_tensor.device, model_tensor.dtype)
        )
        if not packable:
            rest.append(index)
            continue
        offloaded = ema_tensor.device != model_tensor.device
        key = (
            model_tensor.device,
            model_tensor.dtype,
            ema_tensor.device,
            ema_tensor.dtype,
            is_parameter[index] if offloaded else None,
        )
        buckets[key].append((index, model_tensor))
    packs: list[tuple[Tensor, Tensor, bool]] = []
    for bucket in buckets.values():
        by_storage: dict[int, list[tuple[int, Tensor]]] = defaultdict(list)
        for index, model_tensor in bucket:
            by_storage[model_tensor.untyped_storage().data_ptr()].append((index, model_tensor))
        own: list[tuple[int, Tensor]] = []  # moved into a new buffer
        runs: list[list[tuple[int, Tensor]]] = []  # read where they are
        for sharing in by_storage.values():
            # Tensors that are the only users of their storage (the count adds the handle made to ask)
            # can move without anyone noticing; a storage with other users (a view, a `.data` alias, the
            # user's own flat buffer, another EMA's packed buffer) stays where it is, and so does one in
            # shared memory (other processes see it: Hogwild) or pinned memory (asynchronous copies).
            first = sharing[0][1]
            storage = first.untyped_storage()
            # Not resizable: memory that torch does not own (numpy arrays, `frombuffer`, shared memory).
            private = storage.resizable() and not (
                first.is_shared() or (first.device.type == "cpu" and first.is_pinned())
            )
            if private and storage_use_count(first) == len(sharing) + 1:
                own += sharing
            else:
                runs += _adjacent_runs(sharing)
        for run in [*runs, own]:
            if len(run) < 2:  # one tensor is one kernel call already: nothing to gain, leave it in place
                rest += [index for index, _ in run]
                continue
            indices = [index for index, _ in run]
            model_flat = _model_buffer(run) if run is not own else _move_into_new_buffer([t for _, t in run])
            ema_flat = _mirror_ema(model_flat, [ema_tensors[index] for index in indices], [t for _, t in run])
            packs.append((ema_flat, model_flat, is_parameter[indices[0]]))
    return packs, sorted(rest)


def _model_buffer(run: list[tuple[int, Tensor]]) -> Tensor:
    """A 1-D view over the block of storage that a run of tensors tiles (nothing is moved)."""
    first = run[0][1]
    total = sum(tensor.numel() for _, tensor in run)
    return first.detach().as_strided((total,), (1,), first.storage_offset())


def _move_into_new_buffer(tensors: list[Tensor]) -> Tensor:
    """Move `tensors` into one new buffer, each keeping its object, shape, strides and autograd node."""
    first = tensors[0]
    flat = torch.empty(sum(tensor.numel() for tensor in tensors), device=first.device, dtype=first.dtype)
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            view = flat.as_strided(tensor.shape, tensor.stride(), offset)
            view.copy_(tensor)
            # `.data =` keeps the tensor's gradient accumulator (Tensor.set_ would make a new one and
            # orphan the hooks DDP registered on the old one) and its own version counter.
            tensor.data = view
            offset += tensor.numel()
    return flat


def _mirror_ema(model_flat: Tensor, ema_tensors: list[Tensor], model_tensors: list[Tensor]) -> Tensor:
    """Move the EMA tensors into one new buffer laid out as `model_flat`: element i of both is the same weight."""
    base = model_flat.storage_offset()
    first = ema_tensors[0]
    ema_flat = torch.empty(model_flat.numel(), device=first.device, dtype=first.dtype)
    with torch.no_grad():
        for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
            view = ema_flat.as_strided(model_tensor.shape, model_tensor.stride(), model_tensor.storage_offset() - base)
            view.copy_(ema_tensor)
            ema_tensor.data = view
    return ema_flat


def pack_model(
    tensors: Sequence[Tensor], offsets: Sequence[int], every_tensor: Iterable[Tensor]
) -> tuple[list[Tensor], list[int]]:
    """The model tensors of one `StackedStep` as one buffer, if they can be: ([buffer], [first offset]).

    They must follow each other in `offsets` order (tensor i's rows right after tensor i-1's) and
    have one dtype. Already consecutive in one storage: that storage is read in place; the only
    users of their storages: moved into a new buffer in that order (as `_pack` moves them);
    otherwise they stay as they are.
    """
    unchanged = (list(tensors), list(offsets))
    overlapping = overlapping_tensors(every_tensor)
    dense = all(
        is_dense(tensor) and tensor.numel() > 0 and id(tensor) not in overlapping and tensor.device.type != "meta"
        for tensor in tensors
    )
    if len(tensors) < 2 or not dense or len({tensor.dtype for tensor in tensors}) > 1:
        return unchanged
    first = tensors[0]
    storages = {tensor.untyped_storage().data_ptr() for tensor in tensors}
    consecutive = len(storages) == 1 and all(
        after.storage_offset() == before.storage_offset() + before.numel()
        for before, after in itertools.pairwise(tensors)
    )
    if consecutive:
        total = sum(tensor.numel() for tensor in tensors)
        return [first.detach().as_strided((total,), (1,), first.storage_offset())], [offsets[0]]
    by_storage: dict[int, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_storage[tensor.untyped_storage().data_ptr()].append(tensor)
    movable = all(
        _private(sharing[0]) and storage_use_count(sharing[0]) == len(sharing) + 1 for sharing in by_storage.values()
    )
    if not movable:
        return unchanged
    return [_move_into_new_buffer(list(tensors))], [offsets[0]]


def _private(tensor: Tensor) -> bool:
    """Whether torch alone owns the tensor's memory: not numpy's or `frombuffer`'s, not shared or pinned."""
    return tensor.untyped_storage().resizable() and not (
        tensor.is_shared() or (tensor.device.type == "cpu" and tensor.is_pinned())
    )
