"""Post-hoc EMA snapshots on disk: writing one, reading their headers, and `synthesize` from them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.checkpoint import atomic_save, read_checkpoint
from ..core.steps import is_averaged
from .profiles import check_sigma_rel, sigma_rel_to_gamma, snapshot_coefficients

SNAPSHOT_FORMAT = "fastema.PostHocSnapshot"
VERSION = 1
_SNAPSHOT_NAME = re.compile(r"^posthoc-step(\d+)-ema(\d+)\.pt$")


def snapshot_path(snapshot_dir: Path, step: int, index: int) -> Path:
    """Where EMA `index`'s snapshot at optimizer step `step` goes."""
    return snapshot_dir / f"posthoc-step{step:010d}-ema{index}.pt"


def write_snapshot(
    path: Path,
    ema_tensors: dict[str, Tensor],
    header: dict[str, object],
    snapshot_dtype: torch.dtype | None,
) -> None:
    """Write one EMA (copied to the CPU, floating tensors in `snapshot_dtype` if given) atomically, with `header`."""
    tensors = {}
    for name, tensor in ema_tensors.items():
        dtype = snapshot_dtype if snapshot_dtype is not None and tensor.is_floating_point() else None
        tensors[name] = tensor.detach().to("cpu", dtype or tensor.dtype, copy=True)
    atomic_save({"format": SNAPSHOT_FORMAT, "version": VERSION, **header, "tensors": tensors}, path)


def other_runs(snapshot_dir: Path, run_id: str) -> list[str]:
    """The run ids of snapshots in `snapshot_dir` that another training run wrote."""
    if not snapshot_dir.is_dir():
        return []
    return sorted({header.run for header in read_headers(snapshot_dir)} - {run_id})


class SnapshotHeader(NamedTuple):
    path: Path
    run: str
    step: int
    gamma: float
    layout: tuple


def read_headers(snapshot_dir: Path) -> list[SnapshotHeader]:
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
    headers = read_headers(snapshot_dir)
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
