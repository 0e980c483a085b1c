"""ModelEMA: the public object. What is tracked lives in `_binding`, how it steps in `_plan`/`_steps`,
the swap into the live model in `_swap`, the state format in `_state`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import Tensor, nn

from .checkpoint import load_into, save_on_rank_0
from .checks import (
    DeviceLike,
    check_decay,
    check_device,
    check_ema_dtype,
    check_flag,
    check_flatten_model,
    check_foreach,
    check_update_every,
)
from .hooks import Attachments, RemovableHandle
from .latch import FailureLatch
from .plan import Plan, plan_update
from .state import CONFIG_KEYS, STATE_FORMAT, STATE_VERSION, check_state_dict
from .steps import is_dense
from .swap import WeightSwap, warn_if_written
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
    tracked_parameters,
    tracked_tensors,
    watch_module_changes,
)

if TYPE_CHECKING:
    from ..distributed.sharded import ShardedEMAState

from .parallel import gather_full, is_sharded, local_part, reshard, shard_like, unwrap_model
from .schedules import DecayWarmup, check_warmup


class ModelEMA:
    """Exponential moving average of a model's weights, for any PyTorch training loop.

    After each optimizer step, `update()` sets, for every tracked floating tensor,
    `ema = decay * ema + (1 - decay) * model` (computed as `ema.lerp_(model, 1 - decay)`),
    and copies integer/bool buffers such as BatchNorm's `num_batches_tracked`. The model's
    tensors are only read. Tracked: parameters with `requires_grad` (all of them with
    `all_parameters=True`) and persistent buffers (all with `all_buffers=True`); which
    tensors those are is fixed at construction (`tensor_names` names them instead). Same idea as
    timm's `ModelEmaV3` and TensorFlow's `ExponentialMovingAverage`, with the update planned once:
    tensors grouped by device and dtype, one fused kernel per group.

    `ema.module` is the averaged copy of the model (eval mode, no gradients). Its untracked
    tensors share the model's storage where the EMA lives beside the model in the same dtype
    (they cost nothing and hold the model's current values), and are copies otherwise.

    The EMA follows the model: if the model's tensors are moved, cast, re-laid-out or replaced
    (`model.to(...)`, `.half()`, channels-last, `to_empty()`, `load_state_dict(assign=True)`,
    `p.data = ...`), the next `update()` (or read of the EMA) moves the EMA to the model's new
    device (keeping its own dtype) and re-plans the step. A change of the model's structure (a
    tracked tensor gone or reshaped) raises a RuntimeError.

    `flatten_model=True` packs the tracked tensors of the model, and of the EMA, into one
    contiguous buffer per (device, dtype) where that changes nothing for anyone else: an update
    is then a single `lerp_`, the fastest step on models with many small
    tensors. The tensor objects, their autograd nodes and hooks stay (optimizers and DDP are
    unaffected), but storage is shared: safetensors refuses to save shared storage.

    `ema_dtype=torch.float32` keeps a float32 EMA of a bfloat16/float16 model (an EMA in the
    model's dtype stalls; a warning says so). `device='cpu'` offloads the EMA of a CUDA model to
    host memory; the update then runs in a background thread, and whatever reads the EMA waits
    for it. `update_every=N` updates on every N-th call only, with decay**N. `warmup` makes the
    decay ramp up with the number of steps (`ExponentialWarmup`, `InverseGammaWarmup`).

    Attributes: `module` (the EMA model), `tensor_names` (what is averaged, by state-dict name),
    `num_updates` (EMA updates done), `num_steps` (calls of `update()` since the start or the
    last `reset()`), `last_decay` (the decay of the latest update), `decay`, `model` (the
    unwrapped model).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,  # weight kept by the EMA at each update, in [0, 1]
        *,
        all_parameters: bool = False,  # also average parameters without `requires_grad`
        all_buffers: bool = False,  # also average non-persistent buffers
        foreach: bool | None = None,  # fused multi-tensor step (True), for-loop (False), fastest (None)
        device: DeviceLike = None,  # where the EMA lives; None = beside each model tensor
        flatten_model: bool = False,  # pack model and EMA tensors into flat buffers: one lerp_ per update
        ema_dtype: torch.dtype | None = None,  # dtype of the EMA's floating tensors; None = the model's
        update_every: int = 1,  # update on every N-th call of `update()` only, with decay**N
        warmup: DecayWarmup | None = None,  # decay as a function of the step count, e.g. ExponentialWarmup()
        tensor_names: Sequence[str] | None = None,  # average exactly these (state-dict names); None = by the flags
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
        self.decay = check_decay(decay, "decay")
        self.all_parameters = check_flag(all_parameters, "all_parameters")
        self.all_buffers = check_flag(all_buffers, "all_buffers")
        self.foreach = check_foreach(foreach)
        self.device = check_device(device, "device")
        self.flatten_model = check_flatten_model(flatten_model, self.foreach)
        self.ema_dtype = check_ema_dtype(ema_dtype)
        self.update_every = check_update_every(update_every)
        self.warmup = check_warmup(warmup)
        watch_module_changes()
        self.model = unwrap_model(model)
        reshard(self.model)  # FSDP2: read the shards, not a forward's unsharded copies
        tracked = (
            tracked_tensors(self.model, self.all_parameters, self.all_buffers)
            if tensor_names is None
            else _named_tensors(self.model, tensor_names)
        )
        # FSDP2 (`fully_shard`): DTensor parameters; the EMA keeps this rank's shard of each, no module copy.
        self.sharded = any(is_sharded(tensor) for tensor in tracked.values())
        if self.sharded and self.flatten_model:
            raise ValueError("Invalid flatten_model: True, but the model is sharded (FSDP2), which owns its storage")
        self._placement = Placement(self.device, self.ema_dtype)
        self._module: nn.Module | None = None
        self._shards: dict[str, Tensor] = {}
        if self.sharded:
            self._shards = {name: self._placement.twin(local_part(tensor)) for name, tensor in tracked.items()}
        else:
            self._module = copy_of_model(self.model, tracked, self._placement)
        self.tensor_names = list(tracked)
        self.num_updates = 0  # EMA updates done
        self.num_steps = 0  # calls of `update()` (optimizer steps) since the EMA (re)started
        self.last_decay = self.decay
        self._swap: WeightSwap | None = None
        self._latch = FailureLatch("reset() or load()/load_state_dict()")
        self._attachments = Attachments()
        self._plan = Plan([])
        self._replacements: dict[str, int] = {}  # how often the model replaced each tensor object
        self._volatile: frozenset[str] = frozenset()
        self._bind()

    # ---- binding and plan --------------------------------------------------------------------------

    def _bind(self) -> None:
        """Pair the model's tensors with the EMA's and plan the update (done once, and after the model changed)."""
        self._plan = Plan([])  # the old plan dropped first: the buffers it packed are free to move again
        binding = self._binding = Binding(self.model, self._module, self._shards, self.tensor_names, self._volatile)
        all_model_tensors = [local_part(tensor) for _, tensor in all_slots(self.model)]
        self._plan = plan_update(
            binding.ema_tensors,
            binding.model_locals,
            binding.is_parameter,
            foreach=self.foreach,
            flatten=self.flatten_model,
            all_model_tensors=all_model_tensors,
            volatile=[binding.slot_of(name) for name in binding.names if name in self._volatile],
        )
        self._volatile_keys = {
            (id(slot.owner(self.model)), slot.key)
            for slot in (*binding.slots, *binding.untracked)
            if slot.name in self._volatile
        }
        binding.record()  # packing gave tensors new addresses
        _check_no_shared_storage(binding.ema_tensors, all_model_tensors)
        # One tracked tensor watched by identity at every update: replacing tensors straight in `_parameters`
        # (FSDP2's `fully_shard` does, after this EMA was built) moves no counter. Not for a sharded EMA, whose
        # model swaps unsharded copies in and out at every forward.
        steady = [index for index, name in enumerate(binding.names) if name not in self._volatile]
        self._sentinel: IdentityWatch | None = None
        if steady and not self.sharded:
            self._sentinel = IdentityWatch(self.model, binding.slots[steady[0]], binding.model_tensors[steady[0]])
        # For sharded tensors, the DTensor whose layout gathers the EMA shards into a full tensor.
        self._layouts = {
            name: tensor for name, tensor in zip(self.tensor_names, self._binding.model_tensors) if is_sharded(tensor)
        }
        # Updates below this weight (1 - decay) round to nothing in the EMA's dtype when the model
        # is within 10% of the EMA: |weight * 0.1 * ema| < half a unit in the last place. Per dtype.
        self._underflow = {
            tensor.dtype: 5 * torch.finfo(tensor.dtype).eps
            for tensor in self._binding.ema_tensors
            if tensor.is_floating_point()
        }
        self._underflow_weight = max(self._underflow.values(), default=0.0)
        self._plan.rebaseline()
        self._seen_changes = changes()

    def _follow_model(self, force: bool = False) -> None:
        """Something may have moved: check the binding, and if it is out of date move the EMA along and re-plan."""
        self.synchronize()
        reshard(self.model)
        if not force and self._binding.current() and not self._plan.slots_stale():
            self._plan.rebaseline()
            self._seen_changes = changes()
            return
        before = self._binding.recorded_objects
        self._plan.close()
        self._relocate()
        self._bind()
        # Tensors the model keeps replacing (`self.avg = ...` in forward) are read through their slots
        # from now on: each replacement would otherwise cost a new binding and plan.
        replaced = [name for name, tensor in self._binding.objects().items() if before.get(name, tensor) is not tensor]
        for name in replaced:
            self._replacements[name] = self._replacements.get(name, 0) + 1
        volatile = frozenset(name for name, count in self._replacements.items() if count >= 2)
        if volatile != self._volatile:
            self._volatile = volatile
            self._bind()

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
        check_tracked_present(self.tensor_names, model_slots)
        ema_modules = {} if self._module is None else dict(self._module.named_modules(remove_duplicate=False))
        ema_by_model_tensor: dict[int, Tensor] = {}
        for name in self.tensor_names:
            slot, model_tensor = model_slots[name]
            ema_tensor = self._shards[name] if self._module is None else slot.get(self._module, ema_modules)
            local = local_part(model_tensor)
            if is_sharded(model_tensor) and not self.sharded:
                raise RuntimeError(
                    f"The model's tensor {name} is now sharded (a DTensor): the model was sharded (FSDP2 "
                    "fully_shard) after this ModelEMA was built, so it would average tensors the model no longer "
                    "trains. Build the ModelEMA after fully_shard(model)."
                )
            if ema_tensor is None or ema_tensor.shape != local.shape:
                raise RuntimeError(
                    f"The model's tensor {name} changed shape from "
                    f"{None if ema_tensor is None else tuple(ema_tensor.shape)} to {tuple(local.shape)}: its structure "
                    "changed. Build a new ModelEMA for the new model."
                )
            moved = self._follow_placement(ema_tensor, local)
            if moved is not None and self._module is None:
                self._shards[name] = ema_tensor = moved
            elif moved is not None:
                _replace_data(ema_tensor, moved)
            ema_by_model_tensor[id(model_tensor)] = ema_tensor
        if self._module is None:
            return
        untracked: dict[int, Tensor] = {}  # one EMA-side tensor per model tensor, so ties stay ties
        for slot, model_tensor in all_slots(self.model):
            current = slot.get(self._module, ema_modules)
            if slot.path not in ema_modules:
                continue  # a submodule the model gained: not part of this EMA
            wanted = ema_by_model_tensor.get(id(model_tensor))
            if wanted is None:
                wanted = untracked.get(id(model_tensor))
            if wanted is None:
                dtype = current.dtype if current is not None else self._placement.dtype_for(model_tensor)
                wanted = self._placement.untracked(model_tensor, dtype)
                if slot.is_parameter:
                    wanted = nn.Parameter(wanted, requires_grad=False)
                untracked[id(model_tensor)] = wanted
            if current is not wanted:
                slot.set(self._module, wanted)

    def _follow_placement(self, ema_tensor: Tensor, model_tensor: Tensor) -> Tensor | None:
        """The EMA tensor's data moved beside `model_tensor` and laid out like it (None: nothing to do)."""
        if ema_tensor.device.type == "meta" and model_tensor.device.type != "meta":
            return self._placement.twin(model_tensor, ema_tensor.dtype)
        device = self._placement.device_for(model_tensor)
        laid_out = not is_dense(model_tensor) or ema_tensor.stride() == model_tensor.stride()
        if ema_tensor.device == device and laid_out:
            return None
        stride = model_tensor.stride() if is_dense(model_tensor) else ema_tensor.contiguous().stride()
        moved = torch.empty_strided(ema_tensor.shape, stride, dtype=ema_tensor.dtype, device=device)
        return moved.copy_(ema_tensor)

    def refresh(self) -> None:
        """Re-read the model's tensors now. Rarely needed: `update()` and every read notice changes by themselves."""
        self._check_outside_swap("refresh()")
        self._follow_model()

    def _ensure_current(self) -> None:
        # One counter, one dict lookup and a few storage use counts, whatever the number of tensors.
        if self._sentinel is not None and self._sentinel.moved():
            self._follow_model()
            return
        if self._seen_changes != changes():
            if not self._only_volatile_changes():
                self._follow_model()
                return
            self._seen_changes = changes()
        if self._plan.stale():
            self._follow_model()

    def _only_volatile_changes(self) -> bool:
        """Whether every module change since the last check re-registered a tensor read through its slot."""
        if not self._volatile_keys:
            return False
        recent = changes_since(self._seen_changes)
        return recent is not None and all(change in self._volatile_keys for change in recent)

    # ---- the update ----------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call `update()` after every step `optimizer` really takes; `handle.remove()` detaches it.

        A step post-hook: a `GradScaler` that skips a step (inf/NaN gradients) does not call the
        optimizer's `step`, so the EMA does not move either. The one-line integration for plain
        and `accelerate` loops (pass the torch optimizer; an accelerate `AcceleratedOptimizer` is
        unwrapped).
        """
        return self._attachments.attach(self, optimizer, self.update, tracked_parameters(self.model, self.tensor_names))

    def update(self, decay: float | None = None) -> None:
        """Move the EMA toward the model; call after each optimizer step.

        `decay` overrides the configured decay (and `warmup`) for this step (for schedules).
        With `update_every=N` only every N-th call updates, with `decay ** N`: the N-1 skipped
        steps are averaged as if the model had held its current weights through them. That is
        exact for a model that did not change in between and close when N is much smaller
        than the averaging horizon 1 / (1 - decay); it costs 1/N of the work.
        """
        self._check_outside_swap("update()")
        self._check_intact()
        self._attachments.check_manual_update()
        if decay is not None:
            decay = check_decay(decay, "decay")
        step = self.num_steps + 1
        if step % self.update_every:
            self.num_steps = step
            return
        if decay is None:
            decay = self.decay if self.warmup is None else self.warmup(step, self.decay)
        self._ensure_current()  # may raise (a changed structure): then this call did not count
        self.num_steps = step
        weight = 1.0 - decay**self.update_every
        if 0.0 < weight < self._underflow_weight:
            self._warn_underflow(decay, weight)
        # What `torch.no_grad()` does, without its Python context-manager cost (a few microseconds).
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._plan.step(weight)
        except Exception as error:
            self._fail(error)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        self.num_updates += 1
        self.last_decay = decay

    def _warn_underflow(self, decay: float, weight: float) -> None:
        stalled = [dtype for dtype, threshold in self._underflow.items() if weight < threshold]
        narrow = any(torch.finfo(dtype).bits < 32 for dtype in stalled)
        remedy = "Keep it in float32 with ema_dtype=torch.float32" if narrow else "Use ema_dtype=torch.float64"
        warnings.warn(
            f"EMA updates with decay={decay} (update_every={self.update_every}) mostly round to nothing in "
            f"{', '.join(sorted(map(str, stalled)))}: the EMA will barely move. {remedy}, or a smaller decay.",
            UserWarning,
            stacklevel=3,
        )
        # Once per dtype: a dtype that has not stalled yet can still warn.
        self._underflow = {dtype: threshold for dtype, threshold in self._underflow.items() if weight >= threshold}
        self._underflow_weight = max(self._underflow.values(), default=0.0)

    def _fail(self, error: BaseException) -> NoReturn:
        """An update failed part-way: the EMA is incomplete until reset or loaded."""
        self._latch.fail(
            error,
            "If a tracked tensor was changed by hand (p.data = ... with another dtype, device or shape), call "
            "refresh(); then call ",
        )

    def _check_intact(self) -> None:
        self._latch.check()

    @property
    def _failure(self) -> BaseException | None:
        return self._latch.error

    @_failure.setter
    def _failure(self, error: BaseException | None) -> None:
        self._latch.error = error

    def _check_outside_swap(self, what: str) -> None:
        if self._swap is not None:
            raise RuntimeError(
                f"{what} called inside use_ema_weights(): the model holds the EMA weights and the EMA's own tensors "
                "hold the model's. Call it after the with block."
            )

    def synchronize(self) -> None:
        """Wait until an offloaded update running in the background has finished (no-op otherwise)."""
        try:
            self._plan.wait()
        except Exception as error:
            self._fail(error)

    def before_model_write(self) -> None:
        """Call before changing the model's weights outside a `torch.optim` optimizer step (offloaded EMA only).

        Makes the current CUDA stream wait, on the GPU, until the last snapshot of the model
        for an offloaded update has been copied. `torch.optim` optimizers and the fastai
        callbacks do this already.
        """
        self._plan.before_model_write()

    def close(self) -> None:
        """Release the background thread and stream of an offloaded EMA (also done when it is garbage-collected)."""
        self._plan.close()

    # ---- reading and writing the EMA -----------------------------------------------------------------

    def _readable(self) -> None:
        """Before handing out EMA values: no failed update, nothing in flight, following the model."""
        self._check_intact()
        self.synchronize()
        if self._swap is None:
            self._ensure_current()

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (eval mode, no gradients)."""
        if self._module is None:
            raise RuntimeError(
                "ModelEMA.module: the model is sharded (FSDP2), so the EMA holds shards only; evaluate with "
                "use_ema_weights(), or get the full EMA from state_dict()"
            )
        self._check_outside_swap("ModelEMA.module")
        self._readable()
        if not self._binding.untracked_current():  # a frozen tensor replaced by hand: share the new one
            self._follow_model()
        return self._module

    def _ema_values(self) -> list[Tensor]:
        """The EMA's tensors as they stand, wherever they are (inside use_ema_weights(), partly in the model)."""
        if self._swap is None:
            return list(self._binding.ema_tensors)
        return [self._swap.ema_value(index).detach().clone() for index in range(len(self.tensor_names))]

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        self._check_outside_swap("reset()")
        self._wait_forgetting_failure()
        self._ensure_current()
        for _, model_tensor, ema_tensor, _ in self._binding.pairs():
            ema_tensor.copy_(model_tensor)
        self.num_updates = self.num_steps = 0
        self.last_decay = self.decay
        self._failure = None

    def _wait_forgetting_failure(self) -> None:
        """Wait for a background update; a failure is forgotten: the caller overwrites the whole EMA."""
        with suppress(Exception):
            self._plan.wait()

    def _matching_tensors(self, module: nn.Module, purpose: str) -> list[Tensor]:
        """`module`'s tensors in tracking order, or a ValueError listing every name/shape mismatch."""
        if self.sharded:
            raise RuntimeError(f"{purpose} with another module is not supported for a sharded (FSDP2) EMA")
        by_name = {name: tensor for name, (_, tensor) in tensor_slots(unwrap_model(module)).items()}
        missing = [name for name in self.tensor_names if name not in by_name]
        mismatched = [
            f"{name}: {tuple(by_name[name].shape)} != {tuple(ema_tensor.shape)}"
            for name, ema_tensor in zip(self.tensor_names, self._binding.ema_tensors)
            if name in by_name and by_name[name].shape != ema_tensor.shape
        ]
        if missing or mismatched:
            raise ValueError(f"Invalid module for {purpose}: missing tensors {missing}, shape mismatches {mismatched}")
        return [by_name[name] for name in self.tensor_names]

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Copy the EMA weights into `model` (default: the tracked model), converting device and dtype."""
        if model is None:
            self._check_outside_swap("copy_to() of the tracked model (it would be undone on exit)")
        self._readable()
        self.before_model_write()
        targets = self._binding.model_locals if model is None else self._matching_tensors(model, "copy_to")
        for target, ema_tensor in zip(targets, self._ema_values()):
            target.copy_(ema_tensor)

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """Set the EMA weights from another module with the same names and shapes (e.g. an earlier EMA)."""
        self._check_outside_swap("copy_from()")
        sources = self._matching_tensors(module, "copy_from")
        self._wait_forgetting_failure()
        self._ensure_current()
        for ema_tensor, source in zip(self._binding.ema_tensors, sources):
            ema_tensor.copy_(source)
        self._failure = None

    @torch.no_grad()
    def _copy_from_engine(self, other: ModelEMA) -> None:
        """Set the EMA weights from another EMA of this model, part by part (a sharded EMA's `copy_from`).

        By name: a tensor the other EMA did not average (frozen then) keeps its start, the model's value.
        """
        self._check_outside_swap("copy_from()")
        other._check_outside_swap("copy_from()")
        other._readable()
        sources = dict(zip(other.tensor_names, other._binding.ema_tensors))
        pairs = [(t, sources[n]) for n, t in zip(self.tensor_names, self._binding.ema_tensors) if n in sources]
        differing = [tuple(source.shape) for ema_tensor, source in pairs if ema_tensor.shape != source.shape]
        if differing:
            raise ValueError(f"Invalid copy_from: the other EMA's tensors have other shapes ({differing[:3]})")
        self._wait_forgetting_failure()
        self._ensure_current()
        for ema_tensor, source in pairs:
            ema_tensor.copy_(source)
        self._failure = None

    @contextmanager
    def use_ema_weights(self) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into the live model, in place; restore the model's exactly after.

        The model object is not replaced, so DDP, FSDP2, `torch.compile` and other wrappers that
        hold it keep working. Inside the block `state_dict()`, `save()` and `copy_to(other)`
        still give the EMA; `module`, `update()`, `reset()`, `copy_from()`, `load_state_dict()`,
        `load()` and `sharded_state()` raise a RuntimeError. The model's parameters are the EMA's
        inside the block: an in-place write to one is kept in the EMA (with a warning); writes to buffers
        (BatchNorm statistics in train mode, DDP's broadcasts) are discarded.
        """
        self._check_outside_swap("use_ema_weights()")
        self._readable()
        self.before_model_write()
        reshard(self.model)
        swap = WeightSwap(list(self._binding.pairs()))
        swap.enter()
        self._swap = swap
        try:
            yield self.model
        finally:
            self._swap = None
            reshard(self.model)  # FSDP2: drop unsharded copies that hold EMA values
            targets = None
            if not self._binding.current():  # one pass: `p.data = ...` inside moves no counter
                # The model was moved or replaced inside: its own weights go where it keeps them now.
                slots = tensor_slots(self.model)
                targets = [local_part(slots[name][1]) for name in self.tensor_names]
            warn_if_written(swap.exit(targets))

    @property
    def ema_weights_in_use(self) -> bool:
        """Whether `use_ema_weights()` currently has the EMA weights in the model."""
        return self._swap is not None

    # ---- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: EMA tensors by name, update count, decay, config.

        For a sharded (FSDP2) model the tensors are the full EMA, gathered shard by shard into
        CPU memory: a collective that every rank must call.
        """
        self._readable()
        tensors = dict(zip(self.tensor_names, self._ema_values()))
        for name, layout in self._layouts.items():
            tensors[name] = gather_full(tensors[name].to(layout.device), layout).cpu()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "tensors": tensors,
            "num_updates": self.num_updates,
            "num_steps": self.num_steps,
            "update_every": self.update_every,
            "decay": self.decay,
            "last_decay": self.last_decay,
            "all_parameters": self.all_parameters,
            "all_buffers": self.all_buffers,
        }

    def config(self) -> dict[str, object]:
        """The options a saved state must share to load into this EMA (what its counts and tensors mean)."""
        return {key: getattr(self, key) for key in CONFIG_KEYS}

    def _expected_state(self) -> dict[str, Tensor]:
        """What a state's tensors must look like, by name (full shapes for sharded tensors)."""
        expected = dict(zip(self.tensor_names, self._binding.ema_tensors))
        expected.update(self._layouts)
        return expected

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from `state_dict()`; everything is checked before anything is written.

        A sharded (FSDP2) EMA takes the full tensors and keeps this rank's shards (every rank
        must call it, with the same state).
        """
        self._check_outside_swap("load_state_dict()")
        tensors, counts, last_decay = check_state_dict(
            state_dict, self._expected_state(), self.decay, self.ema_dtype, self.config()
        )
        parts = []
        for name in self.tensor_names:
            layout = self._layouts.get(name)
            parts.append(tensors[name] if layout is None else shard_like(tensors[name], layout))
        self._write_checked_state(parts, counts, last_decay)

    @torch.no_grad()
    def _write_checked_state(self, parts: Sequence[Tensor], counts: tuple[int, int], last_decay: float) -> None:
        """Copy checked values (this rank's part of each tracked tensor, in `tensor_names` order) into the EMA."""
        self._check_outside_swap("load_state_dict()")
        self._wait_forgetting_failure()
        self._ensure_current()
        for ema_tensor, part in zip(self._binding.ema_tensors, parts, strict=True):
            ema_tensor.copy_(part)
        self.num_updates, self.num_steps = counts
        self.last_decay = last_decay
        self._failure = None

    def sharded_state(self, purpose: str | None = None) -> ShardedEMAState:
        """This EMA as a `torch.distributed.checkpoint` `Stateful`: `dcp.save({..., "ema": ema.sharded_state()})`.

        Under FSDP2 each rank saves and loads its own shard (no gather), and loading reshards to
        any world size, or to one process with an unsharded model. `purpose` ("save" or "load")
        says what the state is for; None tells DCP's save and load apart by their caller (see
        `fastema.sharded`).
        """
        from ..distributed.sharded import ShardedEMAState

        self._check_outside_swap("sharded_state()")
        return ShardedEMAState(self, purpose)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `state_dict()` to `path` atomically (a kill mid-write leaves the previous file intact).

        Under `torch.distributed` only rank 0 writes; for a sharded (FSDP2) model every rank must
        call it (gathering the EMA is a collective). Other ranks should `dist.barrier()` before loading.
        """
        return save_on_rank_0(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore from a file written by `save()`, made on any device; a bad file changes nothing."""
        self._check_outside_swap("load()")
        load_into(path, self.load_state_dict, "fastema.ModelEMA")

    # ---- copying and pickling ------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # Threads, streams and the plan's views are rebuilt on unpickling; nothing mid-swap is pickled.
        self._check_outside_swap("pickling a ModelEMA")
        self.synchronize()
        state = dict(self.__dict__)
        for name in ("_plan", "_binding", "_layouts", "_swap", "_sentinel"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._swap = None
        self._plan = Plan([])
        watch_module_changes()
        self._bind()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decay={self.decay}, tensors={len(self.tensor_names)}, "
            f"num_updates={self.num_updates}, device={self.device}, flatten_model={self.flatten_model}, "
            f"ema_dtype={self.ema_dtype}, update_every={self.update_every})"
        )


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


def _named_tensors(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
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
