"""DeepSpeed ZeRO seen without importing DeepSpeed: stage-3 partitions, and the engine's applied steps.

Under ZeRO stage 3 a parameter is an empty placeholder outside its module's forward; this rank's
part is `param.ds_tensor`, a flat partition of `ceil(ds_numel / world)` elements over the
parameter's `ds_process_group`, whose last ranks end in padding (or hold padding only). The EMA of
such a parameter is this rank's real elements (`partition`, a view of `ds_tensor` without the
padding), updated in place with no communication, as for an FSDP2 shard; the full tensor exists
only when asked for (`ZeroLayout`, through `parallel.gather_full`: a collective). Stages 0-2 keep
full parameters, which the EMA treats as any model's (as under DDP).

DeepSpeed moves the partitions into flat buffers of its own (`deepspeed.initialize`, offloading
states): `PartitionWatch` compares the address of one partition per distinct storage (flat buffer)
at every update, and after the first update of each binding proves, on a few elements of every
partition, that the EMA read the live partition and moved toward it (never a silent no-op).
Parameters offloaded to NVMe are refused: DeepSpeed swaps them through pooled buffers at every step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_CHECKED_ELEMENTS = 64  # per partition, in the first update's read-back
_WATCHED_STORAGES = 64  # at most, one partition each, compared at every update


def is_partitioned(tensor: object) -> bool:
    """Whether `tensor` is a ZeRO stage-3 parameter (DeepSpeed keeps this rank's part in `ds_tensor`)."""
    return getattr(tensor, "ds_tensor", None) is not None


def _group_rank(param: Any) -> int:
    return torch.distributed.get_rank(group=param.ds_process_group)


def partition(param: Any) -> Tensor:
    """This rank's real elements of a ZeRO-3 parameter: a view of its partition without the padding."""
    flat = param.ds_tensor.detach()
    size = flat.numel()
    start = size * _group_rank(param)
    return flat.narrow(0, 0, max(0, min(size, param.ds_numel - start)))


class ZeroLayout:
    """How the partitions of a ZeRO-3 parameter make its full tensor (what a full state gathers and reshards)."""

    def __init__(self, param: Any) -> None:
        self.param = param
        self.shape = torch.Size(param.ds_shape)
        self.dtype = param.ds_tensor.dtype
        self.device = param.ds_tensor.device
        self.group = param.ds_process_group
        self.partition_size = param.ds_tensor.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def padded(self, local: Tensor) -> Tensor:
        """`local` (this rank's real elements) padded to the partition size, as every rank sends it."""
        padded = local.new_zeros(self.partition_size)
        padded[: local.numel()].copy_(local.reshape(-1))
        return padded

    def assemble(self, partitions: Sequence[Tensor]) -> Tensor:
        """The full tensor from every rank's padded partition, in group-rank order."""
        return torch.cat(list(partitions)).narrow(0, 0, self.shape.numel()).view(self.shape)

    def part_of(self, full: Tensor) -> Tensor:
        """This rank's real elements of `full` (every rank holds it: no communication)."""
        start = self.partition_size * _group_rank(self.param)
        count = max(0, min(self.partition_size, self.shape.numel() - start))
        return full.reshape(-1).narrow(0, min(start, full.numel()), count).to(self.device, copy=True)


def release_gathered(model: nn.Module) -> None:
    """Make every ZeRO-3 parameter's partition the only copy of its values, so the next forward gathers them.

    Gathered parameters (the persistent small ones DeepSpeed keeps whole, and any a forward left behind) are
    partitioned again, and the secondary partitions of hierarchical partitioning (hpZ) are dropped, as
    DeepSpeed itself does after each optimizer step: a swap into the partitions is then what the next forward
    computes with. Local: no communication. A no-op for other models.
    """
    for parameter in model.parameters():
        if not is_partitioned(parameter):
            continue
        param: Any = parameter
        if param.ds_status.name == "AVAILABLE" and not param.ds_active_sub_modules:
            param.partition()
        if getattr(param, "ds_secondary_tensor", None) is not None:
            param.ds_secondary_tensor = None


class PartitionWatch:
    """ZeRO-3 pairs of a binding: whether DeepSpeed moved the partitions, and the first update's read-back.

    `moved()` (every update) compares the address of one partition with the one the plan reads.
    `before_first()`/`after_first(weight)` bracket the first update of the binding: a few elements of
    each EMA partition are copied before it, and after it each must equal its old value moved toward the
    live partition by `weight`, read from a view of the live partition that the update must have read too.
    """

    def __init__(
        self, names: Sequence[str], params: Sequence[Any], read: Sequence[Tensor], ema_tensors: Sequence[Tensor]
    ) -> None:
        self.names, self.params, self.read, self.ema_tensors = list(names), list(params), list(read), list(ema_tensors)
        _refuse_nvme(self.names, self.params)
        storages: dict[int, Any] = {}  # one partition per flat buffer (a handful after deepspeed.initialize)
        for param in self.params:
            storages.setdefault(param.ds_tensor.untyped_storage().data_ptr(), param)
        self.watched = list(storages.values())[:_WATCHED_STORAGES]
        self.address = self._watched_address()
        self.before: list[Tensor] | None = None
        self.pending = True

    def _watched_address(self) -> list[int]:
        return [param.ds_tensor.data_ptr() for param in self.watched]

    def moved(self) -> bool:
        return self._watched_address() != self.address

    def before_first(self) -> None:
        self.before = [tensor[:_CHECKED_ELEMENTS].clone() for tensor in self.ema_tensors]

    def after_first(self, weight: float | Tensor) -> None:
        self.pending = False
        weight = float(weight)  # a tensor weight (a tensor decay): this check reads back anyway
        before, self.before = self.before, None
        assert before is not None
        for name, param, read, ema_tensor, old in zip(self.names, self.params, self.read, self.ema_tensors, before):
            live = partition(param)
            same_partition = live.data_ptr() == read.data_ptr() and live.shape == read.shape
            expected = old.lerp(live[:_CHECKED_ELEMENTS].to(old.dtype), weight)
            tolerance = 4 * torch.finfo(old.dtype).eps * (old.abs() + expected.abs()) + torch.finfo(old.dtype).tiny
            moved = bool(((ema_tensor[:_CHECKED_ELEMENTS] - expected).abs() <= tolerance).all())
            if not (same_partition and moved):
                raise RuntimeError(
                    f"The EMA of {name} did not follow its ZeRO-3 partition in its first update (it "
                    f"{'read another tensor' if not same_partition else 'did not move toward it'}): DeepSpeed moved "
                    "the partition after the EMA was built. Build the ModelEMA after deepspeed.initialize (from the "
                    "engine or engine.module); after moving partitions by hand, call ema.refresh() before update()."
                )


def _refuse_nvme(names: Sequence[str], params: Sequence[Any]) -> None:
    """Refuse partitions offloaded to NVMe: each swap-in gives them another pooled buffer, which no EMA can follow."""
    offloaded = [
        name for name, param in zip(names, params) if getattr(param.ds_tensor, "final_location", None) == "nvme"
    ]
    if offloaded:
        raise ValueError(
            f"Unsupported ZeRO-3 parameters {offloaded[:3]}{' ...' if len(offloaded) > 3 else ''}: offloaded to NVMe "
            '("offload_param": {"device": "nvme"}), which swaps each partition through pooled buffers at every step, '
            'so an EMA of them would read stale memory. Offload parameters to "cpu" or not at all '
            '("offload_optimizer" to NVMe is fine: the EMA reads the parameters, not the optimizer states).'
        )


def _is_deepspeed(obj: object, name: str) -> bool:
    return any(cls.__name__ == name and cls.__module__.startswith("deepspeed.") for cls in type(obj).__mro__)


def refuse_pipeline(obj: object) -> None:
    """Refuse DeepSpeed pipeline parallelism: a `PipelineEngine`, or the `PipelineModule` inside one."""
    found = next((name for name in ("PipelineEngine", "PipelineModule") if _is_deepspeed(obj, name)), None)
    if found is not None:
        raise TypeError(
            f"Unsupported model: a DeepSpeed {found} (pipeline parallelism). Each pipeline stage holds other "
            "layers, and train_batch() steps the optimizer without engine.step(), so neither ModelEMA nor attach() "
            "can follow it. Supported: the DeepSpeedEngine of deepspeed.initialize on a plain nn.Module, ZeRO "
            "stages 0-3 (data parallel)."
        )


def is_deepspeed_engine(obj: object) -> bool:
    """Whether `obj` is a DeepSpeed engine (a `DeepSpeedEngine` or a subclass), without importing DeepSpeed."""
    return _is_deepspeed(obj, "DeepSpeedEngine")


def engine_step_hooks(engine: Any) -> OrderedDict[int, Callable[[], None]]:
    """The callbacks run after each optimizer step the engine really applies (installed once per engine).

    DeepSpeed offers no step hook, and its inner torch optimizer is the wrong place: ZeRO steps it once per
    parameter sub-group and copies the new weights into the bf16/fp16 partitions after it. So the engine's own
    `step` is wrapped, on the instance: after it returns, `engine.was_step_applied()` says whether it updated
    the weights (a gradient-accumulation boundary, and no fp16 overflow that skipped the step).
    """
    hooks = engine.__dict__.get("_fastema_step_hooks")
    if hooks is None:
        hooks = OrderedDict()
        step = engine.step

        def step_then_hooks(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            if engine.was_step_applied():
                for hook in list(hooks.values()):
                    hook()
            return result

        engine.__dict__["_fastema_step_hooks"] = hooks
        engine.__dict__["step"] = step_then_hooks
    return hooks
