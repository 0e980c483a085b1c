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
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.checkpoint import atomic_save, load_into, read_checkpoint, save_on_rank_0
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
from ..core.parallel import is_sharded, local_part, rank, unwrap_model
from ..core.plan import Plan, kernel_steps, pack_model
from ..core.steps import StackedStep, Step, fused_step_supported, is_averaged, layout_strides
from ..core.swap import SwapGuard
from ..core.tracking import (
    IdentityWatch,
    Placement,
    changes,
    copy_of_model,
    tensor_slots,
    tracked_parameters,
    tracked_tensors,
    watch_module_changes,
)

__all__ = ["PostHocEMA", "gamma_to_sigma_rel", "sigma_rel_to_gamma", "synthesize"]

# gamma = 0, a uniform average. We keep gamma >= 0 (the profile grows or stays flat over training): the
# width is not monotonic below gamma = 0 (it peaks at about 0.3003 near gamma = -0.38).
MAX_SIGMA_REL = math.sqrt(1 / 12)
STATE_FORMAT = "fastema.PostHocEMA"
SNAPSHOT_FORMAT = "fastema.PostHocSnapshot"
VERSION = 1
_SNAPSHOT_NAME = re.compile(r"^posthoc-step(\d+)-ema(\d+)\.pt$")


# ---- the profiles -------------------------------------------------------------------------------------


def check_sigma_rel(value: object, name: str = "sigma_rel") -> float:
    """A relative EMA width in (0, sqrt(1/12)) (power-function EMAs with gamma > 0), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r}; expected a float in (0, {MAX_SIGMA_REL:.4f})")
    value = float(value)
    if not 0.0 < value < MAX_SIGMA_REL:
        raise ValueError(f"Invalid {name}: {value}; expected a float in (0, {MAX_SIGMA_REL:.4f}) (sqrt(1/12))")
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function EMA with exponent `gamma`: sqrt((g+1) / ((g+2)^2 (g+3)))."""
    if not gamma > -1:
        raise ValueError(f"Invalid gamma: {gamma}; expected a number > -1")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function EMA of relative width `sigma_rel`.

    The largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0, found by bisection
    on (0, inf), where the width decreases monotonically from sqrt(1/12) to 0.
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    low, high = 0.0, max(10.0, 4.0 / sigma_rel)
    while gamma_to_sigma_rel(high) > sigma_rel:
        high *= 2
    for _ in range(200):  # to the last bit
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if gamma_to_sigma_rel(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def power_decay(step: int, gamma: float, update_every: int = 1) -> float:
    """The decay of the update at optimizer step `step` (counted from 1): (1 - N/step) ** (gamma + 1)."""
    return (1.0 - update_every / step) ** (gamma + 1)


def profile_products(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> = integral over [0, min(t_a, t_b)] of the two profiles p(tau) = (g+1) tau^g / t^(g+1).

    Closed form: (g_a+1)(g_b+1) / (g_a+g_b+1) * min^(g_a+g_b+1) / (t_a^(g_a+1) t_b^(g_b+1)); broadcasts.
    """
    ratio = t_a / t_b
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


def snapshot_coefficients(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> Tensor:
    """Weights x of the snapshots (taken at `steps` with `gammas`) whose combination best matches the EMA
    profile (`step`, `gamma`): the least-squares solution of A x = b (Gram matrix of the snapshot
    profiles, their products with the target), normalised to sum to 1; float64."""
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    gram = profile_products(t[:, None], g[:, None], t[None, :], g[None, :])
    target = profile_products(
        t, g, torch.tensor(float(step), dtype=torch.float64), torch.tensor(gamma, dtype=torch.float64)
    )
    solution = torch.linalg.lstsq(gram, target[:, None], driver="gelsd").solution[:, 0]
    return solution / solution.sum()


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
            raise ValueError("Invalid model: sharded (FSDP2) models are not supported by PostHocEMA yet")
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
        self._build(tracked)

    @property
    def num_emas(self) -> int:
        return len(self.sigma_rels)

    def _build(self, tracked: dict[str, Tensor]) -> None:
        """The K stacked buffers, the K EMA modules viewing them, and the update's steps."""
        placement = Placement(None, self.ema_dtype)
        # The layout the EMAs are built in: the model's tensors must keep it (their values are read in memory order).
        self._built_layouts = {name: _layout(tensor) for name, tensor in tracked.items()}
        averaged = [name for name, tensor in tracked.items() if is_averaged(tensor)]
        copied = [name for name in tracked if name not in set(averaged)]
        # One stack per (device, EMA dtype): row k is EMA k, its columns the model's elements in memory order.
        groups: dict[tuple, list[str]] = {}
        for name in averaged:
            tensor = tracked[name]
            groups.setdefault((tensor.device, placement.dtype_for(tensor)), []).append(name)
        self._views: list[dict[str, Tensor]] = [{} for _ in self.sigma_rels]
        self._groups: list[tuple[Tensor, list[str], list[int]]] = []
        for (device, dtype), names in groups.items():
            offsets, total = [], 0
            for name in names:
                offsets.append(total)
                total += tracked[name].numel()
            stack = torch.empty(self.num_emas, total, device=device, dtype=dtype)
            for name, offset in zip(names, offsets):
                tensor = tracked[name]
                for index, views in enumerate(self._views):
                    view = stack.as_strided(tensor.shape, layout_strides(tensor), index * total + offset)
                    view.copy_(tensor.detach())
                    views[name] = view
            self._groups.append((stack, names, offsets))
        self._copies = {name: placement.twin(tracked[name]) for name in copied}  # counts: copied, one for all K
        self._modules = [
            copy_of_model(self.model, tracked, placement, twins={**views, **self._copies}) for views in self._views
        ]
        self._plan_steps()

    def _plan_steps(self) -> None:
        """The update's steps, from the model's tensors as they are now."""
        slots = tensor_slots(self.model)
        model_tensors = {name: local_part(slots[name][1]) for name in self.tensor_names}
        steps: list[Step] = []
        for stack, names, offsets in self._groups:
            fused = fused_step_supported(stack.device, stack.dtype) if self.foreach is None else self.foreach
            pieces, piece_offsets = [model_tensors[name] for name in names], list(offsets)
            packed = False
            if self.flatten_model:
                every_tensor = [local_part(tensor) for _, tensor in slots.values()]
                pieces, piece_offsets = pack_model(pieces, piece_offsets, every_tensor)
                packed = len(pieces) < len(names)
            # A packed buffer is read, not the tensors: `p.data = ...` must be noticed on its storage's use count.
            steps.append(StackedStep(stack, pieces, piece_offsets, fused, watch_storage=packed))
        if self._copies:
            names = list(self._copies)
            steps += kernel_steps(
                [self._copies[name] for name in names],
                [model_tensors[name] for name in names],
                [slots[name][0].is_parameter for name in names],
                self.foreach,
            )
        self._plan = Plan(steps)
        self._stacked = [step for step in steps if isinstance(step, StackedStep)]
        self._model_tensors = model_tensors
        first = self.tensor_names[0]  # watched by identity: `fully_shard` after construction is refused
        self._sentinel = IdentityWatch(self.model, *slots[first])
        self._signature = _layout_signature(model_tensors)
        self._seen_changes = changes()

    def _ensure_current(self) -> None:
        """Follow the model: new tensors or storage are re-read; a change of shape, memory layout or device raises."""
        if self._seen_changes == changes() and not self._plan.stale() and not self._sentinel.moved():
            return
        slots = tensor_slots(self.model)
        missing = [name for name in self.tensor_names if name not in slots]
        if missing:
            raise RuntimeError(f"The model no longer has the tensors {missing} that this PostHocEMA averages")
        if any(is_sharded(slots[name][1]) for name in self.tensor_names):
            raise RuntimeError(
                "The model was sharded (FSDP2 fully_shard) after this PostHocEMA was built; PostHocEMA does not "
                "support sharded models yet"
            )
        current = {name: local_part(slots[name][1]) for name in self.tensor_names}
        # Compared with the layout the EMAs were built in, not with the tensor objects: `model.to(...)`
        # and `p.data = ...` change a Parameter's data and keep the object.
        for name, tensor in current.items():
            if _layout(tensor) != self._built_layouts[name]:
                raise RuntimeError(
                    f"The model's tensor {name} changed shape, memory layout or device; PostHocEMA follows new "
                    "tensors and dtypes only. Build it after moving or converting the model."
                )
        if _layout_signature(current) == self._signature and all(
            current[name] is self._model_tensors[name] for name in self.tensor_names
        ):
            for stacked in self._stacked:
                stacked.rebaseline()  # a transient view of a packed buffer, nothing moved
            self._seen_changes = changes()
            return
        self._plan = Plan([])  # drop the old steps (and their hold on packed buffers) before planning anew
        self._stacked = []
        self._plan_steps()

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
        self._ensure_current()
        weights = [1.0 - decay for decay in self.decays(step)]
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for stacked in self._stacked:
                stacked.set_weights(weights)
            self._plan.step(0.0)
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
        self._ensure_current()
        return self._modules[self._index(sigma_rel)]

    def ema_tensors(self, sigma_rel: float) -> dict[str, Tensor]:
        """The tracked tensors of one EMA by state-dict name (views; counts shared by all)."""
        self._swap.check_outside("ema_tensors()")
        self._latch.check()
        return self._ema_views(self._index(sigma_rel))

    def _ema_views(self, index: int) -> dict[str, Tensor]:
        views = self._views[index]
        return {name: views[name] if name in views else self._copies[name] for name in self.tensor_names}

    @property
    def ema_weights_in_use(self) -> bool:
        """Whether an EMA is swapped into the model right now (inside `use_ema_weights`)."""
        return self._swap.active

    @contextmanager
    def use_ema_weights(self, sigma_rel: float) -> Iterator[nn.Module]:
        """Temporarily put one tracked EMA into the live model, in place; the model's weights come back exactly."""
        self._swap.check_outside("use_ema_weights()")
        self._latch.check()
        self._ensure_current()
        views = self._ema_views(self._index(sigma_rel))
        slots = tensor_slots(self.model)
        self._swap.enter(
            [(name, self._model_tensors[name], views[name], slots[name][0].is_parameter) for name in self.tensor_names]
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
        if self.snapshot_dir.is_dir():
            others = sorted({header.run for header in _read_headers(self.snapshot_dir)} - {self.run_id})
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
        layout = [(name, tuple(self._model_tensors[name].shape)) for name in self.tensor_names]
        paths = []
        for index, (sigma_rel, gamma) in enumerate(zip(self.sigma_rels, self.gammas)):
            path = self.snapshot_dir / f"posthoc-step{step:010d}-ema{index}.pt"
            paths.append(path)
            if rank() != 0:
                continue
            tensors = {}
            for name, tensor in self._ema_views(index).items():
                dtype = self.snapshot_dtype if self.snapshot_dtype is not None and tensor.is_floating_point() else None
                tensors[name] = tensor.detach().to("cpu", dtype or tensor.dtype, copy=True)
            atomic_save(
                {
                    "format": SNAPSHOT_FORMAT,
                    "version": VERSION,
                    "run": self.run_id,
                    "step": step,
                    "gamma": gamma,
                    "sigma_rel": sigma_rel,
                    "update_every": self.update_every,
                    "layout": layout,
                    "tensors": tensors,
                },
                path,
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
            "emas": [self._ema_views(index) for index in range(self.num_emas)],
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
                for name, tensor in self._ema_views(index).items():
                    value = saved.get(name) if isinstance(saved, dict) else None
                    if not isinstance(value, Tensor) or value.shape != tensor.shape or value.dtype != tensor.dtype:
                        problems.append(f"{name} (sigma_rel {sigma_rel}): missing or of another shape or dtype")
                if isinstance(saved, dict) and set(saved) - set(self.tensor_names):
                    problems.append(f"unexpected keys {sorted(set(saved) - set(self.tensor_names))}")
        if problems or not isinstance(emas, list):
            raise ValueError("Invalid state_dict for this PostHocEMA (nothing was loaded): " + "; ".join(problems))
        for index, saved in enumerate(emas):
            for name, tensor in self._ema_views(index).items():
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

    def __repr__(self) -> str:
        return (
            f"PostHocEMA(sigma_rels={self.sigma_rels}, gammas={[round(g, 3) for g in self.gammas]}, "
            f"tensors={len(self.tensor_names)}, num_steps={self.num_steps}, snapshot_every={self.snapshot_every})"
        )


def _layout(tensor: Tensor) -> tuple:
    return tuple(tensor.shape), layout_strides(tensor), tensor.device


def _layout_signature(tensors: dict[str, Tensor]) -> list[tuple]:
    return [(tensor.data_ptr(), tensor.dtype, tensor.device, layout_strides(tensor)) for tensor in tensors.values()]


# ---- synthesis -----------------------------------------------------------------------------------------


class SnapshotHeader(NamedTuple):
    path: Path
    run: str
    step: int
    gamma: float
    layout: tuple


def _read_headers(snapshot_dir: Path) -> list[SnapshotHeader]:
    """The header of every snapshot file in `snapshot_dir`, checked (tensors memory-mapped, not read)."""
    headers = []
    for path in sorted(snapshot_dir.iterdir()):
        if not _SNAPSHOT_NAME.match(path.name):
            continue
        state = read_checkpoint(path, mmap=True)  # raises, naming the file, if it is damaged
        if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT or state.get("version") != VERSION:
            raise ValueError(f"Invalid snapshot {path}: not a {SNAPSHOT_FORMAT} v{VERSION} file")
        step = state.get("step")
        if not isinstance(step, int) or step <= 0 or not isinstance(state.get("run"), str):
            raise ValueError(f"Invalid snapshot {path}: its step {step!r} is not an int > 0, or it names no run")
        layout = tuple(tuple(entry) for entry in state["layout"])
        headers.append(SnapshotHeader(path, state["run"], step, float(state["gamma"]), layout))
        del state
    return headers


def _snapshot_headers(snapshot_dir: Path) -> list[SnapshotHeader]:
    """The snapshots of one run in `snapshot_dir`, sorted by step; anything else raises."""
    if not snapshot_dir.is_dir():
        raise FileNotFoundError(f"No snapshot directory at {snapshot_dir}")
    headers = _read_headers(snapshot_dir)
    if not headers:
        raise ValueError(f"Invalid snapshot_dir: {snapshot_dir} holds no posthoc-step*-ema*.pt snapshots")
    if len({header.run for header in headers}) > 1:
        raise ValueError(
            f"Invalid snapshot_dir: {snapshot_dir} mixes snapshots of different training runs; keep one run per "
            "directory"
        )
    if len({header.layout for header in headers}) > 1:
        raise ValueError(
            f"Invalid snapshot_dir: {snapshot_dir} mixes snapshots of different models (tensor names or shapes "
            "differ); keep one training run per directory"
        )
    return sorted(headers, key=lambda header: header.step)


def synthesize(snapshot_dir: str | os.PathLike, sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The EMA of relative width `sigma_rel` at `step` (default: the last snapshot's), from the snapshots.

    Keyed like `model.state_dict()` (the averaged tensors; counts such as `num_batches_tracked` from
    the latest snapshot used). Only snapshots taken at or before `step` take part; the combination
    is computed in float64, one snapshot in memory at a time.
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    headers = _snapshot_headers(Path(snapshot_dir))
    steps = sorted({header.step for header in headers})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"Invalid step: {step}; {snapshot_dir} has snapshots at steps {steps}")
    used = [header for header in headers if header.step <= step]
    coefficients = snapshot_coefficients(
        [header.step for header in used], [header.gamma for header in used], step, sigma_rel_to_gamma(sigma_rel)
    )
    totals: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    latest: dict[str, Tensor] = {}
    for header, coefficient in zip(used, coefficients.tolist()):
        state = read_checkpoint(header.path, mmap=True)
        assert isinstance(state, dict)
        for name, tensor in state["tensors"].items():
            if is_averaged(tensor):  # floating and complex tensors, summed in 64 bits
                wide = tensor.to(torch.complex128 if tensor.is_complex() else torch.float64, copy=True)
                contribution = wide.mul_(coefficient)
                totals[name] = contribution if name not in totals else totals[name].add_(contribution)
                dtypes[name] = tensor.dtype
            else:
                latest[name] = tensor.clone()  # sorted by step: the last one seen is the latest (copied off the map)
        del state
    return {**{name: total.to(dtypes[name]) for name, total in totals.items()}, **latest}
