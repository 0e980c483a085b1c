"""ModelEMA: which tensors are averaged, where they live, and the update/swap/state operations."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ._checks import DeviceLike, check_decay, check_device, check_flag, check_flatten_model, check_foreach
from ._flat import FlatGroup, split_packable
from ._foreach import LayoutSentinels, TensorGroup, group_tensor_pairs
from .checkpoint import atomic_save, read_checkpoint
from .distributed import unwrap_model

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
    state_dict: object, expected: dict[str, Tensor], default_decay: float
) -> tuple[dict[str, Tensor], int, float]:
    """Check a `ModelEMA.state_dict()` against the EMA tensors it must fill (names, shapes, dtypes).

    Returns its tensors, update count and latest decay, or raises one ValueError listing every problem.
    """
    if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
        raise ValueError("Invalid state_dict: not a fastema.ModelEMA state (missing format marker)")
    if state_dict.get("version") != STATE_VERSION:
        raise ValueError(f"Invalid state_dict: version {state_dict.get('version')!r}, expected {STATE_VERSION}")
    tensors = state_dict.get("tensors")
    num_updates = state_dict.get("num_updates")
    if not isinstance(tensors, dict) or not isinstance(num_updates, int) or num_updates < 0:
        raise ValueError("Invalid state_dict: 'tensors' must be a dict and 'num_updates' a non-negative int")
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
        elif saved.dtype != ema_tensor.dtype:
            problems.append(f"{name}: dtype {saved.dtype} != {ema_tensor.dtype}")
    if problems:
        raise ValueError("Invalid state_dict for this ModelEMA (nothing was loaded): " + "; ".join(problems))
    last_decay = check_decay(state_dict.get("last_decay", default_decay), "last_decay")
    return tensors, num_updates, last_decay


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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
        self.decay = check_decay(decay, "decay")
        self.all_parameters = check_flag(all_parameters, "all_parameters")
        self.all_buffers = check_flag(all_buffers, "all_buffers")
        self.foreach = check_foreach(foreach)
        self.device = check_device(device, "device")
        self.flatten_model = check_flatten_model(flatten_model, self.foreach)
        self.model = unwrap_model(model)
        self.module = self._copy_of_model()
        self.num_updates = 0
        self.last_decay = self.decay
        self._backups: list[Tensor | None] | None = None
        self._build_groups()

    def _copy_of_model(self) -> nn.Module:
        ema_module = copy.deepcopy(self.model)
        for parameter in ema_module.parameters():
            parameter.grad = None
            parameter.requires_grad_(False)
        if self.device is not None:
            ema_module.to(self.device)
        return ema_module.eval()

    def _build_groups(self) -> None:
        """Pair EMA and model tensors by name and group them for the fused kernels (done once)."""
        model_tensors = tracked_tensors(self.model, self.all_parameters, self.all_buffers)
        ema_by_name = named_model_tensors(self.module)
        self.tensor_names = list(model_tensors)
        self._ema_tensors = [ema_by_name[name] for name in self.tensor_names]
        self._model_tensors = list(model_tensors.values())
        self._groups: list[TensorGroup | FlatGroup] = []
        rest_ema, rest_model = self._ema_tensors, self._model_tensors
        if self.flatten_model:
            self._groups, rest_ema, rest_model = split_packable(
                rest_ema, rest_model, named_model_tensors(self.model).values()
            )
        if rest_model:
            self._groups += group_tensor_pairs(rest_ema, rest_model, self.foreach)
        # Recorded after packing, which gives tensors new addresses.
        self._sentinels = LayoutSentinels(self._model_tensors, self._ema_tensors)

    def refresh(self) -> None:
        """Re-read the model's tensors after replacing some by hand (`p.data = ...`, `load_state_dict(assign=True)`).

        Moving or converting the whole model (`model.to(...)`) is noticed without this.
        """
        self._follow_model()

    def _follow_model(self) -> None:
        """The model was moved or cast after construction: move the EMA along (if it follows) and regroup."""
        if self.device is None:
            with torch.no_grad():
                for name, model_tensor in tracked_tensors(self.model, self.all_parameters, self.all_buffers).items():
                    owner_name, _, leaf = name.rpartition(".")
                    owner = self.module.get_submodule(owner_name)
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

        `decay` overrides the configured decay for this update (for schedules).
        """
        if decay is None:
            decay = self.decay
        else:
            decay = check_decay(decay, "decay")
        if self._backups is not None:
            raise RuntimeError("update() called inside use_ema_weights(): the model holds the EMA weights")
        # A few `data_ptr()` looks (not one per tensor) catch `model.to(...)` or `ema.module.to(...)`.
        if self._sentinels.moved():
            self._follow_model()
        weight = 1.0 - decay
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

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        for ema_tensor, model_tensor in zip(self._ema_tensors, self._model_tensors):
            ema_tensor.copy_(model_tensor)
        self.num_updates = 0
        self.last_decay = self.decay

    def _matching_tensors(self, module: nn.Module, purpose: str) -> list[Tensor]:
        """`module`'s tensors in tracking order, or a ValueError listing every name/shape mismatch."""
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
        targets = self._model_tensors if model is None else self._matching_tensors(model, "copy_to")
        for target, ema_tensor in zip(targets, self._ema_tensors):
            target.copy_(ema_tensor)

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """Set the EMA weights from another module with the same names and shapes (e.g. an earlier EMA)."""
        sources = self._matching_tensors(module, "copy_from")
        for ema_tensor, source in zip(self._ema_tensors, sources):
            ema_tensor.copy_(source)

    @torch.no_grad()
    def _swap_in(self) -> None:
        backups: list[Tensor | None] = []
        try:
            for model_tensor, ema_tensor in zip(self._model_tensors, self._ema_tensors):
                if model_tensor.dtype == ema_tensor.dtype:
                    # Exchange the two: exact both ways, extra memory of one tensor at a time.
                    held = model_tensor.clone()
                    model_tensor.copy_(ema_tensor)
                    ema_tensor.copy_(held)
                    backups.append(None)
                else:
                    # A cast would lose EMA precision on the way back, so keep the model's bits instead.
                    backups.append(model_tensor.clone())
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
        """Everything needed to continue exactly: EMA tensors by name, update count, decay, config."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "tensors": dict(zip(self.tensor_names, self._ema_tensors)),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "last_decay": self.last_decay,
            "all_parameters": self.all_parameters,
            "all_buffers": self.all_buffers,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from `state_dict()`; everything is checked before anything is written."""
        tensors, num_updates, last_decay = check_state_dict(
            state_dict, dict(zip(self.tensor_names, self._ema_tensors)), self.decay
        )
        for name, ema_tensor in zip(self.tensor_names, self._ema_tensors):
            ema_tensor.copy_(tensors[name])
        self.num_updates = num_updates
        self.last_decay = last_decay

    def save(self, path: str | os.PathLike) -> Path:
        """Write `state_dict()` to `path` atomically (a kill mid-write leaves the previous file intact)."""
        return atomic_save(self.state_dict(), path)

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
            f"num_updates={self.num_updates}, device={self.device}, flatten_model={self.flatten_model})"
        )
