"""Data-parallel and sharded models: the module to average inside wrappers, and FSDP2's sharded tensors.

Under DDP every rank holds the whole model and its EMA (identical on every rank, since the
weights are). Under FSDP2 (`fully_shard`) parameters are DTensors sharded across ranks: the
EMA of each parameter is kept as the local shard only and updated shard-locally, and the
full EMA exists only when asked for (`ModelEMA.state_dict()`, a collective).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

try:  # public since torch 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch or no distributed build
    try:
        from torch.distributed._tensor import DTensor, distribute_tensor
    except ImportError:
        DTensor = distribute_tensor = None  # type: ignore[assignment, misc]  # checked before each use

try:  # FSDP2's module class: public since torch 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch or no distributed build
    try:
        from torch.distributed._composable.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None  # type: ignore[assignment, misc]  # checked before each use


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP/DataParallel and `torch.compile` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
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
    parameters again; the next forward all-gathers from them. A no-op for other models.
    """
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2/tensor-parallel parameter): each rank holds a part."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """`tensor` itself, or for a DTensor the part this rank holds (a view of its storage)."""
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():
        return cast(DTensor, tensor).to_local().detach()


def gather_full(local: Tensor, like: Tensor) -> Tensor:
    """The full tensor whose parts, laid out as `like` (a DTensor), are every rank's `local` (a collective)."""
    layout = cast(DTensor, like)
    parts = DTensor.from_local(local, layout.device_mesh, layout.placements, shape=like.shape, stride=like.stride())
    return parts.full_tensor()


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of `full`, laid out as `like` (a DTensor); every rank passes the same `full`."""
    layout = cast(DTensor, like)
    return distribute_tensor(full.to(like.device), layout.device_mesh, layout.placements).to_local()


def rank() -> int:
    """This process's rank, 0 without an initialised process group."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialised else 0
