"""Running code after every step an optimizer really takes (a step post-hook), through framework wrappers."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["RemovableHandle", "attach_once", "attach_to_optimizer", "torch_optimizer"]

# optimizer -> {EMA -> its live hook}: an EMA attached twice to one optimizer would update twice per step.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_WRAPPERS = ("accelerate.", "lightning.", "pytorch_lightning.")  # whose wrappers step the inner optimizer, no more


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's `AcceleratedOptimizer`, Lightning's).

    Those wrappers may subclass `Optimizer` without being one (no hooks of their own): unwrapped.
    Any other optimizer is hooked itself, wrapper or not: a Lookahead-style wrapper moves the
    weights after its inner step, and its own step hooks run after that.
    """
    found = optimizer
    while type(found).__module__.startswith(_WRAPPERS):
        inner = getattr(found, "optimizer", None) or getattr(found, "_optimizer", None)
        if inner is None:
            break
        found = inner
    if isinstance(found, torch.optim.Optimizer):
        return found
    raise TypeError(f"Invalid optimizer: {optimizer!r}; expected a torch.optim.Optimizer (or a wrapper of one)")


def attach_to_optimizer(optimizer: Any, callback: Callable[[], None]) -> RemovableHandle:
    """Run `callback()` after every step the (unwrapped) optimizer takes.

    A step post-hook: an AMP `GradScaler` that skips a step (inf/NaN gradients) does not call the
    optimizer's `step`, so the callback does not run either.
    """
    return torch_optimizer(optimizer).register_step_post_hook(lambda optimizer, args, kwargs: callback())


def attach_once(owner: object, optimizer: Any, callback: Callable[[], None]) -> RemovableHandle:
    """`attach_to_optimizer`, refusing a second live attachment of the same `owner` to the same optimizer."""
    found = torch_optimizer(optimizer)
    handles = _ATTACHED.setdefault(found, weakref.WeakKeyDictionary())
    previous = handles.get(owner)
    if previous is not None and previous.id in found._optimizer_step_post_hooks:
        raise ValueError(
            "Invalid optimizer: this EMA is already attached to it (it would update twice per step); "
            "call remove() on the first handle to attach again"
        )
    handle = attach_to_optimizer(found, callback)
    handles[owner] = handle
    return handle
