"""DeepSpeed: EMA checkpoints beside the engine's own, one file per rank under ZeRO-3, and their consolidation.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=..., config=config)
    ema = ModelEMA(engine, ema_dtype=torch.float32)   # after initialize; ZeRO-3: this rank's partitions
    ema.attach(engine)                                # one update per optimizer step the engine applies
    ...
    save_checkpoint(engine, ema, "ckpt")              # the EMA into the tag folder, then engine.save_checkpoint
    load_checkpoint(engine, ema, "ckpt")              # every rank: the EMA checked, the engine loaded, the EMA written
    consolidate_ema("ckpt/global_step100", "ema.pt")  # offline: one model.state_dict()-style file

Under ZeRO stage 3 every rank writes its own partition of the EMA (`fastema_ema_rank<R>.pt`, no
gather), as DeepSpeed writes each rank's optimizer partition into the same folder; a load checks
the world size, the rank, every tensor's full shape and partition size on every rank before
anything is written, and refuses another world size or partitioning with the fix (consolidate,
then `ema.load`). Under stages 0-2 the EMA is whole and the same on every rank: rank 0 writes
`fastema_ema.pt`, which loads into any stage and world size. This module imports no DeepSpeed:
the engine is used through its methods.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .core.checkpoint import atomic_save, read_checkpoint
from .core.model_ema import ModelEMA
from .core.parallel import rank, unwrap_model
from .core.partitions import (
    CONSOLIDATE_HINT,
    PARTITION_FORMAT,
    agree,
    partition_state,
    prepare_partition_load,
    problem_text,
    zero_layouts,
)
from .core.state import make_state_dict, prepare_load

__all__ = ["EMA_FILE", "consolidate_ema", "load_checkpoint", "load_ema", "save_checkpoint", "save_ema"]

EMA_FILE = "fastema_ema.pt"  # stages 0-2: the whole EMA, written by rank 0
_PARTITION_FILE = "fastema_ema_rank{rank}.pt"  # stage 3: each rank's partitions


def _partition_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("fastema_ema_rank*.pt"), key=lambda path: int(path.stem.rsplit("rank", 1)[1]))


def save_ema(ema: ModelEMA, folder: str | os.PathLike) -> Path:
    """Write the EMA into `folder` (a DeepSpeed checkpoint's tag folder); every rank calls it.

    ZeRO-3: each rank writes its own partitions (no communication but a final agreement); otherwise rank 0
    writes the whole EMA. Each file is written atomically. A failed write on any rank raises on every rank
    (the failures are shared, as a barrier: none waits for a rank that failed).
    """
    folder = Path(folder)
    error = None
    try:
        if zero_layouts(ema):
            atomic_save(partition_state(ema), folder / _PARTITION_FILE.format(rank=rank()))
        else:
            ema.save(folder / EMA_FILE)
    except Exception as problem:  # every rank must reach agree()
        error = problem_text(problem)
    failure = agree(error)
    if failure is not None:
        raise RuntimeError(f"The EMA could not be saved into {folder}: {failure}")
    return folder


def _read_partition(ema: ModelEMA, folder: Path) -> tuple[object, Path]:
    """This rank's partition file of `folder` and its path, or a ValueError (raised on every rank) saying why not."""
    path = folder / _PARTITION_FILE.format(rank=rank())
    error = None
    state: object = None
    try:
        state = read_checkpoint(path)
    except Exception as problem:  # every rank must reach agree()
        found = len(_partition_files(folder))
        error = f"{problem_text(problem)} ({found} partition files in {folder}; {CONSOLIDATE_HINT})"
    failure = agree(error)
    if failure is not None:
        raise ValueError(f"Invalid EMA checkpoint {folder} (nothing was loaded): {failure}")
    return state, path


def _prepare_whole(ema: ModelEMA, folder: Path) -> Callable[[], None]:
    """Check the whole EMA of `folder` (every rank, the verdict shared); return the call that writes it."""
    whole = folder / EMA_FILE
    write: Callable[[], None] | None = None
    error = missing = None
    try:
        if whole.is_file():
            state = read_checkpoint(whole)
            if not isinstance(state, dict):
                raise ValueError(f"{whole}: not a fastema.ModelEMA state")
            write = prepare_load(ema, state)
        elif _partition_files(folder):
            error = (
                f"it holds ZeRO-3 partitions, and this EMA is not partitioned (another ZeRO stage, or no "
                f"DeepSpeed): {CONSOLIDATE_HINT}"
            )
        else:
            missing = error = f"No fastema EMA in {folder} (neither {EMA_FILE} nor fastema_ema_rank*.pt)"
    except Exception as problem:  # every rank must reach agree()
        error = problem_text(problem)
    failure = agree(error)
    if missing is not None:
        raise FileNotFoundError(missing)
    if failure is not None or write is None:
        raise ValueError(f"Invalid EMA checkpoint {folder} (nothing was loaded): {failure}")
    return write


def _prepare_ema(ema: ModelEMA, folder: Path) -> Callable[[], None]:
    """Check the EMA saved in `folder` on every rank (nothing is written); return the call that writes it."""
    if zero_layouts(ema) and not (folder / EMA_FILE).is_file():
        state, path = _read_partition(ema, folder)
        return prepare_partition_load(ema, state, path)
    return _prepare_whole(ema, folder)


def load_ema(ema: ModelEMA, folder: str | os.PathLike) -> None:
    """Load what `save_ema` wrote into `folder`; every rank calls it.

    A ZeRO-3 EMA loads its own rank's partitions, or a whole EMA (`fastema_ema.pt`, of stages 0-2, or
    consolidated), keeping its own part. A whole EMA loads a whole EMA; partition files are refused with
    the fix. Checked on every rank first, the verdict shared: all ranks load or none does.
    """
    ema._swap.check_outside("load_ema()")
    _prepare_ema(ema, Path(folder))()


def _check_pair(engine: Any, ema: ModelEMA) -> None:
    if unwrap_model(engine) is not ema.model:
        raise ValueError(
            "Invalid ema: it averages another model than this engine's; build it with ModelEMA(engine) after "
            "deepspeed.initialize (nothing was written)"
        )


def save_checkpoint(
    engine: Any,
    ema: ModelEMA,
    save_dir: str | os.PathLike,
    tag: str | None = None,
    client_state: dict | None = None,
    **kwargs: Any,
) -> Path:
    """The EMA into the tag folder, then `engine.save_checkpoint(save_dir, tag, client_state)` (every rank).

    The EMA first: DeepSpeed writes `latest` at the end of its save, so `latest` never names a folder
    without the EMA (a failed EMA write raises on every rank before the engine saves anything). `tag`
    defaults to DeepSpeed's own (`global_step<N>`). Returns the tag folder.
    """
    _check_pair(engine, ema)
    ema._swap.check_outside("save_checkpoint()")
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    folder = save_ema(ema, Path(save_dir) / tag)
    engine.save_checkpoint(str(save_dir), tag, client_state=client_state or {}, **kwargs)
    return folder


def load_checkpoint(
    engine: Any, ema: ModelEMA, load_dir: str | os.PathLike, tag: str | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """`engine.load_checkpoint(load_dir, tag, ...)` and the EMA saved with it (every rank).

    The EMA is checked first, on every rank, and nothing is written: a checkpoint whose EMA does not fit
    (another world size or ZeRO stage, another model) raises and loads nothing, the engine included. Then
    the engine loads; only if it loaded (it may raise, or return `(None, None)` after a warning: then a
    FileNotFoundError, the EMA untouched) is the EMA written, on every rank. `tag` defaults to DeepSpeed's
    `latest`. Returns what `engine.load_checkpoint` returns.
    """
    _check_pair(engine, ema)
    ema._swap.check_outside("load_checkpoint()")
    if tag is None:
        latest = Path(load_dir) / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"No checkpoint to load in {load_dir}: no 'latest' file (pass tag=...)")
        tag = latest.read_text().strip()
    write = _prepare_ema(ema, Path(load_dir) / tag)
    loaded = engine.load_checkpoint(str(load_dir), tag, **kwargs)
    if not isinstance(loaded, tuple) or loaded[0] is None:
        raise FileNotFoundError(
            f"DeepSpeed loaded no checkpoint from {Path(load_dir) / tag} (engine.load_checkpoint returned "
            f"{loaded!r}; its warning says why): the EMA was not loaded either"
        )
    write()
    return loaded


def consolidate_ema(folder: str | os.PathLike, path: str | os.PathLike, ema_state: bool = False) -> Path:
    """Join the ZeRO-3 partitions of an EMA checkpoint into one file, offline (one process, no GPU).

    `ema_state=False`: the averaged tensors by state-dict name, like `model.state_dict()` (load it with
    `model.load_state_dict(state, strict=False)`); `ema_state=True`: a `ModelEMA.state_dict()`, which
    `ema.load` takes in any world size or ZeRO stage. The partition files are memory-mapped and each full
    tensor is assembled straight into a memory-mapped staging file: the process holds no tensor in its own
    memory, however large the EMA. The file is written atomically.
    """
    folder = Path(folder)
    files = _partition_files(folder)
    if not files:
        raise FileNotFoundError(f"No ZeRO-3 EMA partitions (fastema_ema_rank*.pt) in {folder}")
    states: list[Any] = [read_checkpoint(file, mmap=True) for file in files]
    world = {state.get("world_size") if isinstance(state, dict) else None for state in states}
    formats = {state.get("format") if isinstance(state, dict) else None for state in states}
    if formats != {PARTITION_FORMAT} or world != {len(files)} or [s["rank"] for s in states] != list(range(len(files))):
        raise ValueError(
            f"Invalid EMA checkpoint {folder}: expected partition files of ranks 0..N-1 of one N-rank save, found "
            f"{[file.name for file in files]} (world sizes {sorted(map(str, world))})"
        )
    first = states[0]
    names = list(first["ema"]["tensors"])
    shapes = {name: torch.Size(first["full_shapes"][name]) for name in names}
    dtypes = {name: first["ema"]["tensors"][name].dtype for name in names}
    offsets: dict[str, int] = {}
    totals: dict[torch.dtype, int] = {}
    for name in names:  # one staging storage per dtype (torch.save keeps one dtype per storage)
        offsets[name] = totals.get(dtypes[name], 0)
        totals[dtypes[name]] = offsets[name] + shapes[name].numel()
    with tempfile.TemporaryDirectory(dir=Path(path).resolve().parent) as staging_folder:
        staging: dict[torch.dtype, Any] = {
            dtype: torch.UntypedStorage.from_file(
                os.path.join(staging_folder, str(index)), True, max(total * dtype.itemsize, 1)
            )
            for index, (dtype, total) in enumerate(totals.items())
        }
        tensors = {}
        for name in names:
            full = torch.empty(0, dtype=dtypes[name]).set_(
                staging[dtypes[name]], offsets[name], shapes[name], torch.empty(shapes[name], device="meta").stride()
            )
            if name in first["partition_sizes"]:
                torch.cat([state["ema"]["tensors"][name].reshape(-1) for state in states], out=full.view(-1))
            else:  # not partitioned (a buffer): every rank's copy is the same; rank 0's
                full.copy_(first["ema"]["tensors"][name])
            tensors[name] = full
        saved = first["ema"]
        if ema_state:
            config = {key: saved[key] for key in ("update_every", "all_parameters", "all_buffers")}
            length = {key: saved[key] for key in ("half_life", "batch_size") if key in saved}  # as state.length_of
            state = make_state_dict(
                tensors, saved["num_updates"], saved["num_steps"], saved["decay"], saved["last_decay"], config, length
            )
            return atomic_save(state, path)
        return atomic_save(tensors, path)
