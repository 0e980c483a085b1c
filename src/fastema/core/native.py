"""The native CPU step: one C++ kernel (`native.cpp`) updates a whole group of pairs in one parallel pass.

Why: on CPU `_foreach_lerp_` costs about a microsecond per tensor (a TensorIterator and a thread
fork each) and runs tensors under 32768 elements on one thread, so a model of many small tensors
costs 2-3x one `lerp_` over the same bytes (MobileNetV3, EfficientNet), and inductor's compiled
function was no faster there. The kernel treats every pair of a group as one index space, splits
it across the threads once and widens a bfloat16 model value in registers for a float32 EMA (10
bytes per element against the fp32 floor's 12). Its arithmetic is ATen's `lerp_` for a scalar
weight, so it gives the eager step's values.

`compile=None` (the default) uses it on CPU for float32 EMAs of float32 or bfloat16 tensors. It
is built on first use with the C++ compiler PyTorch's extensions use (15-30 s, then cached on
disk by `torch.utils.cpp_extension`, under `TORCH_EXTENSIONS_DIR`); where that fails (no
compiler, another OS or CPU) the eager step runs instead, with one logged warning per process.
Each call reads the tensor objects it is given, so `p.data = ...` is followed; a pair it does not
take (another dtype, layout or size since planning) makes it write nothing and return False: the
eager step runs that update, and the step reports itself stale, so the plan is made again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .steps import Step, Weight, is_averaged, is_dense

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
EMA_DTYPES = (torch.float32,)
MODEL_DTYPES = (torch.float32, torch.bfloat16)
PLAIN = (Tensor, torch.nn.Parameter)  # subclasses (DTensor, fake tensors) keep PyTorch's kernels

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}  # "module": the built extension, or None once building failed


@functools.cache
def build_flags() -> list[str] | None:
    """Compiler flags for this machine, or None where the kernel is not built (not Linux, no AVX2 on x86)."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return None  # at::parallel_for is inlined: it needs OpenMP, as the PyTorch it runs with
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return None
        return ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    if machine in ("aarch64", "arm64"):
        return ["-O3", "-fopenmp"]
    return None


def extension_name(flags: Sequence[str]) -> str:
    """A name that changes with the source, the flags and torch (each gets its own cached build)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([*flags, torch.__version__]).encode())
    return f"fastema_native_{digest.hexdigest()[:12]}"


def load() -> ModuleType | None:
    """The built kernel (built now, or found in the cache), or None where it cannot be built here."""
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _build()
        return _loaded["module"]


# A build lock older than this was left by a build that was killed (torch before 2.6 waits on it forever).
STALE_LOCK_SECONDS = 600


def _build() -> ModuleType | None:
    flags = build_flags()
    if flags is None:
        logger.info("fastema: no native CPU kernel for this platform; the eager step runs")
        return None
    name = extension_name(flags)
    try:
        from torch.utils import cpp_extension  # imported only when a step builds

        _prepare(cpp_extension, name)
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, verbose=False)
    except Exception as error:  # no compiler, no ninja, missing headers: stay eager
        logger.warning(
            "fastema: building the native CPU kernel failed (%s: %s); using the eager step instead (same "
            "results, slower). Pass compile=False to skip it.",
            type(error).__name__,
            failure_cause(error),
        )
        logger.debug("building the native CPU kernel failed", exc_info=True)
        return None


def _prepare(cpp_extension: ModuleType, name: str) -> None:
    """Say that a build is coming (not when it is cached); remove a lock a killed build left behind."""
    try:  # a private helper of torch's: without it, build without these niceties
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    if not any(folder.glob(f"{name}*.so")):
        logger.warning(
            "fastema: building the native CPU kernel once for this machine (about 15-30 s; cached in %s). "
            "compile=False skips it.",
            folder,
        )


def failure_cause(error: BaseException) -> str:
    """The lines of a build error that say why (the compiler's, not ninja's command line), shortened."""
    noise = ("Error building extension", "[", "FAILED:", "ninja:")  # torch's and ninja's own lines
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(noise)]
    lines = lines or [str(error).strip()]
    telling = [line for line in lines if any(word in line.lower() for word in ("error", "not found", "no such"))]
    cause = " | ".join((telling or lines)[-2:])
    return cause if len(cause) <= 400 else cause[:397] + "..."


def native_kind(ema_tensor: Tensor, model_tensor: Tensor) -> str | None:
    """What the kernel does for this pair: "lerp" (a float32 EMA of float32 or bfloat16), "copy" (an integer or
    bool tensor of the same dtype), or None (not taken: not plain CPU memory of one size and dense layout).
    """
    plain = (
        type(ema_tensor) in PLAIN
        and type(model_tensor) in PLAIN
        and ema_tensor.device.type == "cpu"
        and model_tensor.device.type == "cpu"
        and ema_tensor.shape == model_tensor.shape
        and ema_tensor.numel() > 0
        and not (ema_tensor.is_neg() or model_tensor.is_neg())  # a lazily negated view: no plain memory to read
        and is_dense(ema_tensor)
        and is_dense(model_tensor)
        and (
            ema_tensor.stride() == model_tensor.stride()
            or (ema_tensor.is_contiguous() and model_tensor.is_contiguous())
        )
    )
    if not plain:
        return None
    if ema_tensor.dtype in EMA_DTYPES and model_tensor.dtype in MODEL_DTYPES:
        return "lerp"
    if ema_tensor.dtype == model_tensor.dtype and not (is_averaged(ema_tensor) or ema_tensor.is_quantized):
        return "copy"  # integers and bools; a quantized tensor's scale and zero point need copy_
    return None


def native_available() -> bool:
    """Whether `compile=None` plans native steps: the kernel can be built here and no build failed in this process."""
    return build_flags() is not None and _loaded.get("module", True) is not None


class NativeStep(Step):
    """A group's pairs updated by the native kernel; `eager` holds their eager steps (reference and fallback).

    `copy`: the pairs are copied (integer counts), else averaged. Builds (or loads) the kernel at its first
    step; `compile_seconds` says how long that took.
    """

    def __init__(
        self, ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], eager: list[Step], copy: bool = False
    ) -> None:
        self.copy = copy
        self.ema_tensors = list(ema_tensors)
        self.model_tensors = list(model_tensors)
        self.eager = eager
        self.module: ModuleType | None = None
        self.failed = False
        self.refused = False
        self.compile_seconds: float | None = None

    def step(self, weight: Weight) -> None:
        if self.module is None and not self.failed:
            began = time.perf_counter()
            self.module = load()
            self.failed = self.module is None
            self.compile_seconds = time.perf_counter() - began
        module = self.module
        if module is None:
            done = False
        elif self.copy:
            done = module.copy_many(self.ema_tensors, self.model_tensors)
        else:  # a tensor weight (an eager tensor decay) takes the eager step
            done = not isinstance(weight, Tensor) and module.lerp_many(self.ema_tensors, self.model_tensors, weight)
        if not done:  # no kernel, or a pair it refuses now (another layout since planning)
            self.refused = module is not None
            self._step_eagerly(weight)

    def _step_eagerly(self, weight: Weight) -> None:
        for step in self.eager:
            step.step(weight)

    def stale(self) -> bool:
        # A pair the kernel refused: planning again gives it to an eager step and the rest back to the kernel.
        return self.refused or any(step.stale() for step in self.eager)

    def __repr__(self) -> str:
        return f"NativeStep({'copy' if self.copy else 'lerp'}, {len(self.ema_tensors)} tensors, failed={self.failed})"
