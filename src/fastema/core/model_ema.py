"""ModelEMA: the public object, thin. It delegates to the tracker (what is tracked, the EMA's tensors, the
plan and its failure latch, following the model: `tracker`), the swap session (`swap`), the state format
(`state`, `sharded_state`) and the optimizer hooks (`hooks`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .checkpoint import load_into, save_on_rank_0
from .checks import (
    DeviceLike,
    check_compile,
    check_device,
    check_ema_dtype,
    check_flag,
    check_flatten_model,
    check_foreach,
    check_update_every,
)
from .counting import Count, Counts
from .hooks import Attachments, RemovableHandle
from .parallel import reshard, unwrap_model
from .schedules import DecayWarmup, check_warmup, decay_from
from .state import CONFIG_KEYS, full_state, prepare_load
from .swap import SwapGuard
from .tracker import Tracker, matching, migrate_v01, named_tensors, same_shapes
from .tracking import Placement, tracked_parameters, tracked_tensors, watch_module_changes

if TYPE_CHECKING:
    from .sharded_state import ShardedEMAState


class ModelEMA:
    """Exponential moving average of a model's weights, for any PyTorch training loop.

    After each optimizer step, `update()` sets, for every tracked floating tensor,
    `ema = decay * ema + (1 - decay) * model` (as `ema.lerp_(model, 1 - decay)`, one fused kernel
    per device and dtype, planned once), and copies integer/bool buffers such as BatchNorm's
    `num_batches_tracked`; the model is only read. Tracked: parameters with `requires_grad` and
    persistent buffers (`all_parameters`, `all_buffers` widen this; `tensor_names` names them).
    Same idea as timm's `ModelEmaV3` and TensorFlow's `ExponentialMovingAverage`.

    `ema.module` is the averaged copy (eval mode, no gradients); its untracked tensors share the
    model's storage where they can. The EMA follows the model: after `model.to(...)`, a cast,
    channels-last, `to_empty()` or `p.data = ...`, the next `update()` or read moves the EMA along
    (keeping its dtype) and plans again; a changed structure raises a RuntimeError.
    `flatten_model=True` packs model and EMA tensors into one buffer per (device, dtype), so an
    update is one `lerp_` (the tensor objects stay; storage is shared, which safetensors refuses).
    `ema_dtype=torch.float32` keeps a float32 EMA of a bf16/fp16 model; `device='cpu'` offloads it
    (the update runs in a background thread; reads wait for it); `update_every=N` updates every
    N-th call with decay**N; `warmup` ramps the decay up (`ExponentialWarmup`, `InverseGammaWarmup`);
    `half_life=H, batch_size=B` sets the decay per step to `0.5 ** (B / H)` (the length in samples, `SampleLength`).

    Attributes: `module`, `tensor_names`, `num_updates` (EMA updates done), `num_steps` (calls of
    `update()` since the start or `reset()`), `last_decay`, `decay`, `length` (a `SampleLength` or None), `model`.
    """

    num_updates = Count()  # EMA updates done
    num_steps = Count()  # calls of `update()` (optimizer steps) since the EMA (re)started
    last_decay = Count()  # the decay of the latest update

    def __init__(
        self,
        model: nn.Module,
        decay: float | None = None,  # weight kept by the EMA at each step, in [0, 1]; None: 0.9998 or from half_life
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
        half_life: float | None = None,  # the EMA's length in samples (or tokens), instead of `decay`
        batch_size: float | None = None,  # samples (or tokens) per optimizer step, with half_life: all ranks together
        compile: bool | None = None,  # inductor per group (True), eager (False), fastest measured (None: native on CPU)
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
        self.decay, self.length = decay_from(decay, half_life, batch_size)
        self.all_parameters = check_flag(all_parameters, "all_parameters")
        self.all_buffers = check_flag(all_buffers, "all_buffers")
        self.foreach = check_foreach(foreach)
        self.device = check_device(device, "device")
        self.flatten_model = check_flatten_model(flatten_model, self.foreach)
        self.ema_dtype = check_ema_dtype(ema_dtype)
        self.update_every = check_update_every(update_every)
        self.warmup = check_warmup(warmup)
        self.compile = check_compile(compile)
        watch_module_changes()
        self.model = unwrap_model(model)
        reshard(self.model)  # FSDP2: read the shards, not a forward's unsharded copies
        tracked = (
            tracked_tensors(self.model, self.all_parameters, self.all_buffers)
            if tensor_names is None
            else named_tensors(self.model, tensor_names)
        )
        self._tracker = Tracker(
            self.model,
            tracked,
            Placement(self.device, self.ema_dtype),
            foreach=self.foreach,
            flatten=self.flatten_model,
            compile=self.compile,
        )
        self.sharded = self._tracker.sharded
        self.tensor_names = self._tracker.names
        self._counts = Counts(self.decay)
        self._swap = SwapGuard()
        self._attachments = Attachments()

    def refresh(self) -> None:
        """Re-read the model's tensors now. Rarely needed: `update()` and every read notice changes by themselves."""
        self._swap.check_outside("refresh()")
        self._tracker.follow()

    # ---- the update ----------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer | nn.Module) -> RemovableHandle:
        """Call `update()` after every step `optimizer` really takes; `handle.remove()` detaches it.

        A step post-hook: a `GradScaler` that skips a step (inf/NaN gradients) does not call the
        optimizer's `step`, so the EMA does not move either. The one-line integration for plain,
        `accelerate` and DeepSpeed loops (a torch optimizer, accelerate's wrapper of one, or a
        DeepSpeed engine: after each `engine.step()` that applied a step).
        """
        return self._attachments.attach(self, optimizer, self.update, tracked_parameters(self.model, self.tensor_names))

    def update(self, decay: float | Tensor | None = None) -> None:
        """Move the EMA toward the model; call after each optimizer step.

        `decay` overrides the configured decay (and `warmup`) for this step (for schedules).
        With `update_every=N` only every N-th call updates, with `decay ** N`: the N-1 skipped
        steps are averaged as if the model had held its current weights through them. That is
        exact for a model that did not change in between and close when N is much smaller
        than the averaging horizon 1 / (1 - decay); it costs 1/N of the work. Safe inside
        `torch.compile` and CUDA graphs (counts and decay then live in tensors, docs/pytorch.md).
        """
        self._swap.check_outside("update()")
        self._tracker.latch.check()
        self._attachments.check_manual_update()
        self._counts.update(self._tracker, decay, self.decay, self.update_every, self.warmup)

    def synchronize(self) -> None:
        """Wait until an offloaded update running in the background has finished (no-op otherwise)."""
        self._tracker.synchronize()

    def before_model_write(self) -> None:
        """Call before changing the model's weights outside a `torch.optim` step (offloaded EMA only).

        The current CUDA stream waits, on the GPU, until the last snapshot of the model for an offloaded update
        has been copied. `torch.optim` optimizers and the fastai callbacks do this already.
        """
        self._tracker.plan.before_model_write()

    def close(self) -> None:
        """Release the background thread and stream of an offloaded EMA (also done when it is garbage-collected)."""
        self._tracker.plan.close()

    # ---- reading and writing the EMA -----------------------------------------------------------------

    def _readable(self) -> None:
        """Before handing out EMA values: no failed update, nothing in flight, following the model."""
        self._tracker.latch.check()
        self.synchronize()
        if not self._swap.active:
            self._tracker.ensure_current()

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (eval mode, no gradients)."""
        if self._tracker.module is None:
            raise RuntimeError(
                "ModelEMA.module: the model is sharded (FSDP2, ZeRO-3), so the EMA holds shards only; evaluate with "
                "use_ema_weights(), or get the full EMA from state_dict()"
            )
        self._swap.check_outside("ModelEMA.module")
        self._readable()
        if not self._tracker.binding.untracked_current():  # a frozen tensor replaced by hand: share the new one
            self._tracker.follow()
        return self._tracker.module

    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        self._swap.check_outside("reset()")
        self._tracker.overwrite(None)
        self.num_updates = self.num_steps = 0
        self.last_decay = self.decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Copy the EMA weights into `model` (default: the tracked model), converting device and dtype."""
        if model is None:
            self._swap.check_outside("copy_to() of the tracked model (it would be undone on exit)")
        self._readable()
        self.before_model_write()
        targets = self._tracker.binding.model_locals if model is None else matching(self._tracker, model, "copy_to")
        for target, ema_tensor in zip(targets, self._swap.ema_values(self._tracker.binding.ema_tensors)):
            target.copy_(ema_tensor)

    def switch(self) -> None:
        """Switch EMA (Li et al., 2024): `copy_to()` the tracked model, in place; the optimizer's state is untouched."""
        self.copy_to()

    def ema_tensors(self) -> list[Tensor]:
        """The EMA's own tensors (this rank's shards under FSDP2) in `tensor_names` order, as they stand: no copy."""
        self._swap.check_outside("ema_tensors()")
        self._readable()
        return list(self._tracker.binding.ema_tensors)

    def copy_from(self, module: nn.Module | ModelEMA) -> None:
        """Set the EMA weights from a module with the same names and shapes, or from another `ModelEMA` of the model.

        Another EMA is read by name, part by part (a sharded EMA's way); what it did not average keeps its value.
        """
        self._swap.check_outside("copy_from()")
        if isinstance(module, ModelEMA):
            module._swap.check_outside("copy_from()")
            module._readable()
            self._tracker.overwrite(same_shapes(self._tracker, module._tracker.ema_by_name()))
        else:
            self._tracker.overwrite(dict(zip(self.tensor_names, matching(self._tracker, module, "copy_from"))))

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
        self._swap.check_outside("use_ema_weights()")
        self._readable()
        self.before_model_write()
        reshard(self.model)
        self._swap.enter(list(self._tracker.binding.pairs()))
        try:
            yield self.model
        finally:
            self._swap.exit(self._tracker.tensors_after_swap)

    @property
    def ema_weights_in_use(self) -> bool:
        """Whether `use_ema_weights()` currently has the EMA weights in the model."""
        return self._swap.active

    # ---- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: EMA tensors by name, update count, decay, config.

        For a sharded (FSDP2) model the tensors are the full EMA, gathered shard by shard into
        CPU memory: a collective that every rank must call.
        """
        return full_state(self)

    def config(self) -> dict[str, object]:
        """The options a saved state must share to load into this EMA (what its counts and tensors mean)."""
        return {key: getattr(self, key) for key in CONFIG_KEYS}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from `state_dict()`; everything is checked before anything is written.

        A sharded (FSDP2) EMA takes the full tensors and keeps this rank's shards (every rank
        must call it, with the same state).
        """
        self._swap.check_outside("load_state_dict()")
        prepare_load(self, state_dict)()

    def sharded_state(self, purpose: str | None = None) -> ShardedEMAState:
        """This EMA as a `torch.distributed.checkpoint` `Stateful`: `dcp.save({..., "ema": ema.sharded_state("save")})`.

        Under FSDP2 each rank saves and loads its own shard (no gather); a load reshards to any world size or to one
        process. `purpose` ("save" or "load") says what the state is for: give it (None guesses from the caller).
        """
        from .sharded_state import ShardedEMAState  # torch.distributed.checkpoint only when asked for

        self._swap.check_outside("sharded_state()")
        return ShardedEMAState(self, purpose)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `state_dict()` to `path` atomically (a kill mid-write leaves the previous file intact).

        Under `torch.distributed` only rank 0 writes; for a sharded (FSDP2) model every rank must
        call it (gathering the EMA is a collective). Other ranks should `dist.barrier()` before loading.
        """
        return save_on_rank_0(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore from a file written by `save()`, made on any device; a bad file changes nothing."""
        self._swap.check_outside("load()")
        load_into(path, self.load_state_dict, "fastema.ModelEMA")

    # ---- copying and pickling ------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        self._swap.check_outside("pickling a ModelEMA")  # nothing mid-swap is pickled
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state if "_tracker" in state else migrate_v01(state))
        watch_module_changes()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decay={self.decay}, tensors={len(self.tensor_names)}, "
            f"num_updates={self.num_updates}, device={self.device}, flatten_model={self.flatten_model}, "
            f"ema_dtype={self.ema_dtype}, update_every={self.update_every})"
        )
