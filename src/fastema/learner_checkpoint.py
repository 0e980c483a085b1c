"""`Learner.save` / `Learner.load` that carry the EMA of an attached EMA callback.

Layout: `learn.save("best")` writes `models/best.pth` exactly as fastai does (model state, plus
`{"model", "opt"}` with the optimizer) and, beside it, `models/best.ema.pth` with the EMA
(`ModelEMA.state_dict()` plus where the callback stood). A sibling file, not a new key in
the model file, because fastai recognises an optimizer state by the exact key set
`{"model", "opt"}`: an extra key would make the file unreadable to plain fastai,
`load_learner` users and anyone loading the weights with `torch.load`. Both files are
written atomically, the EMA first. Learners without an EMA callback behave exactly as in
fastai, apart from the model file being written atomically too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from fastai.learner import Learner
from fastai.torch_core import get_model, rank_distrib
from fastcore.xtras import join_path_file

from .checkpoint import atomic_save, read_checkpoint

EMA_SUFFIX = ".ema.pth"
_fastai_load = Learner.load  # read at import, before `install()` replaces it


def ema_checkpoint_path(model_path: str | Path) -> Path:
    """`models/best.pth` -> `models/best.ema.pth`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".pth") + EMA_SUFFIX)


def _ema_callback(learn: Learner):
    from .callback import EMACallback

    callbacks = [callback for callback in learn.cbs if isinstance(callback, EMACallback)]
    if len(callbacks) > 1:
        raise ValueError(f"Invalid callbacks: {len(callbacks)} EMA callbacks on one Learner; save/load supports one")
    return callbacks[0] if callbacks else None


def save(self: Learner, file, with_opt: bool = True, **torch_save_kwargs) -> Path:
    "Save model and optimizer state (if `with_opt`) to `self.path/self.model_dir/file`, and the EMA beside it"
    path = join_path_file(file, self.path / self.model_dir, ext=".pth")
    if rank_distrib():  # like fastai: only the main process writes
        return path
    callback = _ema_callback(self)
    if callback is not None:
        ema_path = ema_checkpoint_path(path)
        state = callback.ema_checkpoint()
        if state is None:  # no EMA yet: do not leave an older one to be paired with this model
            ema_path.unlink(missing_ok=True)
        else:
            atomic_save(state, ema_path)
    opt = getattr(self, "opt", None)
    state = get_model(self.model).state_dict()
    if with_opt and opt is not None:
        state = {"model": state, "opt": opt.state_dict()}
    atomic_save(state, path, **torch_save_kwargs)
    return path


def load(self: Learner, file, device=None, **kwargs) -> Learner:
    "Load model and optimizer state (if `with_opt`) from `self.path/self.model_dir/file`, and the EMA beside it"
    callback = _ema_callback(self)
    path = join_path_file(file, self.path / self.model_dir, ext=".pth")
    ema_state = None
    if callback is not None:
        ema_path = ema_checkpoint_path(path)
        if ema_path.exists():
            ema_state = read_checkpoint(ema_path)
            callback.check_ema_checkpoint(ema_state, ema_path)  # everything checked before the model is touched
        elif callback.engine is not None:  # an EMA in memory that no longer belongs to the loaded model
            warnings.warn(f"No EMA checkpoint {ema_path} beside {path}: the EMA was not loaded", stacklevel=2)
    try:
        _fastai_load(self, file, device=device, **kwargs)
    except Exception as error:
        error.add_note(f"fastema: while loading the model checkpoint {path}")
        raise
    if ema_state is not None:
        callback.restore_ema_checkpoint(ema_state)
    return self


def install() -> None:
    """Make `Learner.save`/`Learner.load` EMA-aware (idempotent)."""
    Learner.save = save
    Learner.load = load
