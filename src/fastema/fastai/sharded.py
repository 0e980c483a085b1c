"""`learn.save`/`learn.load` for a sharded (FSDP2) model: model, optimizer and EMA in one DCP checkpoint directory.

Layout: for a model with DTensor parameters, `learn.save("best")` writes `models/best.dcp/`, a
Distributed Checkpoint (DCP) directory, where fastai would write `models/best.pth` (fastai writes
that file from rank 0 alone, which for a sharded model holds rank 0's shards only). Every rank
writes its own shards of:

    model         the model's state dict
    opt           with `with_opt`: fastai's `Optimizer.state_dict()` ({"state": one dict per
                  parameter, "hypers": one dict per group}), or, for an `OptimWrapper` around a
                  torch optimizer, DCP's `get_optimizer_state_dict` (keyed by parameter name)
    ema           `ModelEMA.sharded_state()` (see `fastema.distributed`)
    ema_callback  where the EMA callback stood (`started`, `decay`)

`learn.save` and `learn.load` are collectives: every rank calls them (as fastai's
`SaveModelCallback` does). The directory is written by `save_sharded` (a temporary directory
renamed over the target); the other format's files of the same name (`best.pth`,
`best.ema.pth`) are deleted afterwards, so that one name means one checkpoint. `learn.load("best")`
reads `best.dcp/` into any layout (DCP reshards): a 2-rank save loads into 3 ranks, or into
one process with an unsharded model. Everything is read into fresh buffers and checked (names, shapes, the
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

from ..core.checks import check_decay
from ..core.parallel import FSDPModule, is_sharded, reshard
from ..core.sharded_state import decode_strings, encode_strings
from ..distributed.sharded import (
    check_ema_entries,
    complete_checkpoint,
    dcp_failure,
    on_rank_0,
    set_aside,
    single_process_intended,
)
from ..distributed.sharded import save_sharded as _save_sharded
from .checkpointing import EMACheckpointing, ema_checkpoint_path

if TYPE_CHECKING:
    from fastai.learner import Learner


SHARDED_SUFFIX = ".dcp"


def sharded_checkpoint_path(model_path: str | Path) -> Path:
    """`models/best.pth` -> `models/best.dcp`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".pth") + SHARDED_SUFFIX)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether `model` is sharded: an FSDP2 module in it, or a DTensor parameter or buffer (tensor parallel).

    Not the parameters alone: after a forward, FSDP2 leaves the root module's parameters
    unsharded (plain tensors), which for a model sharded at the root only is all of them.
    """
    if FSDPModule is not None and any(isinstance(module, FSDPModule) for module in model.modules()):
        return True
    return any(is_sharded(tensor) for tensor in [*model.parameters(), *model.buffers()])


def remove_sharded_checkpoint(model_path: Path) -> None:
    """Delete the sharded checkpoint of `model_path`'s name, with what killed saves left beside it (rank 0)."""
    target = sharded_checkpoint_path(model_path)
    for leftover in [target, *set_aside(target, "previous"), *set_aside(target, "saving")]:
        if leftover.is_dir():
            shutil.rmtree(leftover)


def _torch_optimizer(opt: object) -> torch.optim.Optimizer | None:
    inner = getattr(opt, "opt", None)
    return inner if isinstance(opt, OptimWrapper) and isinstance(inner, torch.optim.Optimizer) else None


def _check_optimizer(opt: Any) -> None:
    if _torch_optimizer(opt) is None and not _fastai_own_state(opt):
        raise ValueError(
            f"Invalid with_opt: True, but the optimizer is a {type(opt).__name__}; a sharded checkpoint holds the "
            "state of fastai's Optimizer or of an OptimWrapper around a torch optimizer. Pass with_opt=False."
        )


def _parameter_names(model: nn.Module, opt: Any) -> list[str]:
    """`group/name` of fastai optimizer `opt`'s parameters, in the order of its state."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [
        f"{group}/{names.get(id(parameter), '?')}"
        for group, parameters in enumerate(opt.param_lists)
        for parameter in parameters
    ]


def _fastai_own_state(opt: Any) -> bool:
    """fastai's Optimizer with exactly its own state (Lookahead, ranger keep more of their own)."""
    return isinstance(opt, Optimizer) and set(opt.state_dict()) == {"state", "hypers"}


def _optimizer_state(model: nn.Module, opt: Any) -> dict[str, Any] | None:
    """What the checkpoint holds of the optimizer; None for a torch optimizer that has not stepped yet."""
    inner = _torch_optimizer(opt)
    if inner is not None:
        if not inner.state:
            return None  # DCP would initialise it with a step (lr 0): saving must not change the optimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, inner)
    state = opt.state_dict()  # plain containers, so that DCP stores each tensor (a DTensor: its shards) apart
    return {
        "state": [dict(per_param) for per_param in state["state"]],
        "hypers": [dict(h) for h in state["hypers"]],
        # Which parameter each state belongs to (an empty per-parameter dict leaves no entry of its own).
        "names": encode_strings(_parameter_names(model, opt)),
    }


def save(learn: Learner, path: Path, with_opt: bool, callback: EMACheckpointing | None) -> Path:
    """Write `learn`'s sharded model (and optimizer, and EMA) as `path`'s `.dcp` directory (every rank calls it)."""
    if hasattr(learn, "lr_finder"):  # fastai restores the model from `_tmp.pth` in a per-rank temporary directory
        raise RuntimeError("lr_find does not support a sharded (FSDP2) model; run it before sharding the model")
    model = get_model(learn.model)
    reshard(model)  # the state dict holds the shards (not a forward's unsharded copies)
    opt = getattr(learn, "opt", None)
    if with_opt and opt is not None:
        _check_optimizer(opt)
    ema_state = callback.sharded_ema_checkpoint() if callback is not None else None  # raises mid-validation
    state: dict[str, Any] = {"model": model.state_dict()}
    optimizer_state = _optimizer_state(model, opt) if with_opt and opt is not None else None
    if optimizer_state is not None:
        state["opt"] = optimizer_state
    if ema_state is not None:
        state.update(ema_state)
    target = _save_sharded(state, sharded_checkpoint_path(path))

    def remove_other_format() -> None:
        for stale in (path, ema_checkpoint_path(path)):
            stale.unlink(missing_ok=True)

    on_rank_0(remove_other_format, "learn.save")
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
    return torch.empty(tuple(entry.size), dtype=dtype)  # a step count, ...: on the CPU, as torch keeps it


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
    model: nn.Module, opt: Any, entries: dict[str, Any], paths: dict[str, tuple], names: list[str] | None
) -> tuple[dict[str, Any] | None, str | None]:
    """Buffers for the checkpoint's optimizer state, or (None, why not) when it does not fit `opt`."""
    saved = {fqn: path[1:] for fqn, path in paths.items() if path[0] == "opt"}
    torch_format = any(path[0] == "param_groups" for path in saved.values())
    inner = _torch_optimizer(opt)
    if inner is None and not _fastai_own_state(opt):
        return None, f"the optimizer is a {type(opt).__name__}, which keeps state a sharded checkpoint does not hold"
    if torch_format != (inner is not None):
        kinds = ("fastai's Optimizer", "a torch optimizer (OptimWrapper)")
        return None, f"it was saved from {kinds[torch_format]}, this Learner has {kinds[inner is not None]}"
    groups = {path[1] for path in saved.values() if path[0] in ("param_groups", "hypers")}
    if inner is not None:
        parameters = dict(model.named_parameters())
        unknown = sorted({path[1] for path in saved.values() if path[0] == "state"} - set(parameters))
        if unknown or len(groups) != len(inner.param_groups):
            return None, f"its parameters or groups differ ({len(groups)} groups; not in the model: {unknown[:3]})"
        like = {key: parameters.get(path[1]) for key, path in saved.items() if path[0] == "state"}
    else:
        parameters_in_order = [p for p, *_ in opt.all_params()]
        own_names = _parameter_names(model, opt)
        if names != own_names or len(groups) != len(opt.param_lists):
            return None, (
                f"it holds the state of {len(names or [])} parameters in {len(groups)} groups, the optimizer has "
                f"{len(own_names)} in {len(opt.param_lists)}, or other parameters"
            )
        like = {key: parameters_in_order[path[1]] for key, path in saved.items() if path[0] == "state"}
    template: dict[str, Any] = {"state": {} if inner is not None else [{} for _ in opt.all_params()]}
    for fqn, path in saved.items():
        if path != ("names",):  # read already
            _insert(template, path, _leaf(entries[fqn], like.get(fqn)))
    return template, None


def _optimizer_mismatch(model: nn.Module, opt: Any, state: dict[str, Any]) -> str | None:
    """Why the optimizer state read from a checkpoint does not fit `opt` (None: it fits); changes nothing."""
    inner = _torch_optimizer(opt)
    if inner is None:
        return None  # fastai's: counts checked before reading, its load only assigns
    names = {id(p): name for name, p in model.named_parameters()}
    own = [[names.get(id(p)) for p in group["params"]] for group in inner.param_groups]
    saved = [list(group.get("params", [])) for group in state.get("param_groups", [])]
    return None if own == saved else "its parameter groups hold other parameters"


def _install_optimizer(model: nn.Module, opt: Any, state: dict[str, Any]) -> str | None:
    """Load `state` into `opt`; on failure put the optimizer back as it was and say why."""
    inner = _torch_optimizer(opt)
    if inner is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        before = inner.state_dict()  # torch's load replaces the state tensors, it does not write into them
        try:
            set_optimizer_state_dict(model, inner, state)
        except Exception as error:
            inner.load_state_dict(before)
            return f"{type(error).__name__}: {error}"
        return None
    from fastcore.foundation import L

    kept_state, kept_hypers = opt.state, opt.hypers
    try:
        opt.load_state_dict({"state": state["state"], "hypers": L(state["hypers"])})
    except Exception as error:
        opt.state, opt.hypers = kept_state, kept_hypers  # fastai's load assigns both: put the objects back
        return f"{type(error).__name__}: {error}"
    return None


def _model_problems(own: dict[str, Any], saved: dict[str, Any], strict: bool) -> list[str]:
    problems = []
    if strict:
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        if missing:
            problems.append(f"missing keys {missing[:5]}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}")
    for name in sorted(set(own) & set(saved)):
        if not isinstance(own[name], Tensor):
            continue
        size = getattr(saved[name], "size", None)
        if size is None:
            problems.append(f"{name}: not a tensor in the checkpoint")
        elif tuple(size) != tuple(own[name].shape):
            problems.append(f"{name}: shape {tuple(size)} in the checkpoint, {tuple(own[name].shape)} in the model")
    return problems


def _weights_only_planner() -> Any:
    """DCP's load planner, but reading non-tensor entries (hyperparameters, counts) with `weights_only=True`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner()


def _dcp_load(state: dict[str, Any], checkpoint: Path, weights_only: bool = True) -> None:
    """`dcp.load`, its failures (a BaseException, on every rank) as a ValueError naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with single_process_intended():
            dcp.load(state, checkpoint_id=str(checkpoint), planner=_weights_only_planner() if weights_only else None)
    except CheckpointException as error:
        raise dcp_failure(error, checkpoint) from None
    except ValueError as error:  # the EMA's checks (`ShardedEMAState.load_state_dict`), on every rank
        raise ValueError(f"Invalid checkpoint {checkpoint}: {error}") from error


def _read_names(checkpoint: Path, entries: dict[str, Any]) -> dict[str, list[str]]:
    """The names the checkpoint's EMA averages and those of the fastai optimizer's parameters, where present."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    present = [key for key in ("ema", "opt") if f"{key}.names" in entries]
    for key in present:
        entry = entries[f"{key}.names"]
        if not isinstance(entry, TensorStorageMetadata) or entry.properties.dtype != torch.uint8:
            raise ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): {key}.names is not a uint8 tensor")
    small = {key: {"names": torch.empty(tuple(entries[f"{key}.names"].size), dtype=torch.uint8)} for key in present}
    if small:
        _dcp_load(small, checkpoint)
    try:
        return {key: decode_strings(value["names"]) for key, value in small.items()}
    except UnicodeDecodeError as error:
        raise ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): names that are not text") from error


def load(
    learn: Learner,
    path: Path,
    with_opt: bool,
    strict: bool,
    callback: EMACheckpointing | None,
    weights_only: bool = True,
) -> None:
    """Read `path`'s `.dcp` directory into `learn` (every rank calls it); a mismatch raises and changes nothing."""
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint = complete_checkpoint(sharded_checkpoint_path(path))
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    entries, paths = metadata.state_dict_metadata, metadata.planner_data
    has_ema = "ema.names" in entries
    if callback is not None and has_ema:
        check_ema_entries(checkpoint, "ema")  # before DCP unpickles anything of the EMA
    names = _read_names(checkpoint, entries)
    model = get_model(learn.model)
    reshard(model)  # the buffers to read into are laid out as the shards
    own = model.state_dict()
    saved = {path[1]: entries[fqn] for fqn, path in paths.items() if path[0] == "model"}
    problems = _model_problems(own, saved, strict)
    if problems:
        raise ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): model " + "; ".join(problems))
    template: dict[str, Any] = {
        "model": {name: _fresh(t) if isinstance(t, Tensor) else None for name, t in own.items() if name in saved}
    }
    notes = []  # warned once the load is known to succeed
    if with_opt:
        if learn.opt is None:
            learn.create_opt()
        if not any(path[0] == "opt" for path in paths.values()):
            notes.append(
                f"{checkpoint} holds no optimizer state (saved with with_opt=False, or from a torch optimizer "
                "without state)"
            )
        else:
            template["opt"], why_not = _optimizer_template(model, learn.opt, entries, paths, names.get("opt"))
            if why_not is not None:
                template.pop("opt")
                notes.append(f"Could not load the optimizer state of {checkpoint}: {why_not}")
    candidate = None
    if callback is not None and "ema" in names:
        try:
            candidate = callback.sharded_candidate(names["ema"])
        except (KeyError, ValueError) as error:
            raise ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): its EMA: {error}") from error
        # DCP reads the EMA into fresh buffers and hands them to the candidate's checks (see fastema.distributed).
        template["ema"] = candidate.sharded_state("load")
        template["ema_callback"] = {
            "started": torch.empty((), dtype=torch.bool),
            "decay": torch.empty((), dtype=torch.float64),
        }
    elif callback is not None and callback.engine is not None:
        notes.append(f"{checkpoint} holds no EMA: the EMA was not loaded")
    _dcp_load(template, checkpoint, weights_only)
    started, decay = False, 0.0
    if candidate is not None:
        started, decay = bool(template["ema_callback"]["started"]), float(template["ema_callback"]["decay"])
        try:
            check_decay(decay, "decay")
        except ValueError as error:
            raise ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): {error}") from error
    # Everything is read and checked: now write.
    for note in notes:
        warnings.warn(note, stacklevel=3)
    model.load_state_dict(template["model"], strict=strict)
    if "opt" in template:  # as fastai: if the optimizer state does not fit, it is skipped with a warning
        why_not = _optimizer_mismatch(model, learn.opt, template["opt"]) or _install_optimizer(
            model, learn.opt, template["opt"]
        )
        if why_not is not None:
            warnings.warn(f"Could not load the optimizer state of {checkpoint}: {why_not}", stacklevel=3)
    if candidate is not None and callback is not None:
        callback.install_sharded_checkpoint(candidate, started, decay)
