"""compile=True (one TorchInductor function per group) against the eager step and the float64 reference.

Each inductor compile costs seconds on 2 cores, so these tests share a few small graphs: the compiled
functions are cached by the layouts of their inputs, and the tests below reuse one model's layouts.
"""

import warnings

import pytest
import torch

from fastema import ModelEMA
from fastema.core import compiled as _compiled
from fastema.core import steps as _steps
from helpers import MixedNet, ToyNet, all_tensors, assert_state_matches
from reference import ReferenceEMA, expected_tracked


def perturb(model, generator):
    """What training does to the model: new weights, and new BatchNorm statistics (a forward in train mode)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
        model.train()(torch.randn(2, 3, 5, 5, generator=generator))


def close(a, b):
    """Two EMA tensors computed by different kernels (inductor's loop and ATen's): within a few ulps."""
    if a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(a.dtype).eps, atol=1e-6)
    else:
        assert torch.equal(a, b)


def run(ema_dtype, n_steps=12, change=None):
    """MixedNet stepped with a compiled and an eager EMA and the float64 reference; `change(model)` half-way."""
    torch.manual_seed(0)
    model = MixedNet()
    compiled = ModelEMA(model, 0.9, ema_dtype=ema_dtype, compile=True)
    eager = ModelEMA(model, 0.9, ema_dtype=ema_dtype, compile=False)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    generator = torch.Generator().manual_seed(1)
    for step in range(n_steps):
        if change is not None and step == n_steps // 2:
            change(model)
            tracked = expected_tracked(model)
        perturb(model, generator)
        decay = 0.9 + 0.005 * step
        compiled.update(decay)
        eager.update(decay)
        reference.update(tracked, decay)
    for a, b in zip(compiled._tracker.binding.ema_tensors, eager._tracker.binding.ema_tensors):
        close(a, b)
    return model, compiled, reference


@pytest.mark.slow
@pytest.mark.parametrize("ema_dtype", [torch.float32, None])
def test_compiled_step_matches_eager_step_and_reference(ema_dtype):
    model, ema, reference = run(ema_dtype)
    compiled_steps = ema._tracker.plan.compiled
    # float32, bfloat16 and float16 pairs: a compiled function each (the count is copied eagerly).
    assert len(compiled_steps) == 3 and not any(step.failed for step in compiled_steps)
    assert all(step.compile_seconds is not None for step in compiled_steps)
    assert ema.module.conv.weight.stride() == model.conv.weight.stride()  # channels-last kept
    assert ema.module.gappy.stride() == (5, 1)  # a dense copy of the strided parameter
    if ema_dtype is None:  # a 16-bit EMA rounds each update; a float32 one keeps the float64 reference's values
        assert_state_matches(all_tensors(ema.module), reference.state, rtol=1e-2, atol=1e-2)
    else:
        assert_state_matches(all_tensors(ema.module), reference.state, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_follows_replaced_data_and_a_new_layout():
    torch.manual_seed(0)
    model = MixedNet()
    compiled = ModelEMA(model, 0.9, ema_dtype=torch.float32, compile=True)
    eager = ModelEMA(model, 0.9, ema_dtype=torch.float32, compile=False)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    generator = torch.Generator().manual_seed(1)

    def step():
        perturb(model, generator)
        compiled.update()
        eager.update()
        reference.update(tracked, 0.9)

    step()
    known = len(_compiled._compiled)
    with torch.no_grad():
        model.bf16.weight.data = model.bf16.weight.data.clone()  # new data, same layout: the next step reads it
    step()
    assert len(_compiled._compiled) == known  # re-planned; the function compiled for these layouts found again
    with torch.no_grad():  # a new layout, which no module method announces: the new data pointer is seen
        model.conv.weight.data = model.conv.weight.data.contiguous()
    step()
    assert len(_compiled._compiled) == known + 1
    assert compiled.module.conv.weight.is_contiguous()
    for a, b in zip(compiled._tracker.binding.ema_tensors, eager._tracker.binding.ema_tensors):
        close(a, b)
    assert_state_matches(all_tensors(compiled.module), reference.state, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_packed_and_compiled_bfloat16_model_with_float32_ema():
    torch.manual_seed(0)
    model = ToyNet().bfloat16()
    ema = ModelEMA(model, 0.95, ema_dtype=torch.float32, flatten_model=True, compile=True)
    (packed,) = ema._tracker.plan.packed
    assert isinstance(packed.inner[0], _compiled.CompiledStep)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).bfloat16())
        ema.update()
        reference.update(tracked, 0.95)
    assert_state_matches(all_tensors(ema.module), reference.state, rtol=1e-5, atol=1e-6)
    # Once compiled, a step allocates nothing and calls no ATen op: the work is inductor's loop.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        ema.update()
    assert sum(e.self_cpu_memory_usage for e in profiler.key_averages() if e.self_cpu_memory_usage > 0) == 0


def test_a_failed_compile_warns_once_and_steps_eagerly(monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_compiled, "compile_pairs", no_compiler)
    monkeypatch.setattr(_compiled, "_warned", [False])
    monkeypatch.setattr(_compiled, "_failed_devices", set())
    torch.manual_seed(0)
    model = ToyNet().bfloat16()
    ema = ModelEMA(model, 0.9, ema_dtype=torch.float32, compile=True)
    eager = ModelEMA(model, 0.9, ema_dtype=torch.float32, compile=False)
    with pytest.warns(UserWarning, match="compiling the EMA step failed.*no C.. compiler") as caught:
        ema.update()
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not once per step or per EMA
        ema.update()
        ModelEMA(model, 0.9, ema_dtype=torch.float32, compile=True).update()
    eager.update()
    eager.update()
    assert all(step.failed for step in ema._tracker.plan.compiled)
    for a, b in zip(ema._tracker.binding.ema_tensors, eager._tracker.binding.ema_tensors):
        assert torch.equal(a, b)


def test_by_default_cpu_groups_take_the_native_kernel_and_other_converting_groups_compile_quietly(monkeypatch):
    # float32 EMAs of float32 or bfloat16 tensors on the CPU: the native kernel (test_native.py), never inductor.
    for model, ema_dtype in [(ToyNet(), None), (ToyNet().bfloat16(), torch.float32)]:
        for flatten_model in (False, True):
            plan = ModelEMA(model, ema_dtype=ema_dtype, flatten_model=flatten_model)._tracker.plan
            assert plan.native and not plan.compiled
    assert not ModelEMA(ToyNet(), compile=False)._tracker.plan.native
    # A float16 model's float32 EMA converts on the way: compiled by default.
    (unpacked,) = ModelEMA(ToyNet().half(), ema_dtype=torch.float32)._tracker.plan.compiled
    assert isinstance(unpacked, _compiled.CompiledStep) and isinstance(unpacked.eager[0], _steps.StagedStep)
    model = ToyNet().half()
    eager = ModelEMA(model, 0.9, ema_dtype=torch.float32, flatten_model=True, compile=False)
    assert not eager._tracker.plan.compiled
    ema = ModelEMA(model, 0.9, ema_dtype=torch.float32, flatten_model=True)
    (step,) = ema._tracker.plan.compiled
    assert isinstance(step.eager[0], _steps.StagedStep)
    monkeypatch.setattr(_compiled, "_failed_devices", set())

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_compiled, "compile_pairs", no_compiler)
    monkeypatch.setattr(_compiled, "_warned", [False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nobody asked for compiling: falling back is no news
        ema.update()
    eager.update()
    assert step.failed
    for a, b in zip(ema._tracker.binding.ema_tensors, eager._tracker.binding.ema_tensors):
        assert torch.equal(a, b)
    # Compiling failed on CPU: the default stops trying there (each try would cost its time again).
    assert not ModelEMA(ToyNet().half(), ema_dtype=torch.float32)._tracker.plan.compiled
    assert ModelEMA(ToyNet().half(), ema_dtype=torch.float32, compile=True)._tracker.plan.compiled


def test_compile_option_is_checked_and_compile_true_plans_a_compiled_step_per_group():
    with pytest.raises(TypeError, match="compile"):
        ModelEMA(ToyNet(), compile="yes")
    plan = ModelEMA(ToyNet(), compile=True)._tracker.plan
    (step,) = plan.compiled  # the floats; BatchNorm's count is copied eagerly
    assert isinstance(step.eager[0], _steps.KernelStep) and step.eager[0].kernel is _steps.lerp_fused
    assert step.function is None  # nothing compiled before the first update
