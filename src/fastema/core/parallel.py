"""Data-parallel and sharded models: the module to average inside wrappers, and sharded tensors.

Under DDP (and DeepSpeed ZeRO stages 0-2) every rank holds the whole model and its EMA
(identical on every rank, since the weights are). Under FSDP2 (`fully_shard`) parameters are
DTensors sharded across ranks, and under DeepSpeed ZeRO stage 3 each rank holds a flat
partition of every parameter (`zero`): the EMA of each parameter is kept as the local part
only and updated locally, and the full EMA exists only when asked for
(`ModelEMA.state_dict()`, a collective).
"""

from __future__ import annotations

import inspect
import time
from typing import cast

import torch
from torch import Tensor, nn

from .zero import ZeroLayout, is_deepspeed_engine, is_partitioned, partition, refuse_pipeline, release_gathered

try:  # public since torch 2.4
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - older torch or no distributed build
    try:
        from torch.distributed._tensor import DTensor, Shard, distribute_tensor
    except ImportError:
        DTensor = Shard = distribute_tensor = None  # type: ignore[assignment, misc]  # checked before each use

# `src_data_rank=None` (newer torch): every rank takes its part of its own copy, without a scatter.
_DISTRIBUTE_TAKES_SRC_DATA_RANK = (
    distribute_tensor is not None and "src_data_rank" in inspect.signature(distribute_tensor).parameters
)

try:  # FSDP2's module class: public since torch 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch or no distributed build
    try:
        from torch.distributed._composable.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None  # type: ignore[assignment, misc]  # checked before each use


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP/DataParallel, DeepSpeed engine and `torch.compile` wrappers."""
    while True:
        refuse_pipeline(model)
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or is_deepspeed_engine(model):
            model = cast(nn.Module, model.module)
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def reshard(model: nn.Module) -> None:
    """FSDP2: put every `fully_shard` module's parameters in their sharded state.

    After a forward, the root module's parameters stay unsharded (all-gathered copies, which the
    backward would need next): the module then computes with those, not with the shards. Before
    the shards are read or written (EMA validation, re-reading the model), they must be the
    parameters again; the next forward all-gathers from them. ZeRO-3: the same for its gathered
    parameters (`zero.release_gathered`). A no-op for other models.
    """
    release_gathered(model)
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(tensor: Tensor) -> bool:
    """Whether each rank holds a part of `tensor`: a DTensor (FSDP2/tensor parallel) or a ZeRO-3 parameter."""
    return (DTensor is not None and isinstance(tensor, DTensor)) or is_partitioned(tensor)


def local_part(tensor: Tensor) -> Tensor:
    """`tensor` itself, or for a DTensor or a ZeRO-3 parameter the part this rank holds (a view of its storage)."""
    if is_partitioned(tensor):
        return partition(tensor)
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():
        return cast(DTensor, tensor).to_local().detach()


def layout_of(tensor: Tensor) -> Tensor | ZeroLayout:
    """What `gather_full` and `shard_like` need to know of a sharded tensor: a DTensor itself, or a `ZeroLayout`."""
    return ZeroLayout(tensor) if is_partitioned(tensor) else tensor


def gather_full(local: Tensor, like: Tensor | ZeroLayout) -> Tensor:
    """The full tensor whose parts, laid out as `like` (a DTensor, a `ZeroLayout`), are every rank's `local`.

    A collective: every rank calls it.
    """
    if isinstance(like, ZeroLayout):
        padded = like.padded(local)
        partitions = [torch.empty_like(padded) for _ in range(torch.distributed.get_world_size(like.group))]
        _gather_holding(partitions, padded, like.group)
        return like.assemble(partitions)
    layout = cast(DTensor, like)
    dim = _single_shard_dim(layout)
    if dim is None:  # decided by the layout alone: the same on every rank
        parts = DTensor.from_local(local, layout.device_mesh, layout.placements, shape=like.shape, stride=like.stride())
        return parts.full_tensor()
    # FSDP2's layout: one blocking c10d all-gather into buffers of our own, rather than `full_tensor()`'s functional
    # collective, whose buffers we cannot hold on to (see `_gather_holding`).
    world, size = layout.device_mesh.size(), like.shape[dim]
    chunk = -(-size // world)  # torch.chunk's part size: the last ranks may hold fewer rows, or none
    if like.numel() == 0:  # nothing to send (the same on every rank: no rank waits for another)
        return torch.empty(like.shape, dtype=local.dtype, device=local.device)
    padded = local.new_zeros((*like.shape[:dim], chunk, *like.shape[dim + 1 :]))
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    buffers = [torch.empty_like(padded) for _ in range(world)]
    _gather_holding(buffers, padded, layout.device_mesh.get_group())
    rows = [max(0, min(chunk, size - r * chunk)) for r in range(world)]
    return torch.cat([buffer.narrow(dim, 0, n) for buffer, n in zip(buffers, rows)], dim=dim)


def _gather_holding(
    buffers: list[Tensor], part: Tensor, group: torch.distributed.ProcessGroup, timeout_s: float = 1.0
) -> None:
    """`all_gather(buffers, part)`; on gloo, returning once its worker thread has let go of the tensors.

    A gloo worker thread drops its work object (and its references to the tensors) just after the
    collective completes. Were its reference the last but the Python object's, dropping it would take
    the GIL on that thread, which aborts the process while the interpreter finalizes ("terminate called
    without an active exception", PyTorch's bug, docs/multi-gpu.md). A view of each tensor holds one
    more reference until the worker's is gone, so the last one is always released here.
    """
    tensors = [part, *buffers]
    if torch.distributed.get_backend(group) != "gloo" or not hasattr(part, "_use_count"):
        torch.distributed.all_gather(buffers, part, group=group)
        return
    views = [tensor.view_as(tensor) for tensor in tensors]  # each holds its tensor (`_base`): one reference more
    held = [_references(tensor) for tensor in tensors]
    torch.distributed.all_gather(buffers, part, group=group)
    deadline = time.monotonic() + timeout_s
    while any(_references(t) > n for t, n in zip(tensors, held)) and time.monotonic() < deadline:
        time.sleep(1e-4)
    del views  # the last references but the Python objects', released on this thread


def _references(tensor: Tensor) -> int:
    """How many C++ references `tensor`'s TensorImpl has (its Python object's among them)."""
    return cast(int, tensor._use_count())  # type: ignore[attr-defined]  # private, present in torch 2.x


def _single_shard_dim(layout: DTensor) -> int | None:
    """The sharded dim when `layout` is one `Shard(dim)` on a 1-D mesh whose group ranks follow the mesh, else None."""
    mesh = layout.device_mesh
    if mesh.ndim != 1 or len(layout.placements) != 1 or type(layout.placements[0]) is not Shard:
        return None  # Replicate, _StridedShard (a Shard subclass in older torch), 2-D meshes: full_tensor()
    # all_gather returns the parts in group-rank order; DTensor orders its shards by mesh coordinate.
    if torch.distributed.get_process_group_ranks(mesh.get_group()) != mesh.mesh.flatten().tolist():
        return None
    return layout.placements[0].dim % len(layout.shape)


def shard_like(full: Tensor, like: Tensor | ZeroLayout) -> Tensor:
    """This rank's part of `full`, laid out as `like` (a DTensor, a `ZeroLayout`); every rank passes the same `full`."""
    if isinstance(like, ZeroLayout):
        return like.part_of(full)
    layout = cast(DTensor, like)
    # Every rank holds `full`: each takes its own part, with no scatter from rank 0 (and no collective at all).
    local_only = {"src_data_rank": None} if _DISTRIBUTE_TAKES_SRC_DATA_RANK else {}
    return distribute_tensor(full.to(like.device), layout.device_mesh, layout.placements, **local_only).to_local()


def rank() -> int:
    """This process's rank, 0 without an initialised process group."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialised else 0
