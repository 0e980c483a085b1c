"""`Learner.save` / `Learner.load` that carry the EMA of an attached EMA callback, and a lean `Learner.export`.

Layout: `learn.save("best")` writes `models/best.pth` exactly as fastai does (model state, plus
`{"model", "opt"}` with the optimizer) and, beside it, `models/best.ema.pth` with the EMA
(`ModelEMA.state_dict()` plus where the callback stood). A sibling file, not a new key in
the model file, because fastai recognises an optimizer state by the exact key set
`{"model", "opt"}`: an extra key would make the file unreadable to plain fastai,
`load_learner` users and anyone loading the weights with `torch.load`.

The two files are tied: each save draws a random token, kept in the EMA file and in the model
state's metadata (`state_dict._metadata`, which `load_state_dict` ignores), so `learn.load`
refuses an EMA file written by another save than the model file beside it (a crash between
the two writes, a copy from elsewhere). Both are written atomically, the EMA first.

For a sharded (FSDP2) model, `learn.save`/`learn.load` use one DCP directory, `models/best.dcp/`,
instead of both files: see `fastema.fastai.sharded`.

`learn.export()` leaves the EMA out (the exported Learner is for inference with the model's
weights); `learn.export_ema()` exports a Learner whose model is the EMA. Learners without an
EMA callback behave exactly as in fastai, apart from `save` writing atomically.
"""

from __future__ import annotations

import secrets
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

import cloudpickle
import torch
from fastai.learner import Learner
from fastai.torch_core import distrib_barrier, get_model, rank_distrib
from fastcore.xtras import join_path_file

from ..core.checkpoint import atomic_save, read_checkpoint
from ..distributed.sharded import complete_checkpoint
from . import sharded as learner_sharded
from .checkpointing import EMACheckpointing, ema_checkpoint_path
from .sharded import (
    is_sharded_model,
    remove_sharded_checkpoint,
    sharded_checkpoint_path,
)

PAIR_KEY = "fastema_pair"  # in the model state's root metadata: the token of the save that wrote it
_fastai_load = Learner.load  # read at import, before `install()` replaces them
_fastai_export = Learner.export


def _ema_callback(learn: Learner) -> EMACheckpointing | None:
    """The Learner's EMA callback; None without one, or while `lr_find` runs (it saves and loads `_tmp`)."""
    if hasattr(learn, "lr_finder"):
        return None
    callbacks = [callback for callback in learn.cbs if isinstance(callback, EMACheckpointing)]
    if len(callbacks) > 1:
        raise ValueError(f"Invalid callbacks: {len(callbacks)} EMA callbacks on one Learner; save/load supports one")
    return callbacks[0] if callbacks else None


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)


def save(self: Learner, file, with_opt: bool = True, **torch_save_kwargs) -> Path:
    "Save model and optimizer state (if `with_opt`) to `self.path/self.model_dir/file`, and the EMA beside it"
    path = join_path_file(file, self.path / self.model_dir, ext=".pth")
    callback = _ema_callback(self)
    if is_sharded_model(get_model(self.model)):  # every rank writes its shards: `models/<file>.dcp/`
        return learner_sharded.save(self, path, with_opt, callback)
    if rank_distrib():  # like fastai: only the main process writes
        return path
    state = get_model(self.model).state_dict()
    if callback is not None:
        ema_path = ema_checkpoint_path(path)
        ema_state = callback.ema_checkpoint()
        if ema_state is None:  # no EMA yet: do not leave an older one beside this model
            ema_path.unlink(missing_ok=True)
        else:
            token = secrets.token_hex(16)
            state._metadata.setdefault("", {})[PAIR_KEY] = token
            atomic_save(dict(ema_state, pair=token), ema_path)
    opt = getattr(self, "opt", None)
    if with_opt and opt is not None:
        state = {"model": state, "opt": opt.state_dict()}
    atomic_save(state, path, **torch_save_kwargs)
    remove_sharded_checkpoint(path)  # an older sharded checkpoint of this name: one name, one checkpoint
    return path


def _holds_token(path: Path, token: str) -> bool:
    """Whether the model file at `path` was written by the save that drew `token` (it is in the file's pickle)."""
    needle = token.encode()
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            return any(needle in archive.read(name) for name in pickles)
    except zipfile.BadZipFile:  # the legacy format: the pickle and the tensors in one stream
        return needle in path.read_bytes()


def _single_file_refused(path: Path, why: str) -> ValueError:
    return ValueError(
        f"Invalid checkpoint {path}: a single-file checkpoint{why}, but this Learner's model is sharded (FSDP2); "
        "load it before sharding the model (then `learn.save` writes the sharded format); nothing was loaded"
    )


def _sharded_wins(path: Path, sharded_model: bool) -> bool:
    """Whether `learn.load` of `path` reads the sharded checkpoint of that name (`.dcp/`) rather than the file."""
    sharded = sharded_checkpoint_path(path)
    try:
        complete = complete_checkpoint(sharded)  # or the one a killed save_sharded set aside
    except FileNotFoundError:
        if sharded.exists() and not path.is_file():
            raise  # an incomplete directory and nothing else: the error says so
        if sharded_model and path.is_file():
            raise _single_file_refused(path, "") from None
        return False
    if not path.is_file():
        return True
    # Both: a save of the other format was interrupted before it deleted this one. The newer one wins.
    newer = (complete / ".metadata").stat().st_mtime >= path.stat().st_mtime
    if not newer and sharded_model:
        raise _single_file_refused(path, f" newer than {complete} (an interrupted save)")
    warnings.warn(
        f"Both {path} and {complete} exist (an interrupted save); loading the newer, {complete if newer else path}",
        UserWarning,
        stacklevel=5,  # learn.load's caller
    )
    return newer


def _decided_on_rank_0(decide: Callable[[], bool]) -> bool:
    """`decide()` on rank 0, its answer (or its error) on every rank: all ranks take the same path, none hangs."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decide()
    outcome: list[object] = [None]
    if rank_distrib() == 0:
        try:
            outcome[0] = decide()
        except (ValueError, FileNotFoundError) as error:
            outcome[0] = error
    torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return bool(outcome[0])


def load(self: Learner, file, device=None, **kwargs) -> Learner:
    "Load model and optimizer state (if `with_opt`) from `self.path/self.model_dir/file`, and the EMA beside it"
    callback = _ema_callback(self)
    path = join_path_file(file, self.path / self.model_dir, ext=".pth")
    distrib_barrier()  # as fastai does before reading: rank 0 may still be writing (or deleting) files
    sharded_model = is_sharded_model(get_model(self.model))
    if _decided_on_rank_0(lambda: _sharded_wins(path, sharded_model)):
        # `device` concerns torch.load: DCP reads onto the devices of the model's own. `weights_only=False`
        # (fastai's SaveModelCallback passes it) lets DCP unpickle non-tensor entries as it would by default.
        unknown = set(kwargs) - {"with_opt", "strict", "weights_only"}
        if unknown:
            raise TypeError(f"Invalid arguments {sorted(unknown)} for loading the sharded checkpoint of {path}")
        with_opt, strict = kwargs.get("with_opt", True), kwargs.get("strict", True)
        weights_only = kwargs.get("weights_only", True) is not False  # for what is not a tensor (hyperparameters)
        learner_sharded.load(self, path, with_opt, strict, callback, weights_only)
        return self
    if callback is None:
        return _fastai_load(self, file, device=device, **kwargs)
    ema_path = ema_checkpoint_path(path)
    ema_state: dict | None = None
    if ema_path.exists():
        saved = read_checkpoint(ema_path)
        callback.check_ema_checkpoint(saved, ema_path)  # everything checked before the model is touched
        ema_state = cast(dict, saved)  # checked: a dict
        token = ema_state.get("pair")
        if token is not None and path.is_file() and not _holds_token(path, token):
            raise ValueError(
                f"Invalid EMA checkpoint {ema_path}: it was not written by the save that wrote {path} "
                "(a crash between the two writes, or files from different runs); nothing was loaded. "
                "Delete it to load the model alone."
            )
    elif callback.engine is not None:  # an EMA in memory that no longer belongs to the loaded model
        warnings.warn(f"No EMA checkpoint {ema_path} beside {path}: the EMA was not loaded", stacklevel=2)
    try:
        _fastai_load(self, file, device=device, **kwargs)
    except Exception as error:
        _add_note(error, f"fastema: while loading the model checkpoint {path}")
        raise
    if ema_state is not None:
        callback.restore_ema_checkpoint(ema_state)
    return self


def export(self: Learner, fname="export.pkl", **kwargs) -> None:
    "Export the content of `self` without the items, the optimizer state and the EMA, for inference"
    # The EMA model, and PostHocEMACallback's K EMAs: each as large as the model, and not what inference uses.
    averages = {name: self.__dict__.pop(name) for name in ("model_ema", "posthoc_ema") if name in self.__dict__}
    try:
        _fastai_export(self, fname, **kwargs)
    finally:
        self.__dict__.update(averages)


def export_ema(self: Learner, fname="export_ema.pkl", pickle_module=cloudpickle, pickle_protocol=2) -> None:
    "Export the Learner with its EMA model (`learn.model_ema`) as the model, for inference with the EMA weights"
    if rank_distrib():  # like fastai: only the main process writes
        return
    model_ema = self.__dict__.get("model_ema")
    if model_ema is None:
        raise ValueError("Invalid export_ema: learn.model_ema holds no EMA; fit with an EMA callback first")
    self._end_cleanup()
    # As fastai's export, but the optimizer object is kept (fastai's rebuilds it from `self.model` after saving).
    kept = self.model, self.dls, self.opt, self.__dict__.pop("model_ema")
    self.model, self.dls, self.opt = model_ema, self.dls.new_empty(), None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's warning about the model's source not being checked
            torch.save(self, self.path / fname, pickle_module=pickle_module, pickle_protocol=pickle_protocol)
    finally:
        self.model, self.dls, self.opt, self.model_ema = kept


def install() -> None:
    """Make `Learner.save`/`load`/`export` EMA-aware and add `Learner.export_ema` (idempotent)."""
    Learner.save = save
    Learner.load = load
    Learner.export = export
    Learner.export_ema = export_ema
