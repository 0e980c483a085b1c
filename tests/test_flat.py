"""flatten_model=True: the packed layout against the float64 reference, and the model still a normal model."""

import copy
import io
import itertools

import pytest
import torch
from torch import nn

from fastema import ModelEMA
from fastema.core import steps as _steps
from fastema.core.native import native_available
from helpers import (
    ConvNet,
    ToyNet,
    all_tensors,
    assert_matches_reference,
    assert_update_runs_only_ema_kernels,
    sgd_steps,
    update_forbidding_cuda_sync,
)
from reference import ReferenceEMA, expected_tracked, snapshot


def storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors if t.is_floating_point()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_step_matches_reference_with_an_optimizer_built_before_packing(channels_last):
    torch.manual_seed(0)
    model = ConvNet().double()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def make_input(generator):
        return torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)

    model(make_input(torch.Generator())).sum().backward()
    optimizer.step()  # optimizer state exists before the parameters are packed

    parameters_before = list(model.parameters())
    values_before = {name: t.clone() for name, t in model.state_dict().items()}
    strides_before = {name: t.stride() for name, t in model.state_dict().items()}
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    ema = ModelEMA(model, 0.9, flatten_model=True)

    # Same objects, values and strides; every floating tensor now lives in one buffer (and the EMA in another).
    assert all(p is q for p, q in zip(model.parameters(), parameters_before))
    for name, value in model.state_dict().items():
        assert torch.equal(value, values_before[name]) and value.stride() == strides_before[name], name
    assert len(storages(tracked.values())) == 1
    assert len(storages(all_tensors(ema.module).values())) == 1
    # One packed step for the eight floating tensors (one lerp_), and BatchNorm's count copied on its own.
    packed, count = ema._tracker.plan.steps
    assert isinstance(packed, _steps.PackedStep) and packed.model_flat.numel() == sum(
        t.numel() for t in tracked.values() if t.is_floating_point()
    )
    assert count.model_tensors == [model.norm.num_batches_tracked]
    assert count.copy if native_available() else count.kernel is _steps.copy_fused  # the native kernel's, on CPU

    sgd_steps(model, optimizer, ema, reference, tracked, 100, 0.9, make_input)
    assert ema.num_updates == reference.num_updates == 100
    assert_matches_reference(ema, reference)
    assert not torch.allclose(ema.module.conv.weight, model.conv.weight)  # the EMA lags the model
    assert ema.module.norm.num_batches_tracked.item() == model.norm.num_batches_tracked.item() == 101


@pytest.mark.parametrize("all_parameters,all_buffers", list(itertools.product([False, True], [False, True])))
def test_packed_toynet_matches_reference_with_untracked_tensors_left_alone(all_parameters, all_buffers):
    torch.manual_seed(0)
    model = ToyNet().double()
    frozen_before = model.frozen.weight.data_ptr()
    tracked = expected_tracked(model, all_parameters, all_buffers)
    reference = ReferenceEMA(tracked)
    ema = ModelEMA(model, 0.95, all_parameters=all_parameters, all_buffers=all_buffers, flatten_model=True)
    assert (model.frozen.weight.data_ptr() != frozen_before) == all_parameters  # only tracked tensors move
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sgd_steps(model, optimizer, ema, reference, tracked, 60, 0.95, lambda g: torch.randn(8, 8, generator=g).double())
    assert_matches_reference(ema, reference)


def test_model_output_is_unchanged_by_packing():
    torch.manual_seed(0)
    model = ConvNet().to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 5, 5)
    before = model(x)
    ModelEMA(model, flatten_model=True)
    assert torch.equal(model(x), before)


def test_views_survive_load_state_dict_on_the_ema_and_on_its_module():
    torch.manual_seed(0)
    model = ConvNet().double()
    ema = ModelEMA(model, 0.5, flatten_model=True)
    saved = copy.deepcopy(ema.state_dict())
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ema.update()
    ema.load_state_dict(saved)
    ema.module.load_state_dict(ema.module.state_dict())
    assert len(storages(all_tensors(ema.module).values())) == 1  # still packed

    tracked = expected_tracked(model)
    reference = ReferenceEMA({name: saved["tensors"][name] for name in tracked})
    ema.update()
    reference.update(tracked, 0.5)
    assert_matches_reference(ema, reference)


@pytest.mark.parametrize("conversion", ["double", "channels_last"])
def test_model_to_after_construction_is_followed_and_repacked(conversion):
    torch.manual_seed(0)
    model = ConvNet()
    ema = ModelEMA(model, 0.5, flatten_model=True)
    if conversion == "double":
        model.double()
    else:
        model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(dict(ema.state_dict()["tensors"]))
    ema.update()
    reference.update(tracked, 0.5)
    assert_matches_reference(ema, reference, rtol=1e-6, atol=1e-6)
    if conversion == "channels_last":  # repacked where the model now lives
        assert len(storages(tracked.values())) == 1
        assert ema.module.conv.weight.stride() == model.conv.weight.stride()


def test_refresh_after_replacing_a_parameter_by_hand():
    model = ConvNet()
    ema = ModelEMA(model, 0.5, flatten_model=True)
    start = snapshot(ema.module.head.bias)
    model.head.bias = nn.Parameter(torch.full((4,), 2.0))  # a new object the EMA cannot know about
    ema.refresh()
    ema.update()
    torch.testing.assert_close(snapshot(ema.module.head.bias), 0.5 * start + 1.0)


def test_overlapping_tensors_are_not_packed_and_keep_their_aliasing():
    model = nn.Module()
    base = torch.randn(10)
    model.first = nn.Parameter(base[:6])
    model.second = nn.Parameter(base[4:])  # shares two elements with `first`
    model.separate = nn.Parameter(torch.randn(3))
    ema = ModelEMA(model, 0.5, flatten_model=True)
    assert model.first.data_ptr() == base.data_ptr() and model.second.data_ptr() == base[4:].data_ptr()
    with torch.no_grad():
        model.first.add_(1.0)  # also moves the shared elements of `second`
    tracked = expected_tracked(model)
    reference = ReferenceEMA(dict(ema.state_dict()["tensors"]))
    ema.update()
    reference.update(tracked, 0.5)
    assert_matches_reference(ema, reference)


def test_packed_ema_module_is_a_normal_module():
    torch.manual_seed(0)
    model = ConvNet()
    ema = ModelEMA(model, 0.5, flatten_model=True)
    with torch.no_grad():
        model.conv.weight.add_(1.0)
    ema.update()
    buffer = io.BytesIO()
    torch.save(ema.module.state_dict(), buffer)
    buffer.seek(0)
    plain = ConvNet().eval()
    plain.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(plain(x), ema.module(x))
    assert torch.equal(copy.deepcopy(ema.module)(x), ema.module(x))


def test_packed_update_never_synchronises_with_the_host_nor_allocates():
    ema = ModelEMA(ConvNet(), 0.9, flatten_model=True)
    assert_update_runs_only_ema_kernels(ema)
    assert ema.num_updates == 1


def test_flatten_model_arguments():
    with pytest.raises(ValueError, match="flatten_model"):
        ModelEMA(ConvNet(), flatten_model=True, foreach=False)
    with pytest.raises(TypeError, match="flatten_model"):
        ModelEMA(ConvNet(), flatten_model="yes")


@pytest.mark.cuda
def test_cuda_packed_update_matches_reference_without_sync():
    torch.manual_seed(0)
    model = ConvNet().cuda()
    ema = ModelEMA(model, 0.9, flatten_model=True)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(10):
        model(torch.randn(4, 3, 5, 5, device="cuda")).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        update_forbidding_cuda_sync(ema)
        reference.update(tracked, 0.9)
    assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-6)
