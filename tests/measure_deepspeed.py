"""DeepSpeed ZeRO-3, 2 gloo ranks on CPU: fastema beside diffusers' `EMAModel`; bf16 partitions vs fp32 masters.

    PYTHONPATH=src python tests/measure_deepspeed.py     # one run; the numbers for docs/multi-gpu.md

1. Per-rank EMA memory and the time of one EMA update, under one config (a bf16 engine, a float32 EMA):
   fastema's `ModelEMA(engine)` keeps this rank's partitions and updates them locally; diffusers'
   `EMAModel` (as its training scripts build it under ZeRO-3: from a whole float32 copy of the model)
   keeps the whole model on every rank and gathers every parameter at every step.
2. What fastema averages under a bf16 engine: the bf16 partitions the model computes with. DeepSpeed
   also keeps float32 master partitions; the EMA of the bf16 copies is compared with a float64 EMA of
   the masters over many small steps, in units of bf16's relative spacing (2^-7 |w|).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
from torch import nn

import distributed_workers as workers
from deepspeed_workers import config

WIDTH, LAYERS, TIMED_STEPS = 1024, 4, 20


def model_of(width, layers):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def engine_of(model, lr=0.05):
    import deepspeed

    settings = config(3)
    settings["gradient_accumulation_steps"] = 1
    settings["optimizer"]["params"]["lr"] = lr
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=settings)
    return engine


def step(engine, generator, width):
    x = torch.randn(2, width, generator=generator).bfloat16()
    engine.backward(engine(x).float().square().mean())
    engine.step()


def timed(update, steps):
    """Mean seconds of `update()` over `steps` calls, every rank in step (a barrier before each)."""
    total = 0.0
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        update()
        total += time.perf_counter() - start
    return total / steps


def cost_worker(rank, out_dir):
    """Per-rank bytes and seconds per update: fastema and diffusers on the same engine, the same steps."""
    from transformers.integrations import HfDeepSpeedConfig

    from fastema import ModelEMA

    whole = model_of(WIDTH, LAYERS)  # diffusers' scripts build the EMA from a whole float32 model
    engine = engine_of(model_of(WIDTH, LAYERS))
    settings = HfDeepSpeedConfig(config(3))  # noqa: F841 - held: it tells diffusers that ZeRO-3 is on
    from diffusers.training_utils import EMAModel  # after: it imports DeepSpeed only if ZeRO-3 is on then

    diffusers_ema = EMAModel(whole.parameters(), decay=0.999, foreach=True)
    fastema_ema = ModelEMA(engine, 0.999, ema_dtype=torch.float32)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):  # warm-up: DeepSpeed's trace, the EMA's plan, diffusers' first gathers
        step(engine, generator, WIDTH)
        fastema_ema.update()
        diffusers_ema.step(engine.module.parameters())
    fastema_seconds = timed(fastema_ema.update, TIMED_STEPS)
    diffusers_seconds = timed(lambda: diffusers_ema.step(engine.module.parameters()), TIMED_STEPS)
    fastema_bytes = sum(t.numel() * t.element_size() for t in fastema_ema._tracker.binding.ema_tensors)
    diffusers_bytes = sum(t.numel() * t.element_size() for t in diffusers_ema.shadow_params)
    torch.save(
        {"fastema": (fastema_bytes, fastema_seconds), "diffusers": (diffusers_bytes, diffusers_seconds)},
        os.path.join(out_dir, f"cost{rank}.pt"),
    )


def precision_worker(rank, out_dir, steps=400, decay=0.99):
    """fastema's float32 EMA of the bf16 partitions against a float64 EMA of DeepSpeed's float32 masters."""
    from deepspeed.utils import safe_get_local_fp32_param

    from fastema import ModelEMA
    from fastema.core.zero import partition

    engine = engine_of(model_of(64, 2), lr=1e-4)  # small steps: many of them change no bf16 value
    params = list(engine.module.parameters())
    ema = ModelEMA(engine, decay, ema_dtype=torch.float32)

    def masters():
        return [safe_get_local_fp32_param(p)[: partition(p).numel()].double() for p in params]

    oracle = masters()
    generator = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        step(engine, generator, 64)
        ema.update()
        oracle = [o.lerp(m, 1 - decay) for o, m in zip(oracle, masters())]
    errors, spacings = [], []
    for ema_tensor, expected, p in zip(ema._tracker.binding.ema_tensors, oracle, params):
        errors.append((ema_tensor.double() - expected).abs())
        spacings.append(torch.finfo(torch.bfloat16).eps * partition(p).double().abs().clamp_min(1e-30))
    error, spacing = torch.cat(errors), torch.cat(spacings)
    torch.save(
        {
            "max_in_ulps": (error / spacing).max().item(),
            "mean_in_ulps": (error / spacing).mean().item(),
            "max_abs": error.max().item(),
        },
        os.path.join(out_dir, f"precision{rank}.pt"),
    )


def main():
    with tempfile.TemporaryDirectory() as out_dir:
        workers.launch(cost_worker, out_dir, 900)
        workers.launch(precision_worker, out_dir, 900)
        costs = [torch.load(os.path.join(out_dir, f"cost{r}.pt")) for r in range(workers.WORLD)]
        precision = [torch.load(os.path.join(out_dir, f"precision{r}.pt")) for r in range(workers.WORLD)]
    parameters = LAYERS * (WIDTH * WIDTH + WIDTH)
    print(f"ZeRO-3, {workers.WORLD} gloo ranks on CPU, bf16 engine, float32 EMA, {parameters / 1e6:.1f} M parameters")
    print("| | per-rank EMA memory | one EMA update |")
    print("|---|---|---|")
    for name in ("fastema", "diffusers"):
        memory = max(cost[name][0] for cost in costs) / 2**20
        seconds = max(cost[name][1] for cost in costs)
        print(f"| {name} | {memory:.1f} MiB | {seconds * 1e3:.2f} ms |")
    fastema, diffusers = (max(cost[name][0] for cost in costs) for name in ("fastema", "diffusers"))
    fast_time, slow_time = (max(cost[name][1] for cost in costs) for name in ("fastema", "diffusers"))
    print(f"diffusers / fastema: memory x{diffusers / fastema:.2f}, time x{slow_time / fast_time:.1f}")
    worst = max(p["max_in_ulps"] for p in precision)
    mean = max(p["mean_in_ulps"] for p in precision)
    print(f"EMA of the bf16 partitions vs float64 EMA of the fp32 masters: max {worst:.3f}, mean {mean:.3f} x 2^-7 |w|")


if __name__ == "__main__":
    main()
