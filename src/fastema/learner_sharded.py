"""`learn.save`/`learn.load` for a sharded (FSDP2) model: model, optimizer and EMA in one DCP checkpoint directory.

Layout: for a model with DTensor parameters, `learn.save("best")` writes `models/best.dcp/`, a
Distributed Checkpoint (DCP) directory, where fastai would write `models/best.pth` (fastai writes
that file from rank 0 alone, which for a sharded model holds rank 0's shards only). Every rank
writes its own shards of:

    model         the model's state dict
    opt           with `with_opt`: fastai's `Optimizer.state_dict()` ({"state": one dict per
                  parameter, "hypers": one dict per group}), or, for an `OptimWrapper` around a
                  torch optimizer, DCP's `get_optimizer_state_dict` (keyed by parameter name)
    ema           `ModelEMA.sharded_state()` (see `fastema.sharded`)
    ema_callback  where the EMA callback stood (`started`, `decay`)

`learn.save` and `learn.load` are collectives: every rank calls them (as fastai's
`SaveModelCallback` does). The directory is written by `save_sharded` (a temporary directory
renamed over the target); the other format's files of the same name (`best.pth`,
`best.ema.pth`) are deleted afterwards, so that one name means one checkpoint. `learn.load("best")`
reads `best.dcp/` into any layout: a 2-rank save loads into 3 ranks, or into one process with
an unsharded model. Everything is read into fresh buffers and checked (names, shapes, the
EMA's counts and decay) before the model, the optimizer or the EMA is written: a mismatch raises
on every rank and changes nothing. As in fastai, an optimizer state that does not fit the
Learner's optimizer is skipped with a warning.
"""

from __future__ import annotations

import itertools
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastai.optimizer import Optimizer, OptimWrapper
from fastai.torch_core import get_model
from torch import Tensor, nn

from .distributed import is_sharded
from .sharded import _check_ema_entries, _complete_checkpoint, _dcp_failure, _on_rank_0, _single_process_intended
from .sharded import save_sharded as _save_sharded

if TYPE_CHECKING:
    from fastai.learner import Learner

    from .learner_checkpoint import EMACheckpointing

SHARDED_SUFFIX = ".dcp"


def sharded_checkpoint_path(model_path: str | Path) -> Path:
    """`models/best.pth` -> `models/best.dcp`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".pth") + SHARDED_SUFFIX)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter or buffer of `model` is a DTensor (FSDP2, tensor parallel)."""
    tensors = [*model.parameters(), *model.buffers()]
    return any(is_sharded(tensor) for tensor in tensors)


def sharded_checkpoint_exists(model_path: Path) -> bool:
    """Whether `learn.load` of `model_path`'s name would find a DCP checkpoint (or one a killed save set aside)."""
    try:
        _complete_checkpoint(sharded_checkpoint_path(model_path))
    except FileNotFoundError:
        return False
    return True


def remove_sharded_checkpoint(model_path: Path) -> None:
    """Delete the sharded checkpoint of `model_path`'s name, with what killed saves left beside it (rank 0)."""
    target = sharded_checkpoint_path(model_path)
    for leftover in [
        target,
        *target.parent.glob(f".{target.name}.previous-*"),
        *target.parent.glob(f".{target.name}.saving-*"),
    ]:
        if leftover.is_dir():
            shutil.rmtree(leftover)


def _torch_optimizer(opt: object) -> torch.optim.Optimizer | None:
    inner = getattr(opt, "opt", None)
    return inner if isinstance(opt, OptimWrapper) and isinstance(inner, torch.optim.Optimizer) else None


def _check_optimizer(opt: object) -> None:
    if _torch_optimizer(opt) is None and not isinstance(opt, Optimizer):
        raise ValueError(
            f"Invalid with_opt: True, but the optimizer is a {type(opt).__name__}; a sharded checkpoint holds the "
            "state of fastai's Optimizer or of an OptimWrapper around a torch optimizer. Pass with_opt=False."
        )


def _optimizer_state(model: nn.Module, opt: Any) -> dict[str, Any]:
    inner = _torch_optimizer(opt)
    if inner is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, inner)
    state = opt.state_dict()  # plain containers, so that DCP stores each tensor (a DTensor: its shards) apart
    return {"state": [dict(per_param) for per_param in state["state"]], "hypers": [dict(h) for h in state["hypers"]]}


def save(learn: Learner, path: Path, with_opt: bool, callback: EMACheckpointing | None) -> Path:
    """Write `learn`'s sharded model (and optimizer, and EMA) as `path`'s `.dcp` directory (every rank calls it)."""
    model = get_model(learn.model)
    opt = getattr(learn, "opt", None)
    if with_opt and opt is not None:
        _check_optimizer(opt)
    ema_state = callback.sharded_ema_checkpoint() if callback is not None else None  # raises mid-validation
    state: dict[str, Any] = {"model": model.state_dict()}
    if with_opt and opt is not None:
        state["opt"] = _optimizer_state(model, opt)
    if ema_state is not None:
        state.update(ema_state)
    target = _save_sharded(state, sharded_checkpoint_path(path))

    def remove_other_format() -> None:
        from .learner_checkpoint import ema_checkpoint_path

        for stale in (path, ema_checkpoint_path(path)):
            stale.unlink(missing_ok=True)

    _on_rank_0(remove_other_format, "learn.save")
    return target


# ---- loading ----------------------------------------------------------------------------------------------


def _fresh(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised buffer laid out as `like` (a DTensor stays one: this rank's shard only)."""
    return torch.empty_like(like, dtype=dtype or like.dtype)


def _leaf(entry: Any, like: Tensor | None) -> Any:
    """The buffer DCP reads the checkpoint entry `entry` into; None for a non-tensor (DCP unpickles it)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not isinstance(entry, TensorStorageMetadata):
        return None
    dtype = entry.properties.dtype
    if like is not None and tuple(like.shape) == tuple(entry.size):
        return _fresh(like, dtype)  # an optimizer state shaped as its parameter: sharded as it is
    return torch.empty(tuple(entry.size), dtype=dtype, device=like.device if like is not None else "cpu")


def _insert(container: Any, path: tuple, value: Any) -> None:
    """Set `container[path[0]]...[path[-1]] = value`, creating dicts (str keys) and lists (int keys) on the way."""
    for key, next_key in itertools.pairwise(path):
        empty: Any = [] if isinstance(next_key, int) else {}
        if isinstance(container, list):
            container.extend([None] * (key + 1 - len(container)))
            if container[key] is None:
                container[key] = empty
        else:
            container.setdefault(key, empty)
        container = container[key]
    if isinstance(container, list):
        container.extend([None] * (path[-1] + 1 - len(container)))
    container[path[-1]] = value


def _optimizer_template(
    model: nn.Module, opt: Any, entries: dict[str, Any], paths: dict[str, tuple]
) -> tuple[dict[str, Any] | None, str | None]:
    """Buffers for the checkpoint's optimizer state, or (None, why not) when it does not fit `opt`."""
    saved = {fqn: path[1:] for fqn, path in paths.items() if path[0] == "opt"}
    torch_format = any(path[0] == "param_groups" for path in saved.values())
    inner = _torch_optimizer(opt)
    if torch_format != (inner is not None):
        kinds = ("fastai's Optimizer", "a torch optimizer (OptimWrapper)")
        return None, f"it was saved from {kinds[torch_format]}, this Learner has {kinds[inner is not None]}"
    if inner is not None:
        parameters = dict(model.named_parameters())
        like = {key: parameters.get(path[1]) for key, path in saved.items() if path[0] == "state"}
    else:
        parameters_in_order = [p for p, *_ in opt.all_params()]
        indices = {path[1] for path in saved.values() if path[0] == "state"}
        if indices and max(indices) >= len(parameters_in_order):
            return (
                None,
                f"it holds state for {max(indices) + 1}+ parameters, the optimizer has {len(parameters_in_order)}",
            )
        like = {key: parameters_in_order[path[1]] for key, path in saved.items() if path[0] == "state"}
    template: dict[str, Any] = {"state": {} if inner is not None else [{} for _ in opt.all_params()]}
    for fqn, path in saved.items():
        _insert(template, path, _leaf(entries[fqn], like.get(fqn)))
    return template, None


def _install_optimizer(model: nn.Module, opt: Any, state: dict[str, Any]) -> None:
    inner = _torch_optimizer(opt)
    if inner is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, inner, state)
        return
    from fastcore.foundation import L

    opt.load_state_dict({"state": state["state"], "hypers": L(state.get("hypers", []))})


def _model_problems(own: dict[str, Any], saved: dict[str, Any], strict: bool) -> list[str]:
    problems = []
    if strict:
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        if missing:
            problems.append(f"missing keys {missing[:5]}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}")
    for name in sorted(set(own) & set(saved)):
        size = getattr(saved[name], "size", None)
        if isinstance(own[name], Tensor) and size is not None and tuple(size) != tuple(own[name].shape):
            problems.append(f"{name}: shape {tuple(size)} in the checkpoint, {tuple(own[name].shape)} in the model")
    return problems


def _read_ema_names(checkpoint: Path, entries: dict[str, Any]) -> list[str]:
    """The names of the tensors the checkpoint's EMA averages (a small read, before anything is built)."""
    import torch.distributed.checkpoint as dcp

    from .sharded import _decode_strings

    names = torch.empty(tuple(entries["ema.names"].size), dtype=torch.uint8)
    with _single_process_intended():
        dcp.load({"ema": {"names": names}}, checkpoint_id=str(checkpoint))
    return _decode_strings(names)


def load(learn: Learner, path: Path, with_opt: bool, strict: bool, callback: EMACheckpointing | None) -> None:
    """Read `path`'s `.dcp` directory into `learn` (every rank calls it); a mismatch raises and changes nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    checkpoint = _complete_checkpoint(sharded_checkpoint_path(path))
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    entries, paths = metadata.state_dict_metadata, metadata.planner_data
    model = get_model(learn.model)
    own = model.state_dict()
    saved = {path[1]: entries[fqn] for fqn, path in paths.items() if path[0] == "model"}
    problems = _model_problems(own, saved, strict)
    if problems:
        raise ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): model " + "; ".join(problems))
    template: dict[str, Any] = {
        "model": {name: _fresh(t) if isinstance(t, Tensor) else None for name, t in own.items() if name in saved}
    }
    if with_opt:
        if learn.opt is None:
            learn.create_opt()
        if not any(path[0] == "opt" for path in paths.values()):
            warnings.warn(f"{checkpoint} holds no optimizer state", stacklevel=3)
        else:
            template["opt"], why_not = _optimizer_template(model, learn.opt, entries, paths)
            if why_not is not None:
                template.pop("opt")
                warnings.warn(f"Could not load the optimizer state of {checkpoint}: {why_not}", stacklevel=3)
    candidate = None
    has_ema = "ema.names" in entries
    if callback is not None and has_ema:
        _check_ema_entries(checkpoint, "ema")
        try:
            candidate = callback.sharded_candidate(_read_ema_names(checkpoint, entries))
        except (KeyError, ValueError) as error:
            raise ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): its EMA: {error}") from error
        # DCP reads the EMA into fresh buffers and hands them to the candidate's checks (see fastema.sharded).
        template["ema"] = candidate.sharded_state()
        template["ema_callback"] = {
            "started": torch.empty((), dtype=torch.bool),
            "decay": torch.empty((), dtype=torch.float64),
        }
    elif callback is not None and callback.engine is not None:
        warnings.warn(f"{checkpoint} holds no EMA: the EMA was not loaded", stacklevel=3)
    try:
        with _single_process_intended():
            dcp.load(template, checkpoint_id=str(checkpoint))
    except CheckpointException as error:
        raise _dcp_failure(error, checkpoint) from None
    # Everything is read and the EMA checked: now write.
    model.load_state_dict(template["model"], strict=strict)
    if "opt" in template:
        try:
            _install_optimizer(model, learn.opt, template["opt"])
        except Exception as error:  # as fastai: the model loads, the optimizer state is skipped with a warning
            warnings.warn(f"Could not load the optimizer state of {checkpoint}: {error}", stacklevel=3)
    if candidate is not None and callback is not None:
        position = template["ema_callback"]
        callback.install_sharded_checkpoint(candidate, bool(position["started"]), float(position["decay"]))
