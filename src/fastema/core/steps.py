"""Every EMA step behind one protocol: fused, loop, staged (mixed dtypes), stacked and packed (offloaded: `offload`).

A step updates a fixed set of EMA tensors from the model's: floating tensors move toward the
model by `weight` (`ema.lerp_(model, weight)` is `decay * ema + (1 - decay) * model` with
`weight = 1 - decay`), integer and bool tensors are copied. `_plan` chooses the steps once;
each implements:

- `step(weight)`: one update; it never synchronises with the host and allocates nothing that
  grows with the model;
- `stale()`: whether views it computed once no longer see the model's tensors (cheap);
- `wait()`: block until an update running in the background has finished;
- `before_model_write()`: make the model's next writer wait for reads still in flight;
- `close()`: release threads, streams and hooks.

Steps read the model's tensors through the tensor objects themselves wherever they can, so a
tensor whose data is replaced in place (`p.data = ...`, `torch.utils.swap_tensors`) keeps
being read correctly; where a step computed views once (packed buffers, chunks of large
tensors), `stale()` tells.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# The lerp weight (1 - decay): a Python float eagerly, a 0-d float64 tensor inside `torch.compile` or a CUDA graph.
Weight = float | Tensor
Kernel = Callable[[list[Tensor], list[Tensor], Weight], None]


def capturing() -> bool:
    """Whether this call is being traced by `torch.compile` or captured into a CUDA graph."""
    if torch.compiler.is_compiling():
        return True
    # Nothing can be captured before CUDA is initialised (a flag: cheaper than asking for devices).
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def weight_for(weight: Weight, tensor: Tensor) -> Weight:
    """`weight` as `lerp_` takes it for `tensor`: a float as it is, a tensor in the tensor's dtype and on its device."""
    if isinstance(weight, Tensor):
        return weight.to(device=tensor.device, dtype=tensor.dtype)
    return weight


NARROW = (torch.bfloat16, torch.float16)


def lerp_pairs(ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], weight: Tensor) -> None:
    """The single pass, eagerly (the body traced into a caller's graph): `ema.lerp_(model, weight)`, converting.

    16-bit EMAs are computed in float32, as ATen's `lerp_` computes them, then rounded once.
    """
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
        model_tensor = model_tensor.to(ema_tensor.device)
        if ema_tensor.dtype in NARROW:
            wide = torch.lerp(ema_tensor.float(), model_tensor.float(), weight.to(ema_tensor.device, torch.float32))
            ema_tensor.copy_(wide)
        else:
            ema_tensor.lerp_(model_tensor.to(ema_tensor.dtype), weight_for(weight, ema_tensor))


def lerp_wide(ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], weight: Tensor) -> None:
    """16-bit EMAs with a tensor weight: float32 math, as `lerp_` does with a float weight (a 16-bit weight tensor
    would round it), through two float32 buffers of at most a staging batch, allocated per call: never model-sized.
    """
    if torch.compiler.is_compiling():  # inductor fuses the round trip: no buffers
        lerp_pairs(ema_tensors, model_tensors, weight)
        return
    device = ema_tensors[0].device
    pairs = [
        (ema, model, is_dense(ema) and ema.stride() == model.stride() and model.device == device)
        for ema, model in zip(ema_tensors, model_tensors)
    ]
    capacity = STAGING_ELEMENTS.get(device.type, DEFAULT_STAGING_ELEMENTS)
    size = max(1, min(capacity, max((ema.numel() for ema, _, dense in pairs if dense), default=0)))
    wide_ema, wide_model = (torch.empty(size, dtype=torch.float32, device=device) for _ in range(2))
    wide_weight = weight.to(device, torch.float32)
    for ema, model, dense in pairs:
        if not dense:  # strided or on another device: this one tensor's temporaries
            lerp_pairs([ema], [model], weight)
            continue
        ema_flat, model_flat = memory_order_view(ema), memory_order_view(model)
        for begin in range(0, ema_flat.numel(), size):
            end = min(begin + size, ema_flat.numel())
            staged_ema, staged_model = wide_ema[: end - begin], wide_model[: end - begin]
            staged_ema.copy_(ema_flat[begin:end])
            staged_model.copy_(model_flat[begin:end])
            staged_ema.lerp_(staged_model, wide_weight)
            ema_flat[begin:end].copy_(staged_ema)


def traced_step(ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], weight: Tensor) -> None:
    """An update traced into the caller's `torch.compile` graph, reading the tensor objects themselves.

    Never the plan's packed buffers or chunk views, made in advance: after `p.data = ...` with the same
    layout dynamo's guards still pass, and the graph must read the new data.
    """
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
        if is_averaged(ema_tensor) and is_averaged(model_tensor):
            lerp_pairs([ema_tensor], [model_tensor], weight)
        else:  # as the eager plan: a count is never averaged
            ema_tensor.copy_(model_tensor)


def lerp_fused(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: Weight) -> None:
    """One multi-tensor launch per chunk of tensors (same device and dtype on both sides)."""
    if isinstance(weight, Tensor) and ema_tensors[0].dtype in NARROW:
        lerp_wide(ema_tensors, model_tensors, weight)  # a tensor weight in 16 bits would be rounded
    elif isinstance(weight, Tensor):  # the Scalar overload would read a tensor on the host (a sync)
        weights = [weight.to(device=ema_tensors[0].device, dtype=ema_tensors[0].dtype)] * len(ema_tensors)
        torch._foreach_lerp_(ema_tensors, model_tensors, weights)
    else:
        torch._foreach_lerp_(ema_tensors, model_tensors, weight)


def lerp_loop(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: Weight) -> None:
    """One `lerp_` per tensor: the reference implementation of `lerp_fused`."""
    if isinstance(weight, Tensor) and ema_tensors and ema_tensors[0].dtype in NARROW:
        lerp_wide(ema_tensors, model_tensors, weight)  # as in `lerp_fused`
        return
    if ema_tensors:
        weight = weight_for(weight, ema_tensors[0])
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
        ema_tensor.lerp_(model_tensor, weight)


def copy_fused(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: Weight) -> None:
    """Copy (and convert): integer/bool buffers such as `num_batches_tracked` are never averaged."""
    torch._foreach_copy_(ema_tensors, model_tensors)


def copy_loop(ema_tensors: list[Tensor], model_tensors: list[Tensor], weight: Weight) -> None:
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


def memory_order_view(tensor: Tensor) -> Tensor:
    """A dense tensor's elements as one 1-D view, in the order they lie in memory."""
    return tensor.detach().as_strided((tensor.numel(),), (1,), tensor.storage_offset())


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


def storage_use_count(tensor: Tensor) -> int:
    """How many tensors (and storage handles) share `tensor`'s storage."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class Step:
    """The step protocol; `step` is the one method every step must implement."""

    def step(self, weight: Weight) -> None:
        raise NotImplementedError

    def stale(self) -> bool:
        return False

    def wait(self) -> None:
        pass

    def before_model_write(self) -> None:
        pass

    def close(self) -> None:
        pass


class KernelStep(Step):
    """Tensors on one device in one dtype on both sides, updated by one kernel: fused (`_foreach_*`) or a loop."""

    def __init__(self, kernel: Kernel, ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor]) -> None:
        self.kernel = kernel
        self.ema_tensors = list(ema_tensors)
        self.model_tensors = list(model_tensors)

    def step(self, weight: Weight) -> None:
        self.kernel(self.ema_tensors, self.model_tensors, weight)

    def __repr__(self) -> str:
        return f"KernelStep({self.kernel.__name__}, {len(self.ema_tensors)} tensors)"


class SlotStep(Step):
    """Tensors the model keeps replacing (`self.avg = ...` in forward), read through the slots that hold them.

    `step()` fetches the object each slot holds at that moment (one dict lookup each), so it
    averages the tensor of the latest forward whatever else happened since; `stale()` reports a
    change of shape, dtype or device (a new plan is then needed), and `step()` refuses one.
    """

    def __init__(self, ema_tensors: Sequence[Tensor], slots: Sequence[tuple[torch.nn.Module, str, bool]]) -> None:
        self.ema_tensors = list(ema_tensors)
        self.holders = [owner._parameters if is_parameter else owner._buffers for owner, _, is_parameter in slots]
        self.keys = [key for _, key, _ in slots]
        self.kinds = []
        for holder, key in zip(self.holders, self.keys):
            tensor = holder[key]
            assert tensor is not None  # the binding found it there a moment ago
            self.kinds.append((tensor.shape, tensor.dtype, tensor.device))
        # A count is never averaged, whatever the EMA's dtype; a model tensor of another dtype is refused (`kinds`).
        self.averaged = [
            is_averaged(ema) and (kind[1].is_floating_point or kind[1].is_complex)
            for ema, kind in zip(self.ema_tensors, self.kinds)
        ]

    def _current(self) -> list[Tensor] | None:
        """The tensors the slots hold now, or None if one is gone or has another shape, dtype or device."""
        current = []
        for holder, key, kind in zip(self.holders, self.keys, self.kinds):
            tensor = holder.get(key)
            if tensor is None or (tensor.shape, tensor.dtype, tensor.device) != kind:
                return None
            current.append(tensor)
        return current

    def stale(self) -> bool:
        return self._current() is None

    def step(self, weight: Weight) -> None:
        current = self._current()
        if current is None:
            raise RuntimeError("a tensor the model replaces in its forward changed shape, dtype or device")
        for ema_tensor, model_tensor, averaged in zip(self.ema_tensors, current, self.averaged):
            if model_tensor.dtype != ema_tensor.dtype or model_tensor.device != ema_tensor.device:
                model_tensor = model_tensor.to(ema_tensor.device, ema_tensor.dtype)  # a few small tensors
            if averaged and isinstance(weight, Tensor):
                lerp_pairs([ema_tensor], [model_tensor], weight)  # a 16-bit EMA: the weight kept in float32
            elif averaged:
                ema_tensor.lerp_(model_tensor, weight)
            else:
                ema_tensor.copy_(model_tensor)


# Elements per staging buffer: 4 MiB of float32 stays in a CPU core's L2/L3; a GPU gets 16 MiB (its L2).
STAGING_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_STAGING_ELEMENTS = 1 << 22


class StagedStep(Step):
    """An EMA kept in a wider floating dtype than the model (a float32 EMA of a bfloat16 model), on one device.

    `lerp_` needs one dtype on both sides, and converting the whole model every step would
    allocate a model-sized tensor. A staging buffer in the EMA's dtype, allocated once, takes
    the model's values a batch at a time: one converting `_foreach_copy_` into it, then one
    `_foreach_lerp_` into the EMA. Tensors that fit the buffer are read through their own
    objects; larger ones are split into chunks once (views whose source `stale()` watches).
    Tensors with gaps in their memory (a strided view) are converted one at a time (rare).
    """

    def __init__(self, ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], fused: bool) -> None:
        device, dtype = ema_tensors[0].device, ema_tensors[0].dtype
        self.copy: Kernel = copy_fused if fused else copy_loop
        self.lerp: Kernel = lerp_fused if fused else lerp_loop
        capacity = STAGING_ELEMENTS.get(device.type, DEFAULT_STAGING_ELEMENTS)
        # Pieces: (EMA, model, shape, strides) to stage together; whole tensors, or 1-D chunks of large ones.
        pieces: list[tuple[Tensor, Tensor, tuple[int, ...], tuple[int, ...]]] = []
        self.chunked: list[tuple[Tensor, int]] = []  # (model tensor, data_ptr) behind precomputed chunks
        self.unstaged: list[tuple[Tensor, Tensor]] = []
        for ema_tensor, model_tensor in zip(ema_tensors, model_tensors, strict=True):
            if not (is_dense(model_tensor) and is_dense(ema_tensor)) or model_tensor.numel() == 0:
                self.unstaged.append((ema_tensor, model_tensor))
            elif model_tensor.numel() <= capacity:
                pieces.append((ema_tensor, model_tensor, tuple(model_tensor.shape), model_tensor.stride()))
            elif ema_tensor.stride() != model_tensor.stride():
                self.unstaged.append((ema_tensor, model_tensor))
            else:
                ema_flat, model_flat = memory_order_view(ema_tensor), memory_order_view(model_tensor)
                self.chunked.append((model_tensor, model_tensor.data_ptr()))
                for begin in range(0, model_flat.numel(), capacity):
                    ema_chunk, model_chunk = ema_flat[begin : begin + capacity], model_flat[begin : begin + capacity]
                    pieces.append((ema_chunk, model_chunk, (ema_chunk.numel(),), (1,)))
        total = sum(ema_piece.numel() for ema_piece, *_ in pieces)
        self.staging = torch.empty(min(total, capacity), device=device, dtype=dtype)
        # Batches: consecutive pieces that fit the staging buffer together (one copy + one lerp launch each).
        self.batches: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []
        used = capacity
        for ema_piece, model_piece, shape, stride in pieces:
            if used + ema_piece.numel() > capacity:
                self.batches.append(([], [], []))
                used = 0
            ema_batch, model_batch, staging_batch = self.batches[-1]
            ema_batch.append(ema_piece)
            model_batch.append(model_piece)
            # The staging view has the model's strides, so the conversion copy reads the model in memory order.
            staging_batch.append(self.staging.as_strided(shape, stride, used))
            used += ema_piece.numel()

    def step(self, weight: Weight) -> None:
        for ema_batch, model_batch, staging_batch in self.batches:
            self.copy(staging_batch, model_batch, weight)  # converts to the EMA's dtype
            self.lerp(ema_batch, staging_batch, weight)
        for ema_tensor, model_tensor in self.unstaged:
            if isinstance(weight, Tensor):
                lerp_pairs([ema_tensor], [model_tensor], weight)
            else:  # allocates one tensor, never the model
                ema_tensor.lerp_(model_tensor.to(ema_tensor.dtype), weight)

    def stale(self) -> bool:
        return any(model_tensor.data_ptr() != address for model_tensor, address in self.chunked)


def layout_strides(tensor: Tensor) -> tuple[int, ...]:
    """The strides of `tensor` if it is dense (any dimension order), else those of a contiguous tensor."""
    return tuple(tensor.stride()) if is_dense(tensor) else torch.empty(tensor.shape, device="meta").stride()


class StackedStep(Step):
    """K EMAs of the same tensors in one buffer of (K, elements), all updated in one pass over the model.

    The model's values of a batch of elements go once through a staging buffer in the EMA's dtype
    (as in `StagedStep`: small enough to stay in cache, a conversion for a narrower model), and
    each of the K EMAs then takes its `lerp_` from there, with its own weight (`set_weights`,
    before each step): the model is read once from memory whatever K. Tensor i occupies columns
    `offsets[i]` onward of every row, in its memory order (`layout_strides`).
    """

    def __init__(
        self,
        stack: Tensor,
        model_tensors: Sequence[Tensor],
        offsets: Sequence[int],
        fused: bool,
        watch_storage: bool = False,  # model_tensors are packed buffers: watch their storages' use counts
    ) -> None:
        device, dtype = stack.device, stack.dtype
        self.stack = stack
        # As in `PackedStep`: a tensor leaving a packed buffer (`p.data = ...`) drops its storage's use count.
        self._watched = [tensor.untyped_storage()._cdata for tensor in model_tensors] if watch_storage else []
        self.baseline = self.use_counts()
        self.weights = [0.0] * stack.shape[0]
        self.copy: Kernel = copy_fused if fused else copy_loop
        capacity = STAGING_ELEMENTS.get(device.type, DEFAULT_STAGING_ELEMENTS)
        # Pieces: (first row, model piece, its shape and strides in the staging buffer).
        pieces: list[tuple[int, Tensor, tuple[int, ...], tuple[int, ...]]] = []
        self.chunked: list[tuple[Tensor, int]] = []  # (model tensor, data_ptr) behind precomputed chunks
        for model_tensor, offset in zip(model_tensors, offsets, strict=True):
            if model_tensor.numel() <= capacity or not is_dense(model_tensor):
                pieces.append((offset, model_tensor, tuple(model_tensor.shape), layout_strides(model_tensor)))
                continue
            model_flat = memory_order_view(model_tensor)
            self.chunked.append((model_tensor, model_tensor.data_ptr()))
            for begin in range(0, model_flat.numel(), capacity):
                chunk = model_flat[begin : begin + capacity]
                pieces.append((offset + begin, chunk, (chunk.numel(),), (1,)))
        self.staging = torch.empty(min(sum(p[1].numel() for p in pieces), capacity), device=device, dtype=dtype)
        # Batches: consecutive pieces that fit the staging buffer together. The pieces' columns follow
        # each other (the stack is laid out in this order), so a batch's columns are one block per row.
        if any(after[0] != before[0] + before[1].numel() for before, after in itertools.pairwise(pieces)):
            raise ValueError("fastema internal error: StackedStep pieces must occupy consecutive columns")
        self.batches: list[tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]] = []
        batch: list[tuple[int, Tensor, tuple[int, ...], tuple[int, ...]]] = []
        for piece in [*pieces, None]:
            filled = sum(model_piece.numel() for _, model_piece, _, _ in batch)
            if batch and (piece is None or filled + piece[1].numel() > capacity):
                self._add_batch(batch, filled)
                batch = []
            if piece is not None:
                batch.append(piece)

    def _add_batch(self, batch: list[tuple[int, Tensor, tuple[int, ...], tuple[int, ...]]], filled: int) -> None:
        used, staging_views = 0, []
        for _, model_piece, shape, stride in batch:
            staging_views.append(self.staging.as_strided(shape, stride, used))
            used += model_piece.numel()
        columns = list(self.stack[:, batch[0][0] : batch[0][0] + filled].unbind(0))  # one block per EMA
        self.batches.append((columns, [piece for _, piece, _, _ in batch], staging_views, self.staging[:filled]))

    def set_weights(self, weights: Sequence[float]) -> None:
        """The K lerp weights (1 - decay) of the next step."""
        self.weights = list(weights)

    def step(self, weight: Weight) -> None:
        """One update of every EMA, with the K weights given to `set_weights` (`weight` is not used)."""
        for blocks, model_pieces, staging_views, staged in self.batches:
            self.copy(staging_views, model_pieces, 0.0)  # converts to the EMA's dtype; stays in cache
            for block, ema_weight in zip(blocks, self.weights):
                block.lerp_(staged, ema_weight)

    def use_counts(self) -> list[int]:
        return [torch._C._storage_Use_Count(storage) for storage in self._watched]

    def rebaseline(self) -> None:
        """Accept today's use counts (after a full check found every tensor where it belongs)."""
        self.baseline = self.use_counts()

    def stale(self) -> bool:
        return self.use_counts() != self.baseline or any(
            model_tensor.data_ptr() != address for model_tensor, address in self.chunked
        )


class PackedStep(Step):
    """A whole (device, dtype) group in one model buffer and one EMA buffer: one `lerp_` (or `copy_`) per update.

    The buffers' storages are watched through their use counts: a tensor that leaves the
    model's buffer (`model.to(...)`, `p.data = ...`) drops the count, which `stale()` sees
    without looking at every tensor. `inner` is the step over the two buffers (fused, or
    staged/offloaded when the EMA has another dtype or device).
    """

    def __init__(self, ema_flat: Tensor, model_flat: Tensor, inner: list[Step]) -> None:
        self.ema_flat, self.model_flat, self.inner = ema_flat, model_flat, inner
        # The storages' handles, looked up once: they live as long as the two buffers held here.
        self._model_storage = model_flat.untyped_storage()._cdata
        self._ema_storage = ema_flat.untyped_storage()._cdata
        self._watching = [step for step in inner if type(step).stale is not Step.stale]
        self.baseline = self.use_counts()

    def use_counts(self) -> tuple[int, int]:
        return torch._C._storage_Use_Count(self._model_storage), torch._C._storage_Use_Count(self._ema_storage)

    def rebaseline(self) -> None:
        """Accept today's use counts (after a full check found every tensor where it belongs)."""
        self.baseline = self.use_counts()

    def step(self, weight: Weight) -> None:
        for step in self.inner:
            step.step(weight)

    def stale(self) -> bool:
        return self.use_counts() != self.baseline or any(step.stale() for step in self._watching)

    def wait(self) -> None:
        for step in self.inner:
            step.wait()

    def before_model_write(self) -> None:
        for step in self.inner:
            step.before_model_write()

    def close(self) -> None:
        for step in self.inner:
            step.close()
