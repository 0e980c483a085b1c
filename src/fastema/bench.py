"""`fastema bench`: time one EMA step of fastema against the usual ways of writing it, and the floor.

For each model, in the same run and on the same tensors, the median time of one EMA step:

- `for-loop`: `ema.mul_(d).add_(model, alpha=1-d)` per tensor, the textbook step;
- `mul+add`: the seed's fused step, `_foreach_mul_` then `_foreach_add_`, tensors re-grouped every step;
- `foreach_lerp`: `torch._foreach_lerp_` over lists grouped once (timm `ModelEmaV3`);
- `fastema`: `ModelEMA.update()` with its defaults (on CPU the native kernel for float32 EMAs of
  float32 or bfloat16 models, `core/native.py`); `fastema eager`: `ModelEMA(compile=False)`, PyTorch's
  kernels only (`_foreach_lerp_`, or a staging buffer and two passes for a wider EMA dtype);
- `fastema flat`: `ModelEMA(flatten_model=True).update()` (model and EMA packed into flat buffers);
- `fastema compiled`: `ModelEMA(compile=True).update()`, one TorchInductor function per group of
  tensors (the model's storage untouched); `flat compiled`: the same over the packed buffers. Their
  compile time (the first update's, a cache hit included) is reported apart (`compile_seconds`);
- `floor`: one `lerp_` over a contiguous buffer with as many elements, in the EMA's dtype;
- `posthoc K=2`: `PostHocEMA(sigma_rels=(0.05, 0.10)).update()`, two power-function EMAs in one
  pass over the model, against `2x fastema`, two `ModelEMA` updates (what tracking two EMAs
  costs without it); both move twice the EMA memory of the floor.

It also reports the memory a step allocates and the share of a training step the EMA costs.

`--peers` adds the libraries people would use instead, each installed one constructed and
updated as its documentation shows (their Python overhead is part of what a user pays), timed
in the same interleaved rounds: timm `ModelEmaV3` (`ema.update(model, step=...)`),
`torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(d))`
(`update_parameters`), Lightning's `EMAWeightAveraging` (an `AveragedModel` with
`avg_fn=get_ema_avg_fn(d)` and `use_buffers=True`, which the callback updates after each
step), ema-pytorch (`EMA(model, beta=d, update_after_step=0, update_every=1).update()`),
torch-ema (`ExponentialMovingAverage(parameters, decay=d).update()`) and diffusers' `EMAModel`
(`EMAModel(model.parameters(), decay=d, foreach=...).step(model.parameters())`, foreach off, its
default, and on), beside fastema's drop-in for it, `fastema.diffusers.EMAModel`, called the same
way. `pip install fastema[bench]` installs them.

`--ema-dtype float32` with `--dtype bfloat16` times a float32 EMA of a bfloat16 model
(`foreach_lerp` cannot run: `_foreach_lerp_` refuses mixed dtypes). `--ema-device cpu` with
`--device cuda` times an EMA offloaded to host memory: each step is then timed to completion
(GPU and background thread), the floor is one device-to-host copy into pinned memory plus one
CPU `lerp_`, and `fastema (training thread)` is how long `update()` holds the training loop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .core.model_ema import ModelEMA
from .posthoc.averager import PostHocEMA

METHODS = [
    "for-loop",
    "mul+add",
    "foreach_lerp",
    "fastema",
    "fastema eager",
    "fastema flat",
    "fastema compiled",
    "flat compiled",
    "floor",
    "posthoc K=2",
    "2x fastema",
]
COMPILED = ["fastema", "fastema flat", "fastema compiled", "flat compiled"]
PEERS = [
    "timm ModelEmaV3",
    "AveragedModel multi_avg_fn",
    "Lightning EMAWeightAveraging",
    "ema-pytorch",
    "torch-ema",
    "diffusers EMAModel",
    "diffusers EMAModel foreach",
    "fastema.diffusers EMAModel",
]
OFFLOAD_METHOD = "fastema (training thread)"
MEMORY_SHOWN = ["fastema", "fastema flat", "fastema compiled", "posthoc K=2"]
DECAY = 0.9998


def _fastai_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from fastai.vision.models import xresnet

        return getattr(xresnet, name)()

    return build


def _timm_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


class _Denoiser(nn.Module):
    """A diffusers `UNet2DModel` called as an image model: 32x32 crops of the input, timestep 0."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, images: Tensor) -> Tensor:
        return self.unet(images[..., :32, :32], 0).sample


def _ddpm_unet32() -> nn.Module:
    from diffusers import UNet2DModel

    # The block layout of google/ddpm-cifar10-32 (35.7M parameters), built from the configuration: no download.
    return _Denoiser(
        UNet2DModel(
            sample_size=32,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    )


def _deberta_base() -> nn.Module:
    from transformers import DebertaConfig, DebertaModel

    return DebertaModel(DebertaConfig())  # DebertaConfig's defaults are microsoft/deberta-base; no download


# name -> (builder, kind of input); the seed's table first, then two small-tensor models and a diffusion UNet.
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "xresnet50": (_fastai_model("xresnet50"), "image"),
    "xse_resnext50": (_fastai_model("xse_resnext50"), "image"),
    "xresnet101": (_fastai_model("xresnet101"), "image"),
    "convnext_tiny": (_timm_model("convnext_tiny"), "image"),
    "vit_small_patch16_224": (_timm_model("vit_small_patch16_224"), "image"),
    "deberta_base": (_deberta_base, "tokens"),
    "mobilenetv3_small_100": (_timm_model("mobilenetv3_small_100"), "image"),
    "efficientnet_b0": (_timm_model("efficientnet_b0"), "image"),
    "ddpm_unet32": (_ddpm_unet32, "image"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelResult:
    """One model's row: milliseconds per step for each method, and what the step costs besides time."""

    model: str
    tensors: int
    elements: int
    ms: dict[str, float | None]  # None: the method cannot run in this configuration
    extra_memory_bytes: dict[str, int]
    train_step_ms: float | None
    compile_seconds: dict[str, float] = field(default_factory=dict)  # each compiled method's first update
    ratios: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ms = self.ms
        pairs = {
            "speedup vs for-loop": ("for-loop", "fastema"),
            "speedup vs mul+add": ("mul+add", "fastema"),
            "speedup vs foreach_lerp": ("foreach_lerp", "fastema"),
            "fastema / floor": ("fastema", "floor"),
            "fastema eager / floor": ("fastema eager", "floor"),
            "fastema flat / floor": ("fastema flat", "floor"),
            "fastema compiled / floor": ("fastema compiled", "floor"),
            "flat compiled / floor": ("flat compiled", "floor"),
            "flat speedup vs mul+add": ("mul+add", "fastema flat"),
            "posthoc K=2 vs 2x fastema": ("2x fastema", "posthoc K=2"),
            "posthoc K=2 / floor": ("posthoc K=2", "floor"),
        }
        for name, (top, bottom) in pairs.items():
            numerator, denominator = ms[top], ms[bottom]
            if numerator is not None and denominator is not None:
                self.ratios[name] = numerator / denominator
        ours = ms["fastema"]
        for peer in PEERS:
            if ms.get(peer) is not None and ours is not None:
                self.ratios[f"{peer} / fastema"] = ms[peer] / ours  # type: ignore[operator]  # checked just above
        # Like for like: the same tensors (parameters only, frozen ones copied), stepped the same way.
        drop_in = ms.get("fastema.diffusers EMAModel")
        for peer in ("diffusers EMAModel", "diffusers EMAModel foreach"):
            if ms.get(peer) is not None and drop_in is not None:
                self.ratios[f"{peer} / fastema.diffusers"] = ms[peer] / drop_in  # type: ignore[operator]
        if self.train_step_ms is not None and ours is not None:
            self.ratios["EMA share of train step"] = ours / (self.train_step_ms + ours)


def peer_steps(model: nn.Module) -> dict[str, Callable[[], None]]:
    """One EMA step of each installed peer library, built and called as its documentation shows."""
    import importlib.util

    steps: dict[str, Callable[[], None]] = {}
    if importlib.util.find_spec("timm") is not None:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=DECAY)
        timm_steps = iter(range(1, 1 << 62))
        steps["timm ModelEmaV3"] = lambda: timm_ema.update(model, step=next(timm_steps))
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    steps["AveragedModel multi_avg_fn"] = lambda: averaged.update_parameters(model)
    if importlib.util.find_spec("lightning") is not None:
        # What `lightning.pytorch.callbacks.EMAWeightAveraging(decay=d)` builds and updates after each step.
        lightning_average = AveragedModel(model, use_buffers=True, avg_fn=get_ema_avg_fn(DECAY))
        steps["Lightning EMAWeightAveraging"] = lambda: lightning_average.update_parameters(model)
    if importlib.util.find_spec("ema_pytorch") is not None:
        from ema_pytorch import EMA

        ema_pytorch = EMA(model, beta=DECAY, update_after_step=0, update_every=1)
        steps["ema-pytorch"] = ema_pytorch.update
    if importlib.util.find_spec("torch_ema") is not None:
        from torch_ema import ExponentialMovingAverage

        torch_ema = ExponentialMovingAverage(model.parameters(), decay=DECAY)
        steps["torch-ema"] = torch_ema.update
    if importlib.util.find_spec("diffusers") is not None:
        from diffusers.training_utils import EMAModel as DiffusersEMAModel

        from .diffusers import EMAModel

        diffusers_emas = {
            "diffusers EMAModel": DiffusersEMAModel(model.parameters(), decay=DECAY),
            "diffusers EMAModel foreach": DiffusersEMAModel(model.parameters(), decay=DECAY, foreach=True),
            "fastema.diffusers EMAModel": EMAModel(model.parameters(), decay=DECAY),
        }
        for name, diffusers_ema in diffusers_emas.items():
            steps[name] = functools.partial(diffusers_step, diffusers_ema, model)
    return steps


def diffusers_step(ema: Any, model: nn.Module) -> None:
    """One step of a diffusers-style `EMAModel` as the training scripts take it: given the parameters each time."""
    ema.step(model.parameters())


def two_updates(first: ModelEMA, second: ModelEMA) -> None:
    """Two EMAs of one model, as two ModelEMA updates (what PostHocEMA's one pass is compared with)."""
    first.update()
    second.update()


def for_loop_step(ema_tensors: list[Tensor], model_tensors: list[Tensor], decay: float) -> None:
    """The textbook per-tensor step (integer buffers copied; an offloaded EMA gets a `.to()` per tensor)."""
    for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
        if ema_tensor.device != model_tensor.device:
            model_tensor = model_tensor.to(ema_tensor.device)
        if ema_tensor.is_floating_point():
            ema_tensor.mul_(decay).add_(model_tensor, alpha=1 - decay)
        else:
            ema_tensor.copy_(model_tensor)


def tensors_by_name(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers of `module` by state-dict name."""
    tensors: dict[str, Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def mul_add_step(ema_module: nn.Module, model: nn.Module, decay: float) -> None:
    """The seed's fused step: re-group floating tensors every step, then `_foreach_mul_` + `_foreach_add_`."""
    ema_floats: list[Tensor] = []
    model_floats: list[Tensor] = []
    ema_ints: list[Tensor] = []
    model_ints: list[Tensor] = []
    ema_by_name = tensors_by_name(ema_module)
    model_tensors: dict[str, Tensor] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    model_tensors.update(model.named_buffers())
    for name, model_tensor in model_tensors.items():
        ema_tensor = ema_by_name[name]
        if model_tensor.is_floating_point():
            ema_floats.append(ema_tensor)
            model_floats.append(model_tensor)
        else:
            ema_ints.append(ema_tensor)
            model_ints.append(model_tensor)
    if ema_floats[0].device != model_floats[0].device:  # the seed's offloaded step: copy the model over first
        model_floats = [tensor.to(ema_floats[0].device) for tensor in model_floats]
    torch._foreach_mul_(ema_floats, decay)
    torch._foreach_add_(ema_floats, model_floats, alpha=1 - decay)
    if ema_ints:
        torch._foreach_copy_(ema_ints, model_ints)


def foreach_lerp_step(ema_floats: list[Tensor], model_floats: list[Tensor], ema_ints, model_ints, decay) -> None:
    """timm `ModelEmaV3`'s step: lists grouped once, `_foreach_lerp_` for floats, copy for the rest."""
    torch._foreach_lerp_(ema_floats, model_floats, 1 - decay)
    if ema_ints:
        torch._foreach_copy_(ema_ints, model_ints)


class Timer:
    """Median milliseconds per call; CUDA work is timed with events, synchronising only outside them.

    Methods are timed in interleaved rounds, so a slow spell of the machine hits them all alike.
    """

    def __init__(self, device: torch.device, budget_s: float, rounds: int = 5, min_repeats: int = 2) -> None:
        self.device = device
        self.budget_s = budget_s
        self.rounds = rounds
        self.min_repeats = min_repeats

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _samples_ms(self, step: Callable[[], None], repeats: int) -> list[float]:
        if self.device.type == "cuda":
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
            ]
            for start, end in events:
                start.record()
                step()
                end.record()
            self._synchronize()
            return [start.elapsed_time(end) for start, end in events]
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            step()
            samples.append((time.perf_counter() - began) * 1e3)
        return samples

    def compare(self, steps: dict[str, Callable[[], None]]) -> dict[str, float]:
        """Median ms per call of each step, measured in interleaved rounds after a warm-up."""
        repeats = {}
        for name, step in steps.items():
            self._synchronize()
            began = time.perf_counter()
            for _ in range(3):  # warm-up: caches, lazy initialisation, allocator
                step()
            self._synchronize()
            per_call = max((time.perf_counter() - began) / 3, 1e-7)
            repeats[name] = max(self.min_repeats, int(self.budget_s / self.rounds / per_call))
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(self.rounds):
            for name, step in steps.items():
                samples[name] += self._samples_ms(step, repeats[name])
        return {name: statistics.median(values) for name, values in samples.items()}


def extra_memory_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Memory one step allocates beyond what exists before it.

    CUDA: peak of `torch.cuda.max_memory_allocated` during the step minus the allocation before.
    CPU: the sum of every allocation the PyTorch profiler records during the step (an upper
    bound of the peak; tracemalloc cannot see tensor storage).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    return sum(event.self_cpu_memory_usage for event in profiler.key_averages() if event.self_cpu_memory_usage > 0)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side prints `USDT ... profiler_start/stop` lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def example_input(kind: str, batch_size: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "tokens":
        return torch.randint(0, 1000, (batch_size, 128), generator=generator).to(device)
    return torch.randn(batch_size, 3, 224, 224, generator=generator).to(device)


def train_step_ms(model: nn.Module, kind: str, batch_size: int, timer: Timer, dtype: torch.dtype) -> float:
    """Forward, backward and an SGD step on a copy of the model (what the EMA step is compared with)."""
    model = copy.deepcopy(model).train()
    inputs = example_input(kind, batch_size, timer.device)
    if kind == "image":
        inputs = inputs.to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step() -> None:
        output = model(inputs)
        output = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
        output.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    quick = Timer(timer.device, budget_s=0.0, rounds=1, min_repeats=3)
    return quick.compare({"train": step})["train"]


def bench_model(
    name: str,
    model: nn.Module,
    kind: str,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    timer: Timer,
    train_batch: int | None,
    ema_dtype: torch.dtype | None = None,
    ema_device: torch.device | None = None,
    peers: bool = False,
) -> ModelResult:
    """Every method on the same model, in one run."""
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ours = ModelEMA(model, DECAY, ema_dtype=ema_dtype, device=ema_device)
    flat_model = copy.deepcopy(model)  # packing changes the model's storage, so it gets its own copy
    flat = ModelEMA(flat_model, DECAY, flatten_model=True, ema_dtype=ema_dtype, device=ema_device)
    compiled = ModelEMA(model, DECAY, ema_dtype=ema_dtype, device=ema_device, compile=True)
    flat_compiled = ModelEMA(
        flat_model, DECAY, flatten_model=True, ema_dtype=ema_dtype, device=ema_device, compile=True
    )
    eager = ModelEMA(model, DECAY, ema_dtype=ema_dtype, device=ema_device, compile=False)
    compile_seconds = {}
    for method, ema in zip(COMPILED, (ours, flat, compiled, flat_compiled)):
        ema.update()  # builds or compiles (or finds the result in the disk cache)
        ema.synchronize()
        compile_seconds[method] = ema._tracker.plan.compile_seconds()
    second = ModelEMA(model, 0.999, ema_dtype=ema_dtype, device=ema_device)
    loop_ema = copy.deepcopy(ours.module)
    mul_add_ema = copy.deepcopy(ours.module)
    lerp_ema = copy.deepcopy(ours.module)

    names = ours.tensor_names
    model_by_name, loop_by_name, lerp_by_name = (tensors_by_name(m) for m in (model, loop_ema, lerp_ema))
    model_tensors = [model_by_name[name] for name in names]
    loop_tensors = [loop_by_name[name] for name in names]
    float_pairs = [(lerp_by_name[n], t) for n, t in zip(names, model_tensors) if t.is_floating_point()]
    int_pairs = [(lerp_by_name[n], t) for n, t in zip(names, model_tensors) if not t.is_floating_point()]
    lerp_floats, lerp_model_floats = map(list, zip(*float_pairs))
    lerp_ints, lerp_model_ints = (list(x) for x in zip(*int_pairs)) if int_pairs else ([], [])
    elements = sum(tensor.numel() for _, tensor in float_pairs)
    offloaded = ema_device is not None and ema_device != device
    floor_ema = torch.zeros(elements, device=ema_device or device, dtype=ema_dtype or dtype)
    floor_model = torch.ones(elements, device=ema_device or device, dtype=ema_dtype or dtype)

    def floor_lerp() -> None:
        floor_ema.lerp_(floor_model, 1 - DECAY)

    steps: dict[str, Callable[[], None]] = {
        "for-loop": lambda: for_loop_step(loop_tensors, model_tensors, DECAY),
        "mul+add": lambda: mul_add_step(mul_add_ema, model, DECAY),
        "foreach_lerp": lambda: foreach_lerp_step(lerp_floats, lerp_model_floats, lerp_ints, lerp_model_ints, DECAY),
        "fastema": ours.update,
        "fastema eager": eager.update,
        "fastema flat": flat.update,
        "fastema compiled": compiled.update,
        "flat compiled": flat_compiled.update,
        "floor": floor_lerp,
        "2x fastema": lambda: two_updates(ours, second),
    }
    if ema_device is None:  # PostHocEMA keeps its EMAs beside the model
        steps["posthoc K=2"] = PostHocEMA(model, (0.05, 0.10), ema_dtype=ema_dtype).update
    if peers:
        if ema_dtype is not None or ema_device is not None:
            raise ValueError("Invalid peers: True with ema_dtype or ema_device; the peers keep the model's dtype")
        steps.update(peer_steps(model))
    if lerp_floats[0].dtype != lerp_model_floats[0].dtype or offloaded:
        del steps["foreach_lerp"]  # `_foreach_lerp_` needs one dtype and one device on both sides
    if offloaded:
        # The least an offloaded update can do: one copy of the model's elements to pinned host memory, one lerp_.
        gpu_flat = torch.ones(elements, device=device, dtype=dtype)
        pinned = torch.empty(elements, dtype=dtype, pin_memory=True)

        def floor_step() -> None:
            pinned.copy_(gpu_flat, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            floor_ema.lerp_(pinned if pinned.dtype == floor_ema.dtype else floor_model, 1 - DECAY)

        steps["floor"] = floor_step
        emas = (ours, eager, flat, compiled, flat_compiled)
        steps = {method: _to_completion(step, device, emas) for method, step in steps.items()}
    # An offloaded step ends in a background thread, which CUDA events cannot see: time it on the host.
    step_timer = Timer(torch.device("cpu"), timer.budget_s, timer.rounds, timer.min_repeats) if offloaded else timer
    with torch.no_grad():
        ms: dict[str, float | None] = dict.fromkeys(METHODS + (PEERS if peers else []))
        ms.update(step_timer.compare(steps))
        if offloaded:
            ms[OFFLOAD_METHOD] = _training_thread_ms(ours, step_timer)
        memory = {method: extra_memory_bytes(steps[method], device) for method in steps}
    train_ms = None if train_batch is None else train_step_ms(model, kind, train_batch, timer, dtype)
    return ModelResult(name, len(model_tensors), elements, ms, memory, train_ms, compile_seconds)


def _to_completion(step: Callable[[], None], device: torch.device, emas: tuple[ModelEMA, ...]) -> Callable[[], None]:
    """`step`, then wait for the GPU and for background EMA updates: an offloaded step's whole cost."""

    def run() -> None:
        step()
        torch.cuda.synchronize(device)
        for ema in emas:
            ema.synchronize()

    return run


def _training_thread_ms(ema: ModelEMA, timer: Timer) -> float:
    """Median time `update()` holds the caller, each time after the previous update has finished."""
    samples = []
    for _ in range(max(timer.min_repeats, 5 * timer.rounds)):
        ema.synchronize()
        began = time.perf_counter()
        ema.update()
        samples.append((time.perf_counter() - began) * 1e3)
    ema.synchronize()
    return statistics.median(samples)


def machine_description(
    device: torch.device,
    dtype_name: str,
    channels_last: bool,
    ema_dtype: str | None = None,
    ema_device: str | None = None,
) -> dict[str, str]:
    """The run's setting, for the report's header (the EMA's dtype and device only where they were asked for)."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_name() + f", {torch.get_num_threads()} torch threads"
    return {
        "device": str(device),
        "hardware": hardware,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": dtype_name,
        **({"ema_dtype": ema_dtype} if ema_dtype else {}),
        **({"ema_device": ema_device} if ema_device else {}),
        "channels_last": str(channels_last),
        "command": "fastema bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "fastema bench",
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_report(machine: dict[str, str], results: list[ModelResult]) -> str:
    """The tables that `docs/benchmarks.md` holds."""
    lines = [", ".join(f"{key}: {value}" for key, value in machine.items()), ""]
    lines.append("Median ms per EMA step:")
    lines.append("")
    methods = list(results[0].ms) if results else METHODS
    lines.append("| model | tensors | elements (M) | " + " | ".join(methods) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(methods))
    for result in results:
        times = " | ".join("n/a" if result.ms[method] is None else f"{result.ms[method]:.3f}" for method in methods)
        lines.append(f"| {result.model} | {result.tensors} | {result.elements / 1e6:.1f} | {times} |")
    lines += ["", "Ratios (same run):", ""]
    ratio_names = list(dict.fromkeys(name for result in results for name in result.ratios))
    memory_header = "extra memory (" + ", ".join(MEMORY_SHOWN) + ")"
    lines.append("| model | " + " | ".join(ratio_names) + f" | compile s ({', '.join(COMPILED)}) | {memory_header} |")
    lines.append("|---|" + "---:|" * (len(ratio_names) + 2))
    for result in results:
        cells = []
        for ratio in ratio_names:
            value = result.ratios.get(ratio)
            if value is None:
                cells.append("n/a")
            else:
                cells.append(f"{100 * value:.2f}%" if ratio.startswith("EMA share") else f"{value:.2f}x")
        memory = ", ".join(f"{result.extra_memory_bytes.get(method, 'n/a')} B" for method in MEMORY_SHOWN)
        compile_times = ", ".join(f"{result.compile_seconds.get(method, 0.0):.1f}" for method in COMPILED)
        lines.append(f"| {result.model} | " + " | ".join(cells) + f" | {compile_times} | {memory} |")
    return "\n".join(lines)


def plot_results(path: str, machine: dict[str, str], results: list[ModelResult]) -> None:
    """Horizontal bars: each method's time per step relative to the floor (1.0 = one flat lerp_)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [method for method in list(results[0].ms) if method != "floor" and method != OFFLOAD_METHOD]
    fig, ax = plt.subplots(figsize=(9, 1.1 + 0.75 * len(results)))
    height = 0.8 / len(methods)
    for index, method in enumerate(methods):
        positions = [row - 0.4 + height * (index + 0.5) for row in range(len(results))]
        ratios = [_ratio(result.ms[method], result.ms["floor"]) for result in results]
        ax.barh(positions, ratios, height=height, label=method)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="floor (one flat lerp_)")
    ax.set_yticks(range(len(results)), [r.model for r in results])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time per EMA step / floor (lower is better, log scale)")
    ax.set_title(f"EMA step on {machine['hardware']} ({machine['dtype']}, torch {machine['torch']})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ratio(numerator: float | None, denominator: float | None) -> float:
    """numerator / denominator, or NaN (no bar) where a method could not run."""
    return float("nan") if numerator is None or denominator is None else numerator / denominator


def run_bench(
    models: list[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    channels_last: bool = False,
    as_json: bool = False,
    plot: str | None = None,
    budget_s: float = 0.5,
    train_batch: int | None = 2,
    custom_models: dict[str, tuple[Callable[[], nn.Module], str]] | None = None,
    ema_dtype: str | None = None,
    ema_device: str | None = None,
    peers: bool = False,
) -> list[ModelResult]:
    """Run the benchmark and print a markdown report (or JSON); `custom_models` adds models by name."""
    catalogue = dict(MODELS, **(custom_models or {}))
    names = models or list(MODELS)
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        raise ValueError(f"Invalid models: {unknown}; expected names from {list(catalogue)}")
    for name, value in (("dtype", dtype), ("ema_dtype", ema_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"Invalid {name}: {value!r}; expected one of {list(DTYPES)}")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("Invalid device: 'cuda', but CUDA is not available on this machine")
    if ema_device not in (None, "cpu") or (ema_device == "cpu" and torch_device.type != "cuda"):
        raise ValueError(f"Invalid ema_device: {ema_device!r}; expected None, or 'cpu' with device='cuda' (offloading)")
    timer = Timer(torch_device, budget_s=budget_s)
    machine = machine_description(torch_device, dtype, channels_last, ema_dtype, ema_device)
    results = []
    for name in names:
        builder, kind = catalogue[name]
        torch.manual_seed(0)
        results.append(
            bench_model(
                name,
                builder(),
                kind,
                torch_device,
                DTYPES[dtype],
                channels_last,
                timer,
                train_batch,
                ema_dtype=DTYPES[ema_dtype] if ema_dtype else None,
                ema_device=torch.device(ema_device) if ema_device else None,
                peers=peers,
            )
        )
        if not as_json:
            print(f"measured {name}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({"machine": machine, "results": [asdict(result) for result in results]}, indent=2))
    else:
        print(markdown_report(machine, results))
    if plot:
        plot_results(plot, machine, results)
    return results
