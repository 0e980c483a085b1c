"""Running code after every step an optimizer really takes (a step post-hook), through framework wrappers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["RemovableHandle", "attach_to_optimizer", "torch_optimizer"]


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's `AcceleratedOptimizer`, Lightning's).

    Wrappers may subclass `Optimizer` without being one (no hooks of their own): unwrap first.
    """
    found = optimizer
    while isinstance(getattr(found, "optimizer", None), torch.optim.Optimizer):
        found = found.optimizer
    if isinstance(found, torch.optim.Optimizer):
        return found
    raise TypeError(f"Invalid optimizer: {optimizer!r}; expected a torch.optim.Optimizer (or a wrapper of one)")


def attach_to_optimizer(optimizer: Any, callback: Callable[[], None]) -> RemovableHandle:
    """Run `callback()` after every step the (unwrapped) optimizer takes.

    A step post-hook: an AMP `GradScaler` that skips a step (inf/NaN gradients) does not call the
    optimizer's `step`, so the callback does not run either.
    """
    return torch_optimizer(optimizer).register_step_post_hook(lambda optimizer, args, kwargs: callback())
