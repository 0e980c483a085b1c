"""Running code after every step an optimizer really takes (a step post-hook), through framework wrappers.

A DeepSpeed engine is hooked itself (`zero.engine_step_hooks`): after each `engine.step()` that applied
an optimizer step.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .zero import engine_step_hooks, is_deepspeed_engine, refuse_pipeline

__all__ = ["Attachments", "RemovableHandle", "attach_once", "attach_to_optimizer", "torch_optimizer"]

# optimizer -> {EMA -> its live hook}: an EMA attached twice to one optimizer would update twice per step.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_WRAPPERS = ("accelerate.", "lightning.", "pytorch_lightning.")  # whose wrappers step the inner optimizer, no more


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's `AcceleratedOptimizer`, Lightning's).

    Those wrappers may subclass `Optimizer` without being one (no hooks of their own): unwrapped.
    Any other optimizer is hooked itself, wrapper or not: a Lookahead-style wrapper moves the
    weights after its inner step, and its own step hooks run after that. A DeepSpeed engine is
    returned as it is (it is hooked itself).
    """
    refuse_pipeline(optimizer)
    if is_deepspeed_engine(optimizer):
        return optimizer
    found = optimizer
    while type(found).__module__.startswith(_WRAPPERS):
        inner = getattr(found, "optimizer", None) or getattr(found, "_optimizer", None)
        if inner is None:
            break
        found = inner
    if isinstance(found, torch.optim.Optimizer):
        return found
    if type(found).__module__.startswith("deepspeed."):
        raise TypeError(
            f"Invalid optimizer: {type(found).__name__} is DeepSpeed's, which steps its inner optimizer once per "
            "parameter group before copying the weights into the model; attach the DeepSpeed engine instead "
            "(ema.attach(engine): the model deepspeed.initialize or accelerator.prepare returned)"
        )
    raise TypeError(f"Invalid optimizer: {optimizer!r}; expected a torch.optim.Optimizer (or a wrapper of one)")


def attach_to_optimizer(optimizer: Any, callback: Callable[[], None]) -> RemovableHandle:
    """Run `callback()` after every step the (unwrapped) optimizer takes.

    A step post-hook: an AMP `GradScaler` that skips a step (inf/NaN gradients) does not call the
    optimizer's `step`, so the callback does not run either. For a DeepSpeed engine: after each
    `engine.step()` that applied a step (an accumulation boundary without fp16 overflow).
    """
    found = torch_optimizer(optimizer)
    if is_deepspeed_engine(found):
        hooks = engine_step_hooks(found)
        handle = RemovableHandle(hooks)
        hooks[handle.id] = callback
        return handle
    return found.register_step_post_hook(lambda optimizer, args, kwargs: callback())


def _step_hooks(found: Any) -> dict:
    """The hooks an optimizer (or a DeepSpeed engine) runs after its steps, by handle id."""
    return engine_step_hooks(found) if is_deepspeed_engine(found) else found._optimizer_step_post_hooks


def attach_once(owner: object, optimizer: Any, callback: Callable[[], None]) -> RemovableHandle:
    """`attach_to_optimizer`, refusing a second live attachment of the same `owner` to the same optimizer."""
    found = torch_optimizer(optimizer)
    handles = _ATTACHED.setdefault(found, weakref.WeakKeyDictionary())
    previous = handles.get(owner)
    if previous is not None and previous.id in _step_hooks(found):
        raise ValueError(
            "Invalid optimizer: this EMA is already attached to it (it would update twice per step); "
            "call remove() on the first handle to attach again"
        )
    handle = attach_to_optimizer(found, callback)
    handles[owner] = handle
    return handle


class Attachments:
    """The optimizers an EMA's `attach()` hooked, and whether an `update()` comes from one of their hooks.

    Refuses an optimizer that steps none of the model's parameters (a GAN's discriminator optimizer
    for the generator's EMA would move the EMA on the wrong steps), and warns once when `update()`
    is also called by hand while attached: every step would then update twice. Not pickled: the
    hooks belong to the original optimizers.
    """

    def __init__(self) -> None:
        self._attached: list[tuple[weakref.ref, RemovableHandle]] = []
        self.in_hook = False
        self._warned = False

    def attach(
        self, owner: object, optimizer: Any, update: Callable[[], None], parameters: Iterable[torch.Tensor]
    ) -> RemovableHandle:
        found: Any = torch_optimizer(optimizer)
        own = {id(parameter) for parameter in parameters}
        groups = [{"params": list(found.module.parameters())}] if is_deepspeed_engine(found) else found.param_groups
        if not any(id(parameter) in own for group in groups for parameter in group["params"]):
            raise ValueError(
                f"Invalid optimizer: {type(found).__name__} steps none of the parameters this EMA averages "
                "(an optimizer of another model, or of frozen ones?); attach the optimizer that trains them"
            )

        def hooked() -> None:
            self.in_hook = True
            try:
                update()
            finally:
                self.in_hook = False

        handle = attach_once(owner, found, hooked)
        self._attached.append((weakref.ref(found), handle))
        return handle

    def check_manual_update(self) -> None:
        """Called by `update()`: warn (once) if it was called by hand while an attachment updates it too."""
        if self.in_hook or self._warned or not self._attached:
            return
        self._attached = [(optimizer, handle) for optimizer, handle in self._attached if _live(optimizer, handle)]
        if self._attached:
            self._warned = True
            warnings.warn(
                "update() called by hand on an EMA that attach() already updates after every optimizer step: it "
                "now updates twice per step (the decay is effectively squared). Remove the ema.update() call, or "
                "call remove() on the handle attach() returned.",
                UserWarning,
                stacklevel=3,
            )

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]  # a fresh, empty registry


def _live(optimizer: weakref.ref, handle: RemovableHandle) -> bool:
    """Whether the hook `handle` is still registered on the optimizer (which may be gone)."""
    found = optimizer()
    return found is not None and handle.id in _step_hooks(found)
