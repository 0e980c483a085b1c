"""ModelEMA: which tensors are averaged, where they live, and the update/swap/state operations."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ._checks import (
    DeviceLike, check_decay, check_device, check_ema_dtype, check_flag, check_flatten_model, check_foreach,
    check_update_every,
)
from ._flat import FlatGroup, split_packable
from ._foreach import LayoutSentinels
from ._grouping import Group, group_tensor_pairs
from ._offload import MirrorGroup
from .schedules import DecayWarmup, check_warmup
from .checkpoint import atomic_save, read_checkpoint
from .distributed import gather_full, is_sharded, local_part, rank, shard_like, unwrap_model

STATE_FORMAT = "fastema.ModelEMA"
STATE_VERSION = 1


def named_model_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of `module` by its state-dict name (shared tensors once)."""
    tensors: dict[str, Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def tracked_tensors(module: nn.Module, all_parameters: bool, all_buffers: bool) -> dict[str, Tensor]:
    """The tensors an EMA averages: trainable parameters and persistent buffers by default."""
    tensors = {
        name: parameter
        for name, parameter in module.named_parameters()
        if all_parameters or parameter.requires_grad
    }
    seen = {id(tensor) for tensor in tensors.values()}
    for module_name, submodule in module.named_modules():
        for buffer_name, buffer in submodule._buffers.items():
            if buffer is None or id(buffer) in seen:
                continue
            if not all_buffers and buffer_name in submodule._non_persistent_buffers_set:
                continue
            seen.add(id(buffer))
            tensors[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer
    return tensors


def check_state_dict(
    state_dict: object, expected: dict[str, Tensor], default_decay: float, ema_dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], tuple[int, int], float]:
    """Check a `ModelEMA.state_dict()` against the EMA tensors it must fill (names, shapes, dtypes).

    `ema_dtype` (if given) replaces the dtype of `expected`'s floating tensors. Returns the
    tensors, (update count, step count) and latest decay, or raises one ValueError listing
    every problem.
    """
    if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
        raise ValueError("Invalid state_dict: not a fastema.ModelEMA state (missing format marker)")
    if state_dict.get("version") != STATE_VERSION:
        raise ValueError(f"Invalid state_dict: version {state_dict.get('version')!r}, expected {STATE_VERSION}")
    tensors = state_dict.get("tensors")
    num_updates = state_dict.get("num_updates")
    num_steps = state_dict.get("num_steps", num_updates)
    counts_ok = all(isinstance(count, int) and count >= 0 for count in (num_updates, num_steps))
    if not isinstance(tensors, dict) or not counts_ok:
        raise ValueError("Invalid state_dict: 'tensors' must be a dict, 'num_updates' and 'num_steps' non-negative ints")
    problems = []
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for name, ema_tensor in expected.items():
        saved = tensors.get(name)
        if saved is None:
            continue
        if not isinstance(saved, Tensor):
            problems.append(f"{name}: not a tensor")
        elif saved.shape != ema_tensor.shape:
            problems.append(f"{name}: shape {tuple(saved.shape)} != {tuple(ema_tensor.shape)}")
        else:
            dtype = ema_dtype if ema_dtype is not None and ema_tensor.is_floating_point() else ema_tensor.dtype
            if saved.dtype != dtype:
                problems.append(f"{name}: dtype {saved.dtype} != {dtype}")
    if problems:
        raise ValueError("Invalid state_dict for this ModelEMA (nothing was loaded): " + "; ".join(problems))
    last_decay = check_decay(state_dict.get("last_decay", default_decay), "last_decay")
    return tensors, (num_updates, num_steps), last_decay


class ModelEMA:
    """Exponential moving average of a model's weights, for any PyTorch training loop.

    After each optimizer step, `update()` sets, for every tracked floating tensor,
    `ema = decay * ema + (1 - decay) * model` (computed as `ema.lerp_(model, 1 - decay)`),
    and copies integer/bool buffers such as BatchNorm's `num_batches_tracked`. The model's
    tensors are only read. Tracked: parameters with `requires_grad` (all of them with
    `all_parameters=True`) and persistent buffers (all with `all_buffers=True`); which
    tensors those are is fixed at construction. Same idea as timm's `ModelEmaV3` and
    TensorFlow's `ExponentialMovingAverage`, with tensors grouped by device and dtype once.

    `ema.module` is the averaged copy of the model (eval mode, no gradients); untracked
    tensors in it keep the values they had at construction.

    `flatten_model=True` packs the tracked floating tensors of the model, and of the EMA,
    into one contiguous buffer per (device, dtype), each tensor becoming a view with its own
    shape and strides; an update is then a single `lerp_`, the fastest step on models with
    many small tensors. The tensor objects stay the same (optimizers and DDP are unaffected),
    but their storage is shared: safetensors refuses to save shared storage, and saving one
    tensor with `torch.save` writes the whole buffer. `model.to(...)` unpacks the model; the
    next update notices and packs it again where it now lives.

    `ema_dtype=torch.float32` keeps a float32 EMA of a bfloat16/float16 model: with decay
    0.9998 the update is far below bfloat16's resolution, so an EMA in the model's dtype
    stalls (a warning says so, once). `device='cpu'` offloads the EMA of a CUDA model to
    host memory; the update then runs in a background thread (see `_offload`), and whatever
    reads the EMA waits for it. `update_every=N` updates on every N-th call only, with
    decay**N. `warmup` makes the decay ramp up with the number of steps (see `schedules`).
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
        self.model = unwrap_model(model)
        tracked = tracked_tensors(self.model, self.all_parameters, self.all_buffers)
        # FSDP2 (`fully_shard`): DTensor parameters; the EMA keeps this rank's shard of each, no module copy.
        self.sharded = any(is_sharded(tensor) for tensor in tracked.values())
        if self.sharded and self.flatten_model:
            raise ValueError("Invalid flatten_model: True, but the model is sharded (FSDP2), which owns its storage")
        self._module: nn.Module | None = None
        self._shards: dict[str, Tensor] = {}
        if self.sharded:
            self._shards = {name: self._ema_twin(local_part(tensor)) for name, tensor in tracked.items()}
        else:
            self._module = self._copy_of_model()
        self.num_updates = 0  # EMA updates done
        self.num_steps = 0  # calls of `update()` (optimizer steps) since the EMA (re)started
        self.last_decay = self.decay
        self._backups: list[Tensor | None] | None = None
        self._build_groups()

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (eval mode, no gradients)."""
        if self._module is None:
            raise RuntimeError(
                "ModelEMA.module: the model is sharded (FSDP2), so the EMA holds shards only; evaluate with "
                "use_ema_weights(), or get the full EMA from state_dict()"
            )
        self.synchronize()
        return self._module

    def _ema_twin(self, tensor: Tensor) -> Tensor:
        """A copy of `tensor` where and in the dtype the EMA keeps it."""
        dtype = self.ema_dtype if self.ema_dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to(device=self.device or tensor.device, dtype=dtype, copy=True)

    def _copy_of_model(self) -> nn.Module:
        """A copy of the model with its tensors created directly where and in the dtype the EMA keeps them.

        Creating them there (through deepcopy's memo) means an offloaded EMA of a large model
        never needs a second copy in GPU memory, not even for a moment.
        """
        memo: dict[int, object] = {}
        with torch.no_grad():
            for tensor in named_model_tensors(self.model).values():
                twin = self._ema_twin(tensor)
                memo[id(tensor)] = nn.Parameter(twin, requires_grad=False) if isinstance(tensor, nn.Parameter) else twin
        ema_module = copy.deepcopy(self.model, memo)
        for parameter in ema_module.parameters():
            parameter.grad = None
            parameter.requires_grad_(False)
        return ema_module.eval()

    def _build_groups(self) -> None:
        """Pair EMA and model tensors by name and group them for the fused kernels (done once)."""
        model_tensors = tracked_tensors(self.model, self.all_parameters, self.all_buffers)
        ema_by_name = self._shards if self._module is None else named_model_tensors(self._module)
        self.tensor_names = list(model_tensors)
        self._ema_tensors = [ema_by_name[name] for name in self.tensor_names]
        self._model_tensors = [local_part(tensor) for tensor in model_tensors.values()]  # shard-local under FSDP2
        self._is_parameter = [isinstance(tensor, nn.Parameter) for tensor in model_tensors.values()]
        # For sharded tensors, the DTensor whose layout gathers the EMA shards into a full tensor.
        self._layouts = {name: tensor for name, tensor in model_tensors.items() if is_sharded(tensor)}
        self._groups: list[Group | FlatGroup] = []
        rest_ema, rest_model = self._ema_tensors, self._model_tensors
        if self.flatten_model:
            self._groups, rest_ema, rest_model = split_packable(
                rest_ema, rest_model, named_model_tensors(self.model).values()
            )
        if rest_model:
            self._groups += group_tensor_pairs(rest_ema, rest_model, self.foreach)
        self._mirrors = [
            group
            for outer in self._groups
            for group in (getattr(outer, "inner", None) or [outer])
            if isinstance(group, MirrorGroup)
        ]
        # Updates below this weight (1 - decay) round to nothing in the EMA's dtype when the
        # model is within 10% of the EMA: |weight * 0.1 * ema| < half a unit in the last place.
        self._underflow_weight = max(
            (5 * torch.finfo(tensor.dtype).eps for tensor in self._ema_tensors if tensor.is_floating_point()),
            default=0.0,
        )
        # Recorded after packing, which gives tensors new addresses.
        self._sentinels = LayoutSentinels(self._model_tensors, self._ema_tensors)

    def refresh(self) -> None:
        """Re-read the model's tensors after replacing some by hand (`p.data = ...`, `load_state_dict(assign=True)`).

        Moving or converting the whole model (`model.to(...)`) is noticed without this.
        """
        self._follow_model()

    def _follow_model(self) -> None:
        """The model was moved or cast after construction: move the EMA along (if it follows) and regroup."""
        self.synchronize()
        if self.device is None and self._module is not None:
            with torch.no_grad():
                for name, model_tensor in tracked_tensors(self.model, self.all_parameters, self.all_buffers).items():
                    owner_name, _, leaf = name.rpartition(".")
                    owner = self._module.get_submodule(owner_name)
                    ema_tensor = getattr(owner, leaf)
                    if ema_tensor.device == model_tensor.device:
                        continue
                    if isinstance(ema_tensor, nn.Parameter):
                        ema_tensor.data = ema_tensor.data.to(model_tensor.device)
                    else:
                        owner._buffers[leaf] = ema_tensor.to(model_tensor.device)
        self._build_groups()

    def update(self, decay: float | None = None) -> None:
        """Move the EMA toward the model; call after each optimizer step.

        `decay` overrides the configured decay (and `warmup`) for this step (for schedules).
        With `update_every=N` only every N-th call updates, with `decay ** N`: the N-1 skipped
        steps are averaged as if the model had held its current weights through them. That is
        exact for a model that did not change in between and close when N is much smaller
        than the averaging horizon 1 / (1 - decay); it costs 1/N of the work.
        """
        if self._backups is not None:
            raise RuntimeError("update() called inside use_ema_weights(): the model holds the EMA weights")
        if decay is not None:
            decay = check_decay(decay, "decay")
        self.num_steps += 1
        if self.num_steps % self.update_every:
            return
        if decay is None:
            decay = self.decay if self.warmup is None else self.warmup(self.num_steps, self.decay)
        # A few `data_ptr()` looks (not one per tensor) catch `model.to(...)` or `ema.module.to(...)`.
        if self._sentinels.moved():
            self._follow_model()
        weight = 1.0 - decay**self.update_every
        if weight < self._underflow_weight:
            self._warn_underflow(decay)
        # What `torch.no_grad()` does, without its Python context-manager cost (a few microseconds).
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for group in self._groups:
                group.step(weight)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        self.num_updates += 1
        self.last_decay = decay

    def _warn_underflow(self, decay: float) -> None:
        dtypes = sorted({str(tensor.dtype) for tensor in self._ema_tensors if tensor.is_floating_point()})
        warnings.warn(
            f"EMA updates with decay={decay} (update_every={self.update_every}) mostly round to nothing in "
            f"{', '.join(dtypes)}: the EMA will barely move. Keep it in float32 with ema_dtype=torch.float32, "
            "or use a smaller decay.",
            UserWarning,
            stacklevel=3,
        )
        self._underflow_weight = 0.0  # once per EMA

    def synchronize(self) -> None:
        """Wait until an offloaded update running in the background has finished (no-op otherwise)."""
        for mirror in self._mirrors:
            mirror.wait()

    def before_model_write(self) -> None:
        """Call before changing the model's weights outside a `torch.optim` optimizer step (offloaded EMA only).

        Makes the current CUDA stream wait, on the GPU, until the last snapshot of the model
        for an offloaded update has been copied. `torch.optim` optimizers and the fastai
        callbacks do this already.
        """
        for mirror in self._mirrors:
            mirror.before_model_write()

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        self.synchronize()
        for ema_tensor, model_tensor in zip(self._ema_tensors, self._model_tensors):
            ema_tensor.copy_(model_tensor)
        self.num_updates = self.num_steps = 0
        self.last_decay = self.decay

    def _matching_tensors(self, module: nn.Module, purpose: str) -> list[Tensor]:
        """`module`'s tensors in tracking order, or a ValueError listing every name/shape mismatch."""
        if self.sharded:
            raise RuntimeError(f"{purpose} with another module is not supported for a sharded (FSDP2) EMA")
        by_name = named_model_tensors(unwrap_model(module))
        missing = [name for name in self.tensor_names if name not in by_name]
        mismatched = [
            f"{name}: {tuple(by_name[name].shape)} != {tuple(ema_tensor.shape)}"
            for name, ema_tensor in zip(self.tensor_names, self._ema_tensors)
            if name in by_name and by_name[name].shape != ema_tensor.shape
        ]
        if missing or mismatched:
            raise ValueError(f"Invalid module for {purpose}: missing tensors {missing}, shape mismatches {mismatched}")
        return [by_name[name] for name in self.tensor_names]

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Copy the EMA weights into `model` (default: the tracked model), converting device and dtype."""
        self.synchronize()
        self.before_model_write()
        targets = self._model_tensors if model is None else self._matching_tensors(model, "copy_to")
        for target, ema_tensor in zip(targets, self._ema_tensors):
            target.copy_(ema_tensor)

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """Set the EMA weights from another module with the same names and shapes (e.g. an earlier EMA)."""
        sources = self._matching_tensors(module, "copy_from")
        self.synchronize()
        for ema_tensor, source in zip(self._ema_tensors, sources):
            ema_tensor.copy_(source)

    @torch.no_grad()
    def _swap_in(self) -> None:
        self.synchronize()
        self.before_model_write()
        backups: list[Tensor | None] = []
        try:
            for model_tensor, ema_tensor, is_parameter in zip(
                self._model_tensors, self._ema_tensors, self._is_parameter
            ):
                # Buffers can change while the EMA is in the model (DDP broadcasts rank 0's at every
                # forward, BatchNorm in train mode updates them): they are backed up, not exchanged,
                # so that the EMA comes back unchanged whatever happens to them.
                if is_parameter and model_tensor.dtype == ema_tensor.dtype:
                    # Exchange the two: exact both ways, extra memory of one tensor at a time.
                    held = model_tensor.clone()
                    model_tensor.copy_(ema_tensor)
                    ema_tensor.copy_(held)
                    backups.append(None)
                else:
                    # (A cast would also lose EMA precision on the way back.) The backup lives where
                    # the EMA lives: host memory when it is offloaded.
                    backups.append(model_tensor.to(ema_tensor.device, copy=True))
                    model_tensor.copy_(ema_tensor)
        except BaseException:
            self._swap_out(backups)
            raise
        self._backups = backups

    @torch.no_grad()
    def _swap_out(self, backups: list[Tensor | None]) -> None:
        for model_tensor, ema_tensor, backup in zip(self._model_tensors, self._ema_tensors, backups):
            if backup is None:
                held = model_tensor.clone()
                model_tensor.copy_(ema_tensor)
                ema_tensor.copy_(held)
            else:
                model_tensor.copy_(backup)

    @contextmanager
    def use_ema_weights(self) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into the live model, in place; restore them exactly after.

        The model object is not replaced, so DDP, `torch.compile` and other wrappers that
        hold it keep working.
        """
        if self._backups is not None:
            raise RuntimeError("use_ema_weights() is already active; it cannot be nested")
        self._swap_in()
        try:
            yield self.model
        finally:
            backups, self._backups = self._backups, None
            self._swap_out(backups)

    @property
    def ema_weights_in_use(self) -> bool:
        """Whether `use_ema_weights()` currently has the EMA weights in the model."""
        return self._backups is not None

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: EMA tensors by name, update count, decay, config.

        For a sharded (FSDP2) model the tensors are the full EMA, gathered shard by shard into
        CPU memory: a collective that every rank must call.
        """
        self.synchronize()
        tensors = dict(zip(self.tensor_names, self._ema_tensors))
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

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from `state_dict()`; everything is checked before anything is written.

        A sharded (FSDP2) EMA takes the full tensors and keeps this rank's shards (every rank
        must call it, with the same state).
        """
        expected = dict(zip(self.tensor_names, self._ema_tensors))
        expected.update(self._layouts)  # full shapes for sharded tensors
        tensors, counts, last_decay = check_state_dict(state_dict, expected, self.decay, self.ema_dtype)
        self.synchronize()
        for name, ema_tensor in zip(self.tensor_names, self._ema_tensors):
            layout = self._layouts.get(name)
            ema_tensor.copy_(tensors[name] if layout is None else shard_like(tensors[name], layout))
        self.num_updates, self.num_steps = counts
        self.last_decay = last_decay

    def save(self, path: str | os.PathLike) -> Path:
        """Write `state_dict()` to `path` atomically (a kill mid-write leaves the previous file intact).

        Under `torch.distributed` only rank 0 writes; for a sharded (FSDP2) model every rank must
        call it (gathering the EMA is a collective). Other ranks should `dist.barrier()` before loading.
        """
        state = self.state_dict()
        if rank() == 0:
            atomic_save(state, path)
        return Path(path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore from a file written by `save()`, made on any device; a bad file changes nothing."""
        state = read_checkpoint(path)
        try:
            self.load_state_dict(state)
        except ValueError as error:
            raise ValueError(f"Invalid checkpoint {path}: {error}") from error

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decay={self.decay}, tensors={len(self.tensor_names)}, "
            f"num_updates={self.num_updates}, device={self.device}, flatten_model={self.flatten_model}, "
            f"ema_dtype={self.ema_dtype}, update_every={self.update_every})"
        )
