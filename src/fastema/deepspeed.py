"""DeepSpeed: EMA checkpoints beside the engine's own, one file per rank under ZeRO-3, and their consolidation.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=..., config=config)
    ema = ModelEMA(engine, ema_dtype=torch.float32)   # after initialize; ZeRO-3: this rank's partitions
    ema.attach(engine)                                # one update per optimizer step the engine applies
    ...
    save_checkpoint(engine, ema, "ckpt")              # engine.save_checkpoint, then the EMA into the same tag folder
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
    load_partition_state,
    partition_state,
    zero_layouts,
)
from .core.state import make_state_dict

__all__ = ["EMA_FILE", "consolidate_ema", "load_checkpoint", "load_ema", "save_checkpoint", "save_ema"]

EMA_FILE = "fastema_ema.pt"  # stages 0-2: the whole EMA, written by rank 0
_PARTITION_FILE = "fastema_ema_rank{rank}.pt"  # stage 3: each rank's partitions


def _partition_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("fastema_ema_rank*.pt"), key=lambda path: int(path.stem.rsplit("rank", 1)[1]))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_ema(ema: ModelEMA, folder: str | os.PathLike) -> Path:
    """Write the EMA into `folder` (a DeepSpeed checkpoint's tag folder); every rank calls it.

    ZeRO-3: each rank writes its own partitions (no communication but a final barrier); otherwise rank 0
    writes the whole EMA. Each file is written atomically.
    """
    folder = Path(folder)
    if zero_layouts(ema):
        atomic_save(partition_state(ema), folder / _PARTITION_FILE.format(rank=rank()))
    else:
        ema.save(folder / EMA_FILE)
    _barrier()
    return folder


def _read_partition(ema: ModelEMA, folder: Path) -> tuple[object, Path]:
    """This rank's partition file of `folder` and its path, or a ValueError (raised on every rank) saying why not."""
    path = folder / _PARTITION_FILE.format(rank=rank())
    error = None
    state: object = None
    try:
        state = read_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as problem:
        found = len(_partition_files(folder))
        error = f"{problem} ({found} partition files in {folder}; {CONSOLIDATE_HINT})"
    failure = agree(error)
    if failure is not None:
        raise ValueError(f"Invalid EMA checkpoint {folder} (nothing was loaded): {failure}")
    return state, path


def load_ema(ema: ModelEMA, folder: str | os.PathLike) -> None:
    """Load what `save_ema` wrote into `folder`; every rank calls it.

    A ZeRO-3 EMA loads its own rank's partitions (checked on every rank first: all load or none does), or a
    whole EMA (`fastema_ema.pt`, of stages 0-2, or consolidated), keeping its own part. A whole EMA loads a
    whole EMA; partition files are refused with the fix.
    """
    folder = Path(folder)
    whole = folder / EMA_FILE
    if zero_layouts(ema) and not whole.is_file():
        state, path = _read_partition(ema, folder)
        load_partition_state(ema, state, path)
    elif whole.is_file():
        ema.load(whole)
    elif _partition_files(folder):
        raise ValueError(
            f"Invalid EMA checkpoint {folder} (nothing was loaded): it holds ZeRO-3 partitions, and this EMA is not "
            f"partitioned (another ZeRO stage, or no DeepSpeed): {CONSOLIDATE_HINT}"
        )
    else:
        raise FileNotFoundError(f"No fastema EMA in {folder} (neither {EMA_FILE} nor fastema_ema_rank*.pt)")


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
    """`engine.save_checkpoint(save_dir, tag, client_state)`, then the EMA into the same tag folder (every rank).

    `tag` defaults to DeepSpeed's own (`global_step<N>`). Returns the tag folder.
    """
    _check_pair(engine, ema)
    ema._swap.check_outside("save_checkpoint()")
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    engine.save_checkpoint(str(save_dir), tag, client_state=client_state or {}, **kwargs)
    return save_ema(ema, Path(save_dir) / tag)


def load_checkpoint(
    engine: Any, ema: ModelEMA, load_dir: str | os.PathLike, tag: str | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """The EMA saved with a checkpoint, then `engine.load_checkpoint(load_dir, tag, ...)` (every rank).

    The EMA comes first: checked on every rank before any is written, so a checkpoint whose EMA does not
    fit (another world size or ZeRO stage, another model) raises and loads nothing, the engine included.
    `tag` defaults to DeepSpeed's `latest`. Returns what `engine.load_checkpoint` returns.
    """
    _check_pair(engine, ema)
    ema._swap.check_outside("load_checkpoint()")
    if tag is None:
        latest = Path(load_dir) / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"No checkpoint to load in {load_dir}: no 'latest' file (pass tag=...)")
        tag = latest.read_text().strip()
    load_ema(ema, Path(load_dir) / tag)
    return engine.load_checkpoint(str(load_dir), tag, **kwargs)


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
            state = make_state_dict(
                tensors, saved["num_updates"], saved["num_steps"], saved["decay"], saved["last_decay"], config
            )
            return atomic_save(state, path)
        return atomic_save(tensors, path)
