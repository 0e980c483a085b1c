"""fastai and post-hoc EMA: `PostHocEMACallback` (K power-function EMAs with snapshots) and `learn.posthoc_sweep`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .._extras import missing_extra

try:
    from fastai.learner import Learner
    from fastcore.basics import patch, store_attr
except ModuleNotFoundError as error:
    raise missing_extra(error, "fastai", "fastema.fastai (the fastai callbacks)") from error

from ..core.parallel import unwrap_model
from ..core.tracking import tensor_slots
from ..posthoc import PostHocEMA, synthesize
from .callbacks import AveragingCallback, _resumed_epoch

__all__ = ["PostHocEMACallback", "posthoc_sweep"]

POSTHOC_CHECKPOINT_FORMAT = "fastema.PostHocEMACallback"


class PostHocEMACallback(AveragingCallback):
    "Post-hoc EMA (EDM2): K power-function EMAs with snapshots; choose the EMA length after fit, `learn.posthoc_sweep`"

    checkpoint_format = POSTHOC_CHECKPOINT_FORMAT

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),  # the relative EMA widths to track
        snapshot_every: int | None = None,  # snapshot every N optimizer steps; None: at the end of each epoch
        snapshot_dir: str | Path = "posthoc",  # where snapshots go (relative to `learn.path`)
        validate_sigma_rel: float | None = None,  # validate with this tracked EMA; None: with the model's weights
        start: int | float = 0,  # when the EMAs start: float = fraction of training steps, int = epoch index
        skip_ema: bool = True,  # no update when a callback cancelled the step or batch (no optimizer step happened)
        snapshot_dtype: torch.dtype | None = None,  # dtype of the snapshots' floating tensors; None = the EMA's
        all_parameters: bool = False,  # also average parameters without `requires_grad`
        all_buffers: bool = False,  # also average non-persistent buffers
        foreach: bool | None = None,  # fused multi-tensor copies (True), loops (False), fastest (None)
        flatten_model: bool = False,  # pack the model's tracked tensors into flat buffers
        ema_dtype: torch.dtype | None = None,  # dtype of the EMAs' floating tensors, e.g. torch.float32 for bf16
        update_every: int = 1,  # update every N-th optimizer step only
    ):
        # Everything PostHocEMA checks, checked now rather than at fit.
        PostHocEMA(
            nn.Linear(1, 1),
            sigma_rels,
            snapshot_every=snapshot_every,
            snapshot_dir=snapshot_dir,
            snapshot_dtype=snapshot_dtype,
            update_every=update_every,
            all_parameters=all_parameters,
            all_buffers=all_buffers,
            foreach=foreach,
            flatten_model=flatten_model,
            ema_dtype=ema_dtype,
        )
        if validate_sigma_rel is not None and not any(
            math.isclose(validate_sigma_rel, value, rel_tol=1e-9) for value in sigma_rels
        ):
            raise ValueError(f"Invalid validate_sigma_rel: {validate_sigma_rel}; expected None or one of {sigma_rels}")
        self.sigma_rels, self.snapshot_every, self.snapshot_dir = list(sigma_rels), snapshot_every, Path(snapshot_dir)
        store_attr(
            "validate_sigma_rel,snapshot_dtype,all_parameters,all_buffers,foreach,flatten_model,ema_dtype,update_every"
        )
        self._init_events(start, skip_ema)

    @property
    def snapshot_path(self) -> Path:
        """Where the snapshots of this Learner go: `snapshot_dir`, relative to `learn.path` unless absolute."""
        return self.snapshot_dir if self.snapshot_dir.is_absolute() else Path(self.learn.path) / self.snapshot_dir

    @property
    def _engine(self) -> PostHocEMA:
        return cast(PostHocEMA, AveragingCallback._engine.fget(self))  # type: ignore[attr-defined]  # a property

    def _new_engine(self, flatten_model: bool | None = None) -> PostHocEMA:
        return PostHocEMA(
            self.learn.model,
            self.sigma_rels,
            snapshot_every=self.snapshot_every,
            snapshot_dir=self.snapshot_path,
            snapshot_dtype=self.snapshot_dtype,
            update_every=self.update_every,
            all_parameters=self.all_parameters,
            all_buffers=self.all_buffers,
            foreach=self.foreach,
            flatten_model=self.flatten_model if flatten_model is None else flatten_model,
            ema_dtype=self.ema_dtype,
        )

    def _start_fit(self, loaded_engine, loaded):
        engine = self._new_engine()
        started = False
        if loaded is not None and loaded_engine is not None and _resumed_epoch(self.learn) > 0:
            engine.load_state_dict(loaded_engine.state_dict())  # `learn.load` then `fit(..., start_epoch=k)`
            started = loaded["started"]
        # A fresh run into a directory that holds another run's snapshots would mix the two: refuse now.
        engine.check_snapshot_dir()
        return engine, started

    def _validates_with_ema(self) -> bool:
        return self.validate_sigma_rel is not None

    def _update(self) -> None:
        self._engine.update()

    def after_epoch(self):
        if self._active and self._started and self.snapshot_every is None and self._engine.num_updates:
            self._engine.snapshot()

    def _ema_weights(self):
        return self._engine.use_ema_weights(cast(float, self.validate_sigma_rel))

    def _finish_fit(self) -> None:
        engine = self._engine
        if self._started and engine.num_updates and engine.last_snapshot_step != engine.last_update_step:
            engine.snapshot()  # the end of training is always a snapshot: the sweep's default step
        self.learn.posthoc_ema = engine

    def restore_ema_checkpoint(self, state: dict) -> None:
        "Install a checked checkpoint; `fit(..., start_epoch=k)` continues it"
        self.engine = self._new_engine()
        self.engine.load_state_dict(state["engine"])
        self._loaded = {"started": state["started"]}
        self.learn.posthoc_ema = self.engine


@patch
def posthoc_sweep(
    self: Learner,
    sigma_rels: Sequence[float],  # the relative EMA widths to synthesize and validate
    step: int | None = None,  # the snapshot step to synthesize at; None: the last
    plot: str | Path | None = None,  # write a PNG of every metric against sigma_rel here
    snapshot_dir: str | Path | None = None,  # default: the PostHocEMACallback's
) -> list[dict[str, float]]:
    "Synthesize the EMA of each `sigma_rel` from the snapshots and validate it with the metrics; the model is restored"
    if snapshot_dir is None:
        callbacks = [callback for callback in self.cbs if isinstance(callback, PostHocEMACallback)]
        if not callbacks:
            raise ValueError("Invalid snapshot_dir: None, and this Learner has no PostHocEMACallback to take it from")
        snapshot_dir = callbacks[0].snapshot_path
    model = unwrap_model(self.model)
    names = ["valid_loss"] + [metric.name for metric in self.metrics]  # what `validate()` returns, in order
    # Every tensor by state-dict name, non-persistent buffers included (all_buffers=True snapshots them).
    targets = {name: tensor for name, (_, tensor) in tensor_slots(model).items()}
    own = {name: tensor.detach().clone() for name, tensor in targets.items()}
    rows = []
    try:
        for sigma_rel in sigma_rels:
            synthesized = synthesize(snapshot_dir, sigma_rel, step)
            with torch.no_grad():
                for name, tensor in synthesized.items():
                    targets[name].copy_(tensor)
            with self.no_bar():
                values = self.validate()
            rows.append({"sigma_rel": float(sigma_rel), **dict(zip(names, map(float, values)))})
    finally:
        with torch.no_grad():
            for name, tensor in own.items():
                targets[name].copy_(tensor)
    if plot is not None:
        _plot_sweep(rows, Path(plot))
    return rows


def _plot_sweep(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [name for name in rows[0] if name != "sigma_rel"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    sigmas = [row["sigma_rel"] for row in rows]
    for axis, metric in zip(axes[0], metrics):
        axis.plot(sigmas, [row[metric] for row in rows], "o-")
        axis.set(xlabel="sigma_rel (EMA length relative to training)", ylabel=metric, title=f"{metric} vs sigma_rel")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
