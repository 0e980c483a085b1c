"""fastema 0.1's module paths that pickles still name (exported Learners, whole EMAs): each resolves to its successor.

The documented old paths have modules of their own (`sharded`, `callback`, `learner_checkpoint`). These were
never documented, but `pickle` writes a class's module path into the file, so a Learner exported with an
`InverseGammaWarmup`, or a `ModelEMA` saved whole with `torch.save(ema)`, names them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# Old path -> where its names live now (looked up in order).
MOVED = {
    "fastema.engine": ("fastema.core.model_ema",),
    "fastema.schedules": ("fastema.core.schedules",),
    "fastema.checkpoint": ("fastema.core.checkpoint",),
    "fastema.learner_sharded": ("fastema.fastai.sharded",),
    "fastema._binding": ("fastema.core.tracking",),
    "fastema._checks": ("fastema.core.checks",),
    "fastema._hooks": ("fastema.core.hooks",),
    "fastema._latch": ("fastema.core.latch",),
    "fastema._plan": ("fastema.core.plan",),
    "fastema._state": ("fastema.core.state",),
    "fastema._steps": ("fastema.core.steps", "fastema.core.offload"),
    "fastema._swap": ("fastema.core.swap",),
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as a module that hands out its successors' names."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        alias = types.ModuleType(spec.name, f"fastema 0.1's {spec.name}; its names now live in {MOVED[spec.name]}")
        successors = MOVED[spec.name]

        def __getattr__(name: str) -> object:  # PEP 562: only names the module itself lacks
            for successor in successors:
                module = importlib.import_module(successor)
                if hasattr(module, name):
                    return getattr(module, name)
            raise AttributeError(f"module {spec.name!r} (moved to {', '.join(successors)}) has no attribute {name!r}")

        alias.__getattr__ = __getattr__  # type: ignore[method-assign]  # a module-level __getattr__
        warnings.warn(
            f"{spec.name} is fastema 0.1's path, now {successors[0]}; something (an old pickle?) still names it",
            DeprecationWarning,
            stacklevel=2,
        )
        return alias

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the names come from the successors."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias())


def install() -> None:
    """Put the finder on `sys.meta_path` (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
