"""ema_dtype: a float32 EMA of a bfloat16 model, against the float64 reference; a bfloat16 EMA stalls."""

import warnings

import pytest
import torch
from torch import nn

from fastema import ModelEMA
from fastema.core import steps as _steps
from helpers import ConvNet, ToyNet, all_tensors, assert_matches_reference, sgd_steps
from reference import ReferenceEMA, expected_tracked, snapshot


class WithStridedParameter(ToyNet):
    """ToyNet in bfloat16 plus a parameter whose memory has gaps (a strided view), which has no flat layout."""

    def __init__(self):
        super().__init__()
        self.bfloat16()
        self.gappy = nn.Parameter(torch.randn(4, 10, dtype=torch.bfloat16)[:, ::2])

    def forward(self, x):
        return super().forward(x) + 0.1 * self.gappy.mean()


def toy_input(generator):
    return torch.randn(16, 8, generator=generator).bfloat16()


def run_bf16(decay, n_steps=60, **ema_kwargs):
    torch.manual_seed(0)
    model = WithStridedParameter()
    assert model.gappy.stride() == (10, 2)
    ema = ModelEMA(model, decay, **ema_kwargs)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)  # float64 EMA of the bfloat16 weights
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sgd_steps(model, optimizer, ema, reference, tracked, n_steps, decay, toy_input)
    return model, ema, reference


def max_error(ema, reference):
    ema_tensors = all_tensors(ema.module)
    return max(
        (ema_tensors[name].double() - expected).abs().max().item()
        for name, expected in reference.state.items()
        if expected.is_floating_point()
    )


@pytest.mark.parametrize("flatten_model,foreach", [(False, None), (False, False), (True, None)])
@pytest.mark.parametrize("staging", [None, 7])  # 7 elements: every tensor split over several chunks and batches
def test_float32_ema_of_bfloat16_model_matches_reference(monkeypatch, flatten_model, foreach, staging):
    if staging:
        monkeypatch.setitem(_steps.STAGING_ELEMENTS, "cpu", staging)
    model, ema, reference = run_bf16(0.99, ema_dtype=torch.float32, flatten_model=flatten_model, foreach=foreach)
    assert all(t.dtype == torch.float32 for t in all_tensors(ema.module).values() if t.is_floating_point())
    assert all(t.dtype == torch.bfloat16 for t in all_tensors(model).values() if t.is_floating_point())
    assert ema.num_updates == reference.num_updates == 60
    assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-6)


def test_bfloat16_ema_stalls_and_warns_once_while_float32_tracks():
    with pytest.warns(UserWarning, match="ema_dtype=torch.float32") as caught:
        _, stalled, reference = run_bf16(0.999)
    assert len([w for w in caught if "round to nothing" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float32 EMA does not warn
        _, tracking, _ = run_bf16(0.999, ema_dtype=torch.float32)
    # The model moved (lr 0.5, 60 steps), so the float64 EMA moved; the bfloat16 one barely did.
    assert max_error(stalled, reference) > 100 * max_error(tracking, reference)


def test_warning_depends_on_the_decay_and_the_dtype():
    model = ToyNet().bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelEMA(model, 0.9).update()  # weight 0.1: well above bfloat16's resolution
        ModelEMA(model, 0.9998, ema_dtype=torch.float32).update()
        ModelEMA(ToyNet(), 0.9998).update()  # float32 model
    with pytest.warns(UserWarning, match="update_every=1"):
        ModelEMA(ToyNet().half(), 0.9998).update()


def test_decay_one_does_not_warn_and_does_not_silence_a_later_real_stall():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelEMA(ToyNet(), 0.9).update(decay=1.0)  # weight 0: nothing to round, nothing to say
    mixed = nn.ModuleDict(dict(wide=nn.Linear(2, 2), narrow=nn.Linear(2, 2).bfloat16()))
    ema = ModelEMA(mixed, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.update(decay=1.0)
    with pytest.warns(UserWarning, match=r"round to nothing in torch\.bfloat16:") as caught:
        ema.update(decay=0.999)  # stalls bfloat16, not float32: the warning names the one that stalls
    assert len(caught) == 1
    with pytest.warns(UserWarning, match=r"round to nothing in torch\.float32:"):
        ema.update(decay=1 - 1e-8)  # float32 stalls now too: its own warning, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.update(decay=1 - 1e-8)


def test_channels_last_conv_model_in_bfloat16_with_float32_ema(monkeypatch):
    monkeypatch.setitem(_steps.STAGING_ELEMENTS, "cpu", 50)
    torch.manual_seed(0)
    model = ConvNet().bfloat16().to(memory_format=torch.channels_last)
    ema = ModelEMA(model, 0.95, ema_dtype=torch.float32, compile=False)  # the native kernel: test_native.py
    assert ema.module.conv.weight.stride() == model.conv.weight.stride()
    staged = [step for step in ema._tracker.plan.steps if isinstance(step, _steps.StagedStep)]
    assert staged and all(not group.unstaged for group in staged)  # channels-last is dense: staged, not converted
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)

    def make_input(generator):
        return torch.randn(2, 3, 5, 5, generator=generator).bfloat16().to(memory_format=torch.channels_last)

    sgd_steps(model, optimizer, ema, reference, tracked, 30, 0.95, make_input)
    assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-6)


def test_mixed_step_allocates_nothing():
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512)).bfloat16()
    for flatten_model in (False, True):
        ema = ModelEMA(model, 0.9998, ema_dtype=torch.float32, flatten_model=flatten_model)
        ema.update()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            ema.update()
        allocated = sum(e.self_cpu_memory_usage for e in profiler.key_averages() if e.self_cpu_memory_usage > 0)
        assert allocated == 0, (flatten_model, allocated)


def test_validation_with_a_float32_ema_restores_the_bfloat16_model_exactly():
    model, ema, _ = run_bf16(0.9, n_steps=10, ema_dtype=torch.float32)
    before = {name: snapshot(t) for name, t in all_tensors(model).items()}
    with ema.use_ema_weights():
        for name, ema_tensor in zip(ema.tensor_names, ema._tracker.binding.ema_tensors):
            assert torch.equal(all_tensors(model)[name], ema_tensor.to(torch.bfloat16)), name
    for name, tensor in all_tensors(model).items():
        assert torch.equal(snapshot(tensor), before[name]), name


def test_state_dict_keeps_float32_and_rejects_another_dtype(tmp_path):
    model, ema, _ = run_bf16(0.9, n_steps=5, ema_dtype=torch.float32)
    ema.save(tmp_path / "ema.pth")
    twin = ModelEMA(model, 0.9, ema_dtype=torch.float32)
    twin.load(tmp_path / "ema.pth")
    for a, b in zip(twin._tracker.binding.ema_tensors, ema._tracker.binding.ema_tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)
    bf16 = ModelEMA(model, 0.9)
    with pytest.raises(ValueError, match=r"dtype torch\.float32 != torch\.bfloat16"):
        bf16.load(tmp_path / "ema.pth")


@pytest.mark.parametrize(
    "value,error", [(torch.int64, ValueError), ("float32", TypeError), (torch.complex64, ValueError)]
)
def test_bad_ema_dtype_raises_naming_it(value, error):
    with pytest.raises(error, match="ema_dtype"):
        ModelEMA(ToyNet(), ema_dtype=value)


class Bfloat16Net(nn.Module):
    """ToyNet in bfloat16 behind float32 inputs and outputs, as a fastai Learner feeds it."""

    def __init__(self):
        super().__init__()
        self.net = ToyNet().bfloat16()

    def forward(self, x):
        return self.net(x.bfloat16()).float()


def test_fastai_learner_with_a_bfloat16_model_and_float32_ema_matches_reference():
    from fastema import EMACallback
    from helpers import make_learner
    from test_callback import StepRecorder, assert_matches_reference

    recorder = StepRecorder(0, decay_of_step=lambda step: 0.95)
    callback = EMACallback(decay=0.95, ema_dtype=torch.float32)
    learn = make_learner(cbs=[recorder, callback])
    torch.manual_seed(0)
    learn.model = Bfloat16Net()
    learn.fit(2)
    assert callback.engine.num_updates == 16
    assert learn.model_ema.net.head.weight.dtype == torch.float32
    assert learn.model.net.head.weight.dtype == torch.bfloat16
    assert_matches_reference(learn.model_ema, recorder.reference)
