"""The compiled step: one TorchInductor function updates a whole group of pairs, reading each once.

Why: on CPU a multi-tensor kernel still dispatches once per tensor and runs small tensors on one
thread, so a model of many small tensors costs 2-3x one `lerp_` over the same bytes; and a float32
EMA of a bfloat16 model needs the model's values in float32 first, which eagerly is a second pass
(a conversion into a staging buffer, then `lerp_`). Inductor emits one function for all the pairs
of a group, each a vectorised loop that reads the model's value, converts it in registers and
updates the EMA: 10 bytes per element for bf16 -> fp32 where the fp32 floor moves 12.

The compiled function is made from an FX graph built here, with the pairs' layouts baked in, and
called directly (no dynamo guards at each call: they cost about a microsecond per tensor). What a
guard would catch is checked here: `stale()` compares the tensors' data pointers (any `p.data = ...`
gives a new one; the tracker then re-plans, and a graph already compiled for the same layouts is
reused), and inductor's own asserts check sizes and strides at each call. The eager steps of the
same pairs stay: they are the reference the tests compare with, what runs inside a CUDA-graph
capture before the first compile, and the fallback when compiling fails (warned once per process).
Inside the caller's `torch.compile` the tracker traces `steps.traced_step` instead of any plan.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import Tensor

from .steps import NARROW, Step, Weight, is_averaged

logger = logging.getLogger(__name__)

_warned: list[bool] = [False]
_failed_devices: set[str] = set()  # device types where a compile failed: compile=None stays eager there
# Compiled functions by the layouts of their inputs: re-planning after `p.data = ...` with the same
# layouts, or a second EMA of the same model, costs no second compile.
_compiled: dict[tuple, object] = {}


def _graph(ema_tensors: Sequence[Tensor]) -> fx.GraphModule:
    """`lerp_pairs` for these EMA dtypes as an FX graph: inputs (*EMA tensors, *model tensors, weight)."""
    graph = fx.Graph()
    ema_nodes = [graph.placeholder(f"ema_{index}") for index in range(len(ema_tensors))]
    model_nodes = [graph.placeholder(f"model_{index}") for index in range(len(ema_tensors))]
    weight = graph.placeholder("weight")
    for ema_tensor, ema_node, model_node in zip(ema_tensors, ema_nodes, model_nodes):
        if ema_tensor.dtype in NARROW:
            wide = [graph.call_method("float", (node,)) for node in (ema_node, model_node, weight)]
            graph.call_method("copy_", (ema_node, graph.call_function(torch.lerp, tuple(wide))))
        else:
            model_value = graph.call_method("to", (model_node, ema_tensor.dtype))
            graph.call_method("lerp_", (ema_node, model_value, graph.call_method("to", (weight, ema_tensor.dtype))))
    graph.output(())
    return fx.GraphModule(torch.nn.Module(), graph)


def _layout(tensor: Tensor) -> tuple:
    return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)


def compile_pairs(ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], weight: Tensor):
    """The compiled `lerp_pairs` for these tensors' layouts (compiled now, or found from an earlier compile)."""
    key = tuple(_layout(tensor) for tensor in (*ema_tensors, *model_tensors, weight))
    if key not in _compiled:
        # Imported only when a step compiles.
        from torch._inductor import compile as inductor_compile
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # Fake example inputs with a shape environment: what inductor's on-disk graph cache needs to key a
        # graph compiled without dynamo (given real tensors it bypasses the cache, and each process compiles).
        mode = FakeTensorMode(shape_env=ShapeEnv())
        examples = (*ema_tensors, *model_tensors, weight)
        inputs: list = [mode.from_tensor(tensor, static_shapes=True) for tensor in examples]
        _compiled[key] = inductor_compile(_graph(ema_tensors), inputs)
    return _compiled[key]


def compile_by_default(device: torch.device, ema_dtype: torch.dtype, model_dtype: torch.dtype) -> bool:
    """What `compile=None` compiles: on CPU, groups that convert on the way (an EMA dtype other than the
    model's) and that the native kernel (`native.py`, planned first) does not take, e.g. a float32 EMA
    of float16 tensors.

    Measured on a quiet 2-core CPU (docs/benchmarks.md), a float32 EMA of a bfloat16 model:
    0.84-1.02x the fp32 floor compiled against 1.12-3.9x eagerly on large models (2.3-3.7x against
    2.7-9.3x on small-tensor ones), 0.57-1.07x packed; a compile takes 3-42 s for a few hundred
    tensors, 0.1 s for packed buffers, once per layout and machine (inductor caches it on disk).
    With one dtype on both sides the eager step is kept: compiled it was no faster. On CUDA
    nothing was measured yet (`make gpu-check` does). After a compile failed on a device type,
    `None` stops trying there.
    """
    return device.type == "cpu" and ema_dtype != model_dtype and device.type not in _failed_devices


def compilable(ema_tensor: Tensor, model_tensor: Tensor) -> bool:
    """Whether a pair can join a compiled step: averaged, real memory, same device on both sides."""
    return (
        is_averaged(ema_tensor)
        and is_averaged(model_tensor)
        and not ema_tensor.is_complex()
        and ema_tensor.device == model_tensor.device
        and ema_tensor.device.type in ("cpu", "cuda")
        and ema_tensor.numel() > 0
    )


class CompiledStep(Step):
    """The averaged pairs of one group updated by one compiled function; `eager` holds their eager steps.

    Compiles at its first step (`compile_seconds` says how long it took, a cache hit included).
    """

    def __init__(
        self,
        ema_tensors: Sequence[Tensor],
        model_tensors: Sequence[Tensor],
        eager: list[Step],
        warn: bool = True,  # warn if compiling fails (asked for); else fall back quietly (chosen by default)
    ) -> None:
        self.ema_tensors = list(ema_tensors)
        self.model_tensors = list(model_tensors)
        self.eager = eager
        self.arguments = [*self.ema_tensors, *self.model_tensors]
        self.addresses = self._addresses()
        self.weight = torch.zeros((), dtype=torch.float64, device=self.ema_tensors[0].device)
        self.function = None
        self.warn = warn
        self.failed = False
        self.compile_seconds: float | None = None

    def _addresses(self) -> list[int]:
        return list(map(Tensor.data_ptr, self.arguments))

    def stale(self) -> bool:
        """A tensor got new data (`p.data = ...`): the compiled function's layouts may no longer hold."""
        return self._addresses() != self.addresses

    def _compile(self) -> None:
        began = time.perf_counter()
        try:
            self.function = compile_pairs(self.ema_tensors, self.model_tensors, self.weight)
        except Exception as error:  # no compiler, an unsupported dtype or device, an inductor bug: stay eager
            self.failed = True
            _failed_devices.add(self.ema_tensors[0].device.type)
            if self.warn and not _warned[0]:
                _warned[0] = True
                warnings.warn(
                    f"fastema: compiling the EMA step failed ({type(error).__name__}: {error}); using the eager "
                    "step instead (same results, slower). Pass compile=False to skip compiling.",
                    UserWarning,
                    stacklevel=2,
                )
            logger.debug("compiling the EMA step failed", exc_info=True)
        self.compile_seconds = time.perf_counter() - began

    def step(self, weight: Weight) -> None:
        if self.function is None and not self.failed:
            if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                self._step_eagerly(weight)  # compiling runs work that a CUDA-graph capture cannot hold
                return
            self._compile()
        if self.failed:
            self._step_eagerly(weight)
            return
        if isinstance(weight, Tensor):
            self.weight.copy_(weight)
        else:
            self.weight.fill_(weight)
        self.function(*self.arguments, self.weight)  # type: ignore[misc]  # set by _compile

    def _step_eagerly(self, weight: Weight) -> None:
        for step in self.eager:
            step.step(weight)

    def __repr__(self) -> str:
        return f"CompiledStep({len(self.ema_tensors)} tensors, failed={self.failed})"
