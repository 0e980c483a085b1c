"""What `learn.save`/`learn.load` need of an EMA callback, and where its file goes (both save formats use it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..averagers.bema import BEMA
    from ..core.model_ema import ModelEMA
    from ..posthoc.averager import PostHocEMA

EMA_SUFFIX = ".ema.pth"


class EMACheckpointing:
    """What `learn.save`/`learn.load` need of an EMA callback (the callbacks inherit it)."""

    engine: ModelEMA | PostHocEMA | BEMA | None = None

    def ema_checkpoint(self) -> dict | None:
        raise NotImplementedError

    def check_ema_checkpoint(self, state: object, path: Path) -> None:
        raise NotImplementedError

    def restore_ema_checkpoint(self, state: dict) -> None:
        raise NotImplementedError

    def sharded_ema_checkpoint(self) -> dict | None:
        """The EMA's entries in a sharded (DCP) `learn.save`; None before any EMA."""
        if self.engine is None:
            return None
        raise ValueError(f"Invalid callback: {type(self).__name__} does not support sharded (FSDP2) checkpoints")

    def sharded_candidate(self, tensor_names: list[str]) -> ModelEMA:
        """A new engine (not yet this callback's) for a sharded `learn.load` to read into and check."""
        raise ValueError(f"Invalid callback: {type(self).__name__} does not support sharded (FSDP2) checkpoints")

    def install_sharded_checkpoint(self, engine: ModelEMA, started: bool, decay: float) -> None:
        """Make `engine`, read and checked by a sharded `learn.load`, this callback's EMA."""
        raise NotImplementedError


def ema_checkpoint_path(model_path: str | Path) -> Path:
    """`models/best.pth` -> `models/best.ema.pth`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".pth") + EMA_SUFFIX)
