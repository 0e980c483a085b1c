"""The native CPU kernel (compile=None on CPU) against the float64 reference and the eager step.

The kernel is built once per machine (15-30 s, cached by torch.utils.cpp_extension); every test
here shares that build. Without a C++ compiler the kernel cannot exist and these tests skip.
"""

import logging
import os
import shutil
import time
import warnings

import pytest
import torch
from torch import nn

from fastema import ModelEMA
from fastema.core import native as _native
from fastema.core.native import NativeStep
from fastema.core.steps import KernelStep, copy_fused, lerp_fused
from helpers import all_tensors, assert_state_matches
from reference import ReferenceEMA, expected_tracked

pytestmark = pytest.mark.skipif(
    _native.build_flags() is None or shutil.which("c++") is None, reason="no native kernel on this platform"
)


@pytest.fixture(scope="module")
def kernel():
    module = _native.load()
    assert module is not None, "the native kernel failed to build (see the log)"
    return module


class ManyTensors(nn.Module):
    """Small and large tensors (the threads' split crosses tensors), a channels-last conv, a strided parameter."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.small = nn.ParameterList([nn.Parameter(torch.randn(size)) for size in (1, 7, 33, 250)])
        self.large = nn.ParameterList([nn.Parameter(torch.randn(size)) for size in (40001, 3, 70003)])
        self.conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.norm = nn.BatchNorm2d(8)  # running stats, and a count the kernel never takes
        self.to(dtype)
        self.gappy = nn.Parameter(torch.randn(6, 10, dtype=dtype)[:, ::2])  # not dense: the eager step's

    def forward(self, x):
        return self.norm(self.conv(x)).mean()


def train(model, emas, reference, tracked, decays, seed=1, input_shape=(2, 3, 6, 6)):
    """Perturb the model as training does, then update every EMA and the reference with the same decay."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for decay in decays:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
            model.train()(torch.randn(input_shape, generator=generator).to(dtype))
        for ema in emas:
            ema.update(decay)
        reference.update(tracked, decay)


# Decays above and below 0.5: the kernel, as ATen's lerp_, computes a weight over 0.5 from the other end.
DECAYS = [0.9, 0.0, 0.3, 0.99, 0.45, 0.6, 0.97]  # 0.0 resets the EMA to the model: not last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_matches_the_eager_step_and_the_float64_reference(kernel, dtype):
    torch.manual_seed(0)
    model = ManyTensors(dtype)
    native = ModelEMA(model, ema_dtype=torch.float32)
    eager = ModelEMA(model, ema_dtype=torch.float32, compile=False)
    step, count = native._tracker.plan.native
    assert not step.copy and len(step.ema_tensors) == 13  # all but the strided one and the count
    assert count.copy and count.ema_tensors == [native.module.norm.num_batches_tracked]
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    train(model, [native, eager], reference, tracked, DECAYS)
    assert not step.failed and step.compile_seconds is not None
    for name, tensor in all_tensors(native.module).items():
        # ATen's lerp_ arithmetic: the same float32 values as the eager step.
        torch.testing.assert_close(tensor, all_tensors(eager.module)[name], rtol=0, atol=0, msg=name)
    assert_state_matches(all_tensors(native.module), reference.state, rtol=1e-5, atol=1e-6)
    assert native.module.conv.weight.stride() == model.conv.weight.stride()  # channels-last kept
    # The native step allocates nothing and runs no ATen op of its own (the strided pair's and the count's are eager).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step.step(0.1)
    assert sum(e.self_cpu_memory_usage for e in profiler.key_averages() if e.self_cpu_memory_usage > 0) == 0
    assert not [e.key for e in profiler.key_averages() if e.key.startswith("aten::")]


def test_native_step_follows_new_data_and_falls_back_for_a_new_layout(kernel):
    torch.manual_seed(0)
    model = ManyTensors()
    ema = ModelEMA(model, 0.9)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    train(model, [ema], reference, tracked, [0.9, 0.8])
    with torch.no_grad():
        model.large[0].data = torch.randn(40001)  # new data, same layout: the kernel reads it
        model.conv.weight.data = model.conv.weight.contiguous()  # another layout than the EMA's
    train(model, [ema], reference, tracked, [0.9, 0.3, 0.95], seed=2)
    assert_state_matches(all_tensors(ema.module), reference.state, rtol=1e-5, atol=1e-6)


class FloatsOnly:
    """The kernel, refusing a tensor weight: reading one would be a `.item()` (a host sync where it lives on a GPU)."""

    def __init__(self, module):
        self.module = module

    def lerp_many(self, ema_tensors, model_tensors, weight):
        assert type(weight) is float, type(weight)
        return self.module.lerp_many(ema_tensors, model_tensors, weight)

    def copy_many(self, ema_tensors, model_tensors):
        return self.module.copy_many(ema_tensors, model_tensors)


def test_a_tensor_decay_takes_the_eager_step(kernel):
    torch.manual_seed(0)
    model = ManyTensors()
    ema = ModelEMA(model)
    for step in ema._tracker.plan.native:
        step.module = FloatsOnly(kernel)
    ema.update(0.5)  # floats: the kernel
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    generator = torch.Generator().manual_seed(1)
    for decay in (0.9, 0.7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        ema.update(decay=torch.tensor(decay, dtype=torch.float64))
        reference.update(tracked, decay)
    assert_state_matches(all_tensors(ema.module), reference.state, rtol=1e-5, atol=1e-6)


def test_the_kernel_writes_nothing_for_pairs_it_does_not_take(kernel):
    ema = torch.zeros(4, 3)
    refused = [
        torch.ones(4, 3, dtype=torch.float16),  # a model dtype it has no loop for
        torch.ones(12),  # another size
        torch.ones(3, 4).t(),  # another layout
        torch.ones(4, 6)[:, ::2],  # gaps
    ]
    first = torch.zeros(5)  # a pair it takes, before the one it refuses: nothing is written to either
    for model in refused:
        assert kernel.lerp_many([first, ema], [torch.ones(5), model], 0.5) is False
        assert not ema.any() and not first.any()
    assert kernel.lerp_many([ema], [torch.ones(4, 3, device="meta")], 0.5) is False
    assert kernel.lerp_many([ema], [torch.ones(4, 3)._neg_view()], 0.5) is False
    assert _native.native_kind(ema, torch.ones(4, 3)._neg_view()) is None
    assert kernel.lerp_many([ema.double()], [torch.ones(4, 3, dtype=torch.float64)], 0.5) is False
    assert (
        kernel.lerp_many([ema, torch.zeros(2)], [torch.ones(4, 3), torch.ones(2, dtype=torch.bfloat16)], 0.5) is False
    )
    assert kernel.lerp_many([], [], 0.5) is False
    with torch._subclasses.fake_tensor.FakeTensorMode():  # a subclass: its "memory" is not there to write
        fake_ema, fake_model = torch.zeros(4, 3), torch.ones(4, 3)
    assert kernel.lerp_many([fake_ema], [fake_model], 0.5) is False
    assert _native.native_kind(fake_ema, fake_model) is None and _native.native_kind(ema, torch.ones(4, 3)) == "lerp"
    assert not ema.any()
    assert kernel.lerp_many([ema], [torch.ones(4, 3)], 0.25) is True
    assert torch.equal(ema, torch.full((4, 3), 0.25))
    # Views that start inside their storage: the kernel reads and writes from their offsets.
    storage_ema, storage_model = torch.zeros(10), torch.arange(10.0)
    assert kernel.lerp_many([storage_ema[3:7]], [storage_model[2:6]], 0.5) is True
    assert torch.equal(storage_ema, torch.tensor([0, 0, 0, 1, 1.5, 2, 2.5, 0, 0, 0]))


def test_the_kernel_bumps_the_versions_autograd_checks(kernel):
    weight = torch.zeros(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    out = (x @ weight).sum()  # saves `weight` for the backward pass
    before = weight._version
    assert kernel.lerp_many([weight], [torch.ones(3, 3)], 0.5)
    assert weight._version == before + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_a_failed_build_logs_once_and_steps_eagerly(monkeypatch, caplog):
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "build_flags", lambda: ["-fno-such-flag-for-fastema"])
    torch.manual_seed(0)
    model = ManyTensors()
    ema = ModelEMA(model, 0.9)
    step, _ = ema._tracker.plan.native
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    with caplog.at_level(logging.WARNING, logger="fastema.core.native"):
        train(model, [ema], reference, tracked, [0.9, 0.5])
    assert step.failed
    assert [record.getMessage() for record in caplog.records if "native CPU kernel failed" in record.getMessage()]
    assert_state_matches(all_tensors(ema.module), reference.state, rtol=1e-5, atol=1e-6)
    # A failed build is not retried in this process: later EMAs plan the eager steps.
    assert not ModelEMA(model)._tracker.plan.native


def test_a_native_step_steps_eagerly_when_the_kernel_refuses_a_pair(kernel):
    ema, model = torch.zeros(4, 3), torch.ones(4, 3)
    step = NativeStep([ema], [model], [KernelStep(lerp_fused, [ema], [model])])
    step.step(0.25)
    assert torch.equal(ema, torch.full((4, 3), 0.25))
    model.data = torch.full((3, 4), 2.0).t()  # same shape, another layout: the kernel refuses it
    step.step(0.5)
    assert torch.equal(ema, torch.full((4, 3), 1.125))
    counts, source = torch.zeros(3, dtype=torch.long), torch.arange(3)
    copy = NativeStep([counts], [source], [KernelStep(copy_fused, [counts], [source])], copy=True)
    copy.step(0.25)
    assert torch.equal(counts, torch.arange(3))
    source.data = torch.arange(10, 16)[::2]  # gaps: refused, copied eagerly
    copy.step(0.25)
    assert torch.equal(counts, torch.tensor([10, 12, 14]))


def test_the_copy_kernel_copies_one_dtype_and_refuses_the_rest(kernel):
    counts = torch.zeros(2, 3, dtype=torch.long)
    assert kernel.copy_many([counts], [torch.ones(2, 3, dtype=torch.int32)]) is False  # a conversion: copy_'s
    assert kernel.copy_many([counts], [torch.ones(3, 2, dtype=torch.long).t()]) is False
    assert not counts.any()
    flags, source_flags = torch.zeros(5, dtype=torch.bool), torch.tensor([True, False, True, True, False])
    assert kernel.copy_many([counts, flags], [torch.arange(6).view(2, 3), source_flags]) is False  # two dtypes
    assert kernel.copy_many([flags], [source_flags]) is True and torch.equal(flags, source_flags)
    before = counts._version
    assert kernel.copy_many([counts], [torch.arange(6).view(2, 3)]) is True
    assert torch.equal(counts, torch.arange(6).view(2, 3)) and counts._version == before + 1


def test_after_a_pair_changes_layout_the_kernel_takes_the_group_again(kernel):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(4, 4, 3) for _ in range(3)]).to(memory_format=torch.channels_last)
    ema = ModelEMA(model, 0.9)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    train(model, [ema], reference, tracked, [0.9], input_shape=(2, 4, 8, 8))
    with torch.no_grad():
        model[0].weight.data = model[0].weight.contiguous()  # another layout than the EMA's: the kernel refuses it
    train(model, [ema], reference, tracked, [0.8, 0.3, 0.7], seed=2, input_shape=(2, 4, 8, 8))
    (step,) = ema._tracker.plan.native
    assert len(step.ema_tensors) == 6 and not step.refused  # planned again: the last updates were the kernel's
    assert_state_matches(all_tensors(ema.module), reference.state, rtol=1e-5, atol=1e-6)


def test_quantized_and_inference_tensors_keep_pytorch_semantics(kernel):
    class Quantized(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("scale", torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.qint8))

    results = []
    for options in (dict(compile=False), dict()):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)  # deprecated, still used
            model = Quantized()
            ema = ModelEMA(model, 0.9, **options)
            model.scale.data = torch.quantize_per_tensor(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, 1, torch.qint8)
        ema.update()
        results.append((ema.module.scale.dequantize(), ema.module.scale.q_scale()))
        # Planned for copy_, never for the kernel (which refuses it: it would copy the integers alone).
        assert not any(tensor is ema.module.scale for step in ema._tracker.plan.native for tensor in step.ema_tensors)
        assert kernel.copy_many([ema.module.scale], [model.scale]) is False
    assert torch.equal(results[0][0], torch.tensor([1.0, 2.0, 3.0, 4.0])) and results[0][1] == 0.5
    assert torch.equal(results[1][0], results[0][0]) and results[1][1] == results[0][1]
    # An EMA made in inference mode: its tensors cannot be written outside it, whichever step runs.
    for options in (dict(compile=False), dict()):
        with torch.inference_mode():
            ema = ModelEMA(nn.Linear(3, 3), 0.9, **options)
            ema.update()  # inside inference mode: allowed
        with pytest.raises(RuntimeError, match="inference tensor"):
            ema.update()


def test_only_the_defaults_plan_the_native_kernel(kernel):
    assert ModelEMA(ManyTensors())._tracker.plan.native
    for options in (dict(compile=False), dict(compile=True), dict(foreach=False), dict(foreach=True)):
        assert not ModelEMA(ManyTensors(), **options)._tracker.plan.native, options


def test_a_failed_build_names_its_cause():
    error = RuntimeError("Error building extension 'x': [1/2] c++ -MMD -O3 -c native.cpp\n/bin/sh: 1: c++: not found")
    assert _native.failure_cause(error) == "/bin/sh: 1: c++: not found"


def test_a_stale_lock_is_removed_and_a_first_build_is_announced(monkeypatch, tmp_path, caplog):
    class Extensions:  # torch.utils.cpp_extension's build folder, here
        @staticmethod
        def _get_build_directory(name, verbose):
            return str(tmp_path)

    lock = tmp_path / "lock"
    lock.touch()
    with caplog.at_level(logging.WARNING, logger="fastema.core.native"):
        _native._prepare(Extensions, "fastema_native_x")  # a fresh lock: a build is running, it stays
        assert lock.exists()
        old = time.time() - _native.STALE_LOCK_SECONDS - 60
        os.utime(lock, (old, old))
        _native._prepare(Extensions, "fastema_native_x")
    assert not lock.exists()
    assert len([r for r in caplog.records if "building the native CPU kernel once" in r.getMessage()]) == 2
    (tmp_path / "fastema_native_x.so").touch()  # built: nothing to announce
    caplog.clear()
    _native._prepare(Extensions, "fastema_native_x")
    assert not caplog.records
