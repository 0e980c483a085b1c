"""Post-hoc EMA: choose the EMA length after training (Karras et al., "Analyzing and Improving the
Training Dynamics of Diffusion Models", EDM2, CVPR 2024).

During training, `PostHocEMA` keeps K *power-function* EMAs of the model: the EMA with exponent
`gamma` averages the weights seen so far with weights proportional to `tau ** gamma`, which its
per-update decay `(1 - N / t) ** (gamma + 1)` achieves (`t` = optimizer steps since the start,
`N` = `update_every`; the first update copies the model). Users think in `sigma_rel`, the width
of that averaging profile relative to the training time. Every `snapshot_every` steps it writes
the K EMAs to disk. After training, `synthesize` builds the EMA of any `sigma_rel` (at any
snapshot step) as the least-squares combination of the snapshots whose profiles best match
the wanted one, reading one snapshot at a time.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.checkpoint import load_into, save_on_rank_0
from ..core.checks import (
    check_device,
    check_ema_dtype,
    check_flag,
    check_flatten_model,
    check_foreach,
    check_update_every,
)
from ..core.hooks import Attachments, RemovableHandle
from ..core.latch import FailureLatch
from ..core.parallel import is_sharded, rank, unwrap_model
from ..core.swap import SwapGuard
from ..core.tracking import (
    tensor_slots,
    tracked_parameters,
    tracked_tensors,
    watch_module_changes,
)
from .profiles import check_sigma_rel, gamma_to_sigma_rel, power_decay, sigma_rel_to_gamma
from .snapshots import VERSION, other_runs, snapshot_path, synthesize, write_snapshot
from .stacks import StackedEMAs, migrate_v01

__all__ = ["PostHocEMA", "gamma_to_sigma_rel", "sigma_rel_to_gamma", "synthesize"]

STATE_FORMAT = "fastema.PostHocEMA"


# ---- tracking the EMAs ---------------------------------------------------------------------------------


class PostHocEMA:
    """K power-function EMAs of a model, updated in one pass over it, with snapshots for `synthesize`.

    `sigma_rels` are the relative widths tracked (EDM2 uses 0.05 and 0.10); `update()` after each
    optimizer step moves all of them (one read of the model whatever K: the EMAs of one tensor
    element sit side by side in one buffer). Every `snapshot_every` optimizer steps (and on
    `snapshot()`), each EMA is written to `snapshot_dir` (atomically, rank 0 only) with the step
    count, its `gamma` and `sigma_rel`, in `snapshot_dtype` (default: the EMA's dtype).
    `module_for(sigma_rel)` is the EMA model of one of them; `use_ema_weights(sigma_rel)` swaps
    it into the live model; `state_dict()`/`save()` resume exactly. Options as for `ModelEMA`:
    `all_parameters`, `all_buffers`, `foreach`, `flatten_model` (the model packed into flat
    buffers), `ema_dtype` (e.g. float32 EMAs of a bfloat16 model), `update_every`.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),  # the relative EMA widths to track
        *,
        snapshot_every: int | None = None,  # write snapshots every N optimizer steps; None: on snapshot() only
        snapshot_dir: str | os.PathLike | None = None,  # where snapshots go (needed with snapshot_every)
        snapshot_dtype: torch.dtype | None = None,  # dtype of the snapshots' floating tensors; None = the EMA's
        update_every: int = 1,  # update on every N-th call of update() only, with the decay of step t
        all_parameters: bool = False,  # also average parameters without `requires_grad`
        all_buffers: bool = False,  # also average non-persistent buffers
        foreach: bool | None = None,  # fused multi-tensor copies (True), loops (False), fastest (None)
        flatten_model: bool = False,  # pack the model's tracked tensors into flat buffers (fewer, larger copies)
        ema_dtype: torch.dtype | None = None,  # dtype of the EMAs' floating tensors; None = the model's
        device: torch.device | str | None = None,  # must be None: the EMAs live beside the model
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
            raise TypeError(f"Invalid sigma_rels: {sigma_rels!r}; expected a non-empty sequence of floats")
        self.sigma_rels = [check_sigma_rel(value, "sigma_rels") for value in sigma_rels]
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"Invalid sigma_rels: {list(sigma_rels)}; expected distinct values")
        self.gammas = [sigma_rel_to_gamma(value) for value in self.sigma_rels]
        if snapshot_every is not None:
            snapshot_every = check_update_every(snapshot_every, "snapshot_every")
            if snapshot_dir is None:
                raise ValueError(
                    "Invalid snapshot_dir: None, but snapshot_every is set; give the directory to write to"
                )
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.snapshot_dtype = check_ema_dtype(snapshot_dtype, "snapshot_dtype")
        self.update_every = check_update_every(update_every)
        if snapshot_every is not None and snapshot_every % self.update_every:
            raise ValueError(
                f"Invalid snapshot_every: {snapshot_every}; expected a multiple of update_every={self.update_every} "
                "(a snapshot is taken right after an update)"
            )
        self.snapshot_every = snapshot_every
        self.all_parameters = check_flag(all_parameters, "all_parameters")
        self.all_buffers = check_flag(all_buffers, "all_buffers")
        self.foreach = check_foreach(foreach)
        self.flatten_model = check_flatten_model(flatten_model, self.foreach)
        self.ema_dtype = check_ema_dtype(ema_dtype)
        if check_device(device, "device") is not None:
            raise ValueError(f"Invalid device: {device!r}; PostHocEMA keeps its EMAs beside the model (device=None)")
        watch_module_changes()
        self.model = unwrap_model(model)
        tracked = tracked_tensors(self.model, self.all_parameters, self.all_buffers)
        if any(is_sharded(tensor) for tensor in tracked.values()):
            raise ValueError("Invalid model: sharded (FSDP2, ZeRO-3) models are not supported by PostHocEMA yet")
        self.tensor_names = list(tracked)
        self.num_steps = 0  # calls of update() (optimizer steps)
        self.num_updates = 0
        # Names this run in its snapshots: synthesize refuses to combine snapshots of different runs.
        self.run_id = uuid.uuid4().hex
        self.last_snapshot_step: int | None = None
        self._snapshot_dir_checked = False
        self._swap = SwapGuard()
        self._latch = FailureLatch("load()/load_state_dict() (or build a new PostHocEMA)")
        self._attachments = Attachments()
        self._stacks = StackedEMAs(
            self.model, tracked, len(self.sigma_rels), self.ema_dtype, self.foreach, self.flatten_model
        )

    @property
    def num_emas(self) -> int:
        return len(self.sigma_rels)

    # ---- updating ------------------------------------------------------------------------------------

    def decays(self, step: int) -> list[float]:
        """The K decays of the update at optimizer step `step`."""
        return [power_decay(step, gamma, self.update_every) for gamma in self.gammas]

    def update(self) -> None:
        """Move the K EMAs toward the model; call after each optimizer step. Writes a snapshot when one is due."""
        self._swap.check_outside("update()")
        self._latch.check()
        self._attachments.check_manual_update()
        step = self.num_steps + 1
        if step % self.update_every:
            self.num_steps = step
            return
        self._stacks.ensure_current()
        weights = [1.0 - decay for decay in self.decays(step)]
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._stacks.step(weights)
        except Exception as error:  # some EMAs (or some of their elements) moved, others not: none is usable
            self._latch.fail(error)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        self.num_steps = step
        self.num_updates += 1
        if self.snapshot_every is not None and step % self.snapshot_every == 0:
            self.snapshot()

    @property
    def last_update_step(self) -> int:
        """The optimizer step of the last update (updates happen on steps that are multiples of update_every)."""
        return self.num_steps - self.num_steps % self.update_every

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call `update()` after every step `optimizer` really takes (see `ModelEMA.attach`)."""
        return self._attachments.attach(self, optimizer, self.update, tracked_parameters(self.model, self.tensor_names))

    # ---- reading -------------------------------------------------------------------------------------

    def _index(self, sigma_rel: float) -> int:
        for index, tracked in enumerate(self.sigma_rels):
            if math.isclose(tracked, sigma_rel, rel_tol=1e-9):
                return index
        raise ValueError(f"Invalid sigma_rel: {sigma_rel}; this PostHocEMA tracks {self.sigma_rels}")

    def module_for(self, sigma_rel: float) -> nn.Module:
        """The EMA model of one tracked `sigma_rel` (eval mode, no gradients; its tensors view the shared buffer)."""
        self._swap.check_outside("module_for()")
        self._latch.check()
        self._stacks.ensure_current()
        return self._stacks.modules[self._index(sigma_rel)]

    def ema_tensors(self, sigma_rel: float) -> dict[str, Tensor]:
        """The tracked tensors of one EMA by state-dict name (views; counts shared by all)."""
        self._swap.check_outside("ema_tensors()")
        self._latch.check()
        return self._stacks.views_of(self._index(sigma_rel))

    @property
    def ema_weights_in_use(self) -> bool:
        """Whether an EMA is swapped into the model right now (inside `use_ema_weights`)."""
        return self._swap.active

    @contextmanager
    def use_ema_weights(self, sigma_rel: float) -> Iterator[nn.Module]:
        """Temporarily put one tracked EMA into the live model, in place; the model's weights come back exactly."""
        self._swap.check_outside("use_ema_weights()")
        self._latch.check()
        self._stacks.ensure_current()
        views = self._stacks.views_of(self._index(sigma_rel))
        slots = tensor_slots(self.model)
        self._swap.enter(
            [
                (name, self._stacks.model_tensors[name], views[name], slots[name][0].is_parameter)
                for name in self.tensor_names
            ]
        )
        try:
            yield self.model
        finally:
            self._swap.exit()

    # ---- snapshots and state -------------------------------------------------------------------------

    def check_snapshot_dir(self) -> None:
        """Raise unless `snapshot_dir` holds no snapshots of another run (which synthesis would mix with this one's).

        Called before this PostHocEMA's first snapshot; call it yourself to refuse earlier (the
        fastai callback does, when fit begins).
        """
        if self.snapshot_dir is None or self._snapshot_dir_checked:
            return
        others = other_runs(self.snapshot_dir, self.run_id)
        if others:
            raise ValueError(
                f"Invalid snapshot_dir: {self.snapshot_dir} holds snapshots of another training run "
                f"({len(others)} other run id(s)); synthesis would mix them with this run's. Use an empty "
                "directory per run, delete the old snapshots, or resume that run (load_state_dict)."
            )
        self._snapshot_dir_checked = True

    def snapshot(self) -> list[Path]:
        """Write each EMA, as it stands, to `snapshot_dir` (rank 0 only); the paths written (or to be).

        Labelled with the step of the last update (with `update_every` > 1, not necessarily now).
        """
        if self.snapshot_dir is None:
            raise ValueError("Invalid snapshot_dir: None; give PostHocEMA(snapshot_dir=...) to write snapshots")
        self._swap.check_outside("snapshot()")
        self._latch.check()
        if self.num_updates == 0:
            raise RuntimeError("snapshot() before the first update(): there is no EMA to snapshot yet")
        if rank() == 0:
            self.check_snapshot_dir()
        step = self.last_update_step
        layout = [(name, tuple(self._stacks.model_tensors[name].shape)) for name in self.tensor_names]
        paths = []
        for index, (sigma_rel, gamma) in enumerate(zip(self.sigma_rels, self.gammas)):
            path = snapshot_path(self.snapshot_dir, step, index)
            paths.append(path)
            if rank() != 0:
                continue
            write_snapshot(
                path,
                self._stacks.views_of(index),
                {
                    "run": self.run_id,
                    "step": step,
                    "gamma": gamma,
                    "sigma_rel": sigma_rel,
                    "update_every": self.update_every,
                    "layout": layout,
                },
                self.snapshot_dtype,
            )
        self.last_snapshot_step = step
        return paths

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the K EMAs by name, the step and update counts, the config."""
        self._swap.check_outside("state_dict()")
        self._latch.check()
        return {
            "format": STATE_FORMAT,
            "version": VERSION,
            "run": self.run_id,
            "last_snapshot_step": self.last_snapshot_step,
            "sigma_rels": list(self.sigma_rels),
            "num_steps": self.num_steps,
            "num_updates": self.num_updates,
            "update_every": self.update_every,
            "snapshot_every": self.snapshot_every,
            "emas": [self._stacks.views_of(index) for index in range(self.num_emas)],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from `state_dict()`; everything is checked before anything is written."""
        self._swap.check_outside("load_state_dict()")
        problems = []
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("Invalid state_dict: not a fastema.PostHocEMA state")
        if state_dict.get("version") != VERSION:
            problems.append(f"version {state_dict.get('version')!r} != {VERSION}")
        if state_dict.get("sigma_rels") != self.sigma_rels:
            problems.append(f"sigma_rels {state_dict.get('sigma_rels')!r} != {self.sigma_rels}")
        if state_dict.get("update_every") != self.update_every:
            problems.append(f"update_every {state_dict.get('update_every')!r} != {self.update_every}")
        if state_dict.get("snapshot_every") != self.snapshot_every:
            problems.append(f"snapshot_every {state_dict.get('snapshot_every')!r} != {self.snapshot_every}")
        run, last_snapshot = state_dict.get("run"), state_dict.get("last_snapshot_step")
        if not isinstance(run, str) or not (last_snapshot is None or isinstance(last_snapshot, int)):
            problems.append("'run' or 'last_snapshot_step' missing or invalid")
        counts = (state_dict.get("num_steps"), state_dict.get("num_updates"))
        if not all(isinstance(count, int) and count >= 0 for count in counts):
            problems.append(f"counts {counts!r} are not non-negative ints")
        emas = state_dict.get("emas")
        if not isinstance(emas, list) or len(emas) != self.num_emas:
            problems.append(f"'emas' must be a list of {self.num_emas} dicts")
        else:
            for index, (sigma_rel, saved) in enumerate(zip(self.sigma_rels, emas)):
                for name, tensor in self._stacks.views_of(index).items():
                    value = saved.get(name) if isinstance(saved, dict) else None
                    if not isinstance(value, Tensor) or value.shape != tensor.shape or value.dtype != tensor.dtype:
                        problems.append(f"{name} (sigma_rel {sigma_rel}): missing or of another shape or dtype")
                if isinstance(saved, dict) and set(saved) - set(self.tensor_names):
                    problems.append(f"unexpected keys {sorted(set(saved) - set(self.tensor_names))}")
        if problems or not isinstance(emas, list):
            raise ValueError("Invalid state_dict for this PostHocEMA (nothing was loaded): " + "; ".join(problems))
        for index, saved in enumerate(emas):
            for name, tensor in self._stacks.views_of(index).items():
                tensor.copy_(saved[name])
        self.num_steps, self.num_updates = int(state_dict["num_steps"]), int(state_dict["num_updates"])
        self.run_id, self.last_snapshot_step = str(run), last_snapshot  # the same run continues
        self._snapshot_dir_checked = False
        self._latch.clear()

    def save(self, path: str | os.PathLike) -> Path:
        """Write `state_dict()` atomically (rank 0 only)."""
        self._swap.check_outside("save()")
        self._latch.check()
        return save_on_rank_0(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore from a file written by `save()`; a bad file changes nothing."""
        load_into(path, self.load_state_dict, "fastema.PostHocEMA")

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state if "_stacks" in state else migrate_v01(state))

    def __repr__(self) -> str:
        return (
            f"PostHocEMA(sigma_rels={self.sigma_rels}, gammas={[round(g, 3) for g in self.gammas]}, "
            f"tensors={len(self.tensor_names)}, num_steps={self.num_steps}, snapshot_every={self.snapshot_every})"
        )
