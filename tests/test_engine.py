"""ModelEMA against the float64 reference, and its swap/copy/state operations."""

import itertools

import pytest
import torch
from torch import nn

from fastema import ModelEMA
from fastema.core import plan as _plan
from fastema.core import steps as _steps
from fastema.core.native import native_available
from helpers import ToyNet, assert_update_runs_only_ema_kernels, update_forbidding_cuda_sync
from reference import ReferenceEMA, expected_tracked, snapshot

FLAG_COMBINATIONS = list(itertools.product([False, True], [False, True]))


def train_steps(model, ema, reference, n_steps, decay, dtype, tracked, seed=0):
    """Run real SGD steps; after each one update both the EMA and the reference."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(n_steps):
        x = torch.randn(16, 8, generator=generator, dtype=dtype)
        y = torch.randint(0, 3, (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = {name: snapshot(t) for name, t in model.state_dict(keep_vars=True).items()}
        ema.update()
        reference.update(tracked, decay)
        after = {name: snapshot(t) for name, t in model.state_dict(keep_vars=True).items()}
        for name in before:  # update() only reads the model
            assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("all_parameters,all_buffers", FLAG_COMBINATIONS)
def test_matches_float64_reference_over_200_updates(foreach, all_parameters, all_buffers):
    torch.manual_seed(0)
    model = ToyNet().double()
    untracked_at_start = {
        name: snapshot(t) for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    decay = 0.97
    ema = ModelEMA(model, decay, all_parameters=all_parameters, all_buffers=all_buffers, foreach=foreach)
    tracked = expected_tracked(model, all_parameters, all_buffers)
    assert set(ema.tensor_names) == set(tracked)
    reference = ReferenceEMA(tracked)
    train_steps(model, ema, reference, 200, decay, torch.float64, tracked)

    assert ema.num_updates == reference.num_updates == 200
    ema_tensors = dict(itertools.chain(ema.module.named_parameters(), ema.module.named_buffers()))
    for name, expected in reference.state.items():
        actual = ema_tensors[name]
        if expected.is_floating_point():
            torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=1e-12, msg=name)
            # The EMA lags the model: it must not simply equal it.
            if name.endswith("weight") and tracked[name].requires_grad:
                assert not torch.allclose(actual, tracked[name].detach()), name
        else:
            assert torch.equal(actual, expected), name  # num_batches_tracked: copied, never averaged
    assert ema_tensors["body.1.num_batches_tracked"].item() == model.body[1].num_batches_tracked.item() == 400
    model_tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    for name in untracked_at_start:
        if name not in tracked:  # untracked tensors are the model's own: its current values, no copy
            assert ema_tensors[name].data_ptr() == model_tensors[name].data_ptr(), name
    assert ("calls" in tracked) or ema_tensors["calls"].item() == 200  # the model's running count, not a snapshot
    assert ("calls" in tracked) == all_buffers
    assert ("frozen.weight" in tracked) == all_parameters


def test_float32_model_tracks_reference_within_float32_rounding():
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.97)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    train_steps(model, ema, reference, 200, 0.97, torch.float32, tracked)
    ema_tensors = dict(itertools.chain(ema.module.named_parameters(), ema.module.named_buffers()))
    for name, expected in reference.state.items():
        if expected.is_floating_point():
            # Each float32 update rounds once (~6e-8); 200 of them stay well inside 2e-5.
            torch.testing.assert_close(ema_tensors[name].double(), expected, rtol=2e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_and_loop_paths_agree(dtype):
    torch.manual_seed(0)
    model = ToyNet().to(dtype)
    fused = ModelEMA(model, 0.9, foreach=True)
    loop = ModelEMA(model, 0.9, foreach=False)
    assert {g.kernel for g in fused._tracker.plan.steps} == {_steps.lerp_fused, _steps.copy_fused}
    assert {g.kernel for g in loop._tracker.plan.steps} == {_steps.lerp_loop, _steps.copy_loop}
    generator = torch.Generator().manual_seed(1)
    for step in range(50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(dtype))
        model(torch.randn(4, 8, generator=generator).to(dtype))
        decay = 0.9 + 0.001 * step
        fused.update(decay)
        loop.update(decay)
    for a, b in zip(fused.state_dict()["tensors"].values(), loop.state_dict()["tensors"].values()):
        torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps if a.is_floating_point() else 0, atol=0)


def kernels(ema):
    """The PyTorch kernels of an EMA's plan, also those a native step falls back to."""
    return {step.kernel for step in ema._tracker.plan.all_steps() if isinstance(step, _steps.KernelStep)}


def test_default_picks_the_native_step_on_cpu_with_the_fused_step_behind_it():
    ema = ModelEMA(ToyNet())
    assert ema._tracker.plan.native if native_available() else ema._tracker.plan.steps
    assert _steps.lerp_fused in kernels(ema)  # what runs where the kernel is missing or refuses a pair
    assert _steps.lerp_fused in kernels(ModelEMA(ToyNet(), compile=False))


def test_foreach_true_where_fused_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(_plan, "fused_step_supported", lambda device, dtype: False)
    with pytest.raises(ValueError, match="foreach"):
        ModelEMA(ToyNet(), foreach=True)
    ema = ModelEMA(ToyNet(), foreach=None)  # automatic choice falls back to the loop
    assert _steps.lerp_loop in kernels(ema)


def test_dtype_that_cannot_be_averaged_raises():
    model = nn.Linear(2, 2)
    model.register_buffer("scale", torch.zeros(2, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="float8"):
        ModelEMA(model)


def test_ema_module_is_an_eval_copy_without_grad():
    model = ToyNet()
    model(torch.randn(4, 8)).sum().backward()
    ema = ModelEMA(model)
    assert ema.module is not model and not ema.module.training
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    for (name, p), q in zip(ema.module.named_parameters(), model.parameters()):
        # Averaged tensors have their own storage; the frozen layer's are the model's (they never change).
        assert (p.data_ptr() == q.data_ptr()) == name.startswith("frozen."), name


def test_use_ema_weights_swaps_in_place_and_restores_bit_identical():
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(4, 8))
    ema.update()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    parameter_objects = list(model.parameters())
    ema_before = {name: t.clone() for name, t in ema.state_dict()["tensors"].items()}
    with ema.use_ema_weights() as swapped:
        assert swapped is model
        assert all(p is q for p, q in zip(model.parameters(), parameter_objects))
        for name, value in ema_before.items():
            assert torch.equal(model.state_dict()[name], value), name
        with pytest.raises(RuntimeError, match="use_ema_weights"):
            ema.update()
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, value in ema_before.items():
        assert torch.equal(ema.state_dict()["tensors"][name], value), name


def test_use_ema_weights_restores_after_an_exception():
    model = ToyNet()
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        model.head.weight.add_(3.0)
    before = model.head.weight.clone()
    with pytest.raises(KeyError), ema.use_ema_weights():
        raise KeyError("interrupted validation")
    assert torch.equal(model.head.weight, before)
    assert not ema.ema_weights_in_use


def test_copy_to_reset_and_copy_from():
    model = ToyNet()
    ema = ModelEMA(model, 0.0)  # decay 0: the EMA equals the model after an update
    with torch.no_grad():
        model.head.weight.fill_(2.0)
    ema.update()
    other = ToyNet()
    ema.copy_to(other)
    assert torch.equal(other.head.weight, model.head.weight)
    with torch.no_grad():
        model.head.weight.fill_(5.0)
    ema.reset()
    assert ema.num_updates == 0 and torch.equal(ema.module.head.weight, model.head.weight)
    ema.copy_from(other)
    assert torch.equal(ema.module.head.weight, other.head.weight)
    with pytest.raises(ValueError, match="shape mismatches"):
        ema.copy_from(ToyNet(n_hidden=4))


def test_state_dict_round_trip_and_validation():
    model = ToyNet()
    ema = ModelEMA(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            model.head.weight.add_(1.0)
        ema.update(0.8)
    state = ema.state_dict()
    assert set(state["tensors"]) == set(model.state_dict()) - {"frozen.weight", "frozen.bias"}
    restored = ModelEMA(ToyNet(), 0.9)
    restored.load_state_dict(state)
    assert restored.num_updates == 3 and restored.last_decay == 0.8
    for name, value in state["tensors"].items():
        assert torch.equal(restored.state_dict()["tensors"][name], value)

    untouched = {name: t.clone() for name, t in restored.state_dict()["tensors"].items()}
    bad = dict(state, tensors=dict(state["tensors"]))
    bad["tensors"]["head.weight"] = torch.zeros(7, 7)
    del bad["tensors"]["head.bias"]
    bad["tensors"]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        restored.load_state_dict(bad)
    message = str(info.value)
    assert "head.bias" in message and "extra" in message and "head.weight" in message
    for name, value in untouched.items():  # nothing was written
        assert torch.equal(restored.state_dict()["tensors"][name], value)
    with pytest.raises(ValueError, match="format"):
        restored.load_state_dict({"tensors": {}})


def test_follows_model_moved_after_construction():
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.5)
    initial_weight = ema.module.head.weight.clone()
    initial_mean = ema.module.body[1].running_mean.clone()
    model.double()  # parameters get new storage and buffers become new tensor objects
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    model(torch.randn(4, 8, dtype=torch.float64))
    ema.update()
    # The EMA keeps its float32 dtype and averages the model's *new* tensors.
    assert ema.module.head.weight.dtype == torch.float32
    torch.testing.assert_close(ema.module.head.weight, 0.5 * initial_weight + 0.5)
    torch.testing.assert_close(
        ema.module.body[1].running_mean, 0.5 * initial_mean + 0.5 * model.body[1].running_mean.float()
    )
    assert torch.equal(ema.module.body[1].num_batches_tracked, model.body[1].num_batches_tracked)


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(ToyNet(), 1.5)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(ToyNet(), float("nan"))
    with pytest.raises(TypeError, match="decay"):
        ModelEMA(ToyNet(), "0.9")
    with pytest.raises(TypeError, match="foreach"):
        ModelEMA(ToyNet(), foreach="yes")
    with pytest.raises(ValueError, match="device"):
        ModelEMA(ToyNet(), device="gpu7")
    with pytest.raises(TypeError, match="model"):
        ModelEMA(object())
    with pytest.raises(TypeError, match="all_buffers"):
        ModelEMA(ToyNet(), all_buffers=1)
    ema = ModelEMA(ToyNet())
    with pytest.raises(ValueError, match="decay"):
        ema.update(decay=-0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device_raises():
    with pytest.raises(ValueError, match="device"):
        ModelEMA(ToyNet(), device="cuda")


@pytest.mark.parametrize("options", [dict(), dict(compile=False), dict(foreach=False), dict(ema_dtype=torch.float64)])
def test_update_never_synchronises_with_the_host_nor_allocates(options):
    ema = ModelEMA(ToyNet(), 0.9, **options)
    assert_update_runs_only_ema_kernels(ema)
    assert_update_runs_only_ema_kernels(ema, 0.5)
    assert ema.num_updates == 2


@pytest.mark.cuda
def test_cuda_fused_update_matches_reference_without_sync():
    torch.manual_seed(0)
    model = ToyNet().cuda()
    ema = ModelEMA(model, 0.9)
    assert {g.kernel for g in ema._tracker.plan.steps} == {_steps.lerp_fused, _steps.copy_fused}
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).cuda())
        model(torch.randn(4, 8, generator=generator).cuda())
        update_forbidding_cuda_sync(ema)
        reference.update(tracked, 0.9)
    for name, value in ema.state_dict()["tensors"].items():
        expected = reference.state[name]
        if expected.is_floating_point():
            torch.testing.assert_close(value.double().cpu(), expected, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(value.cpu(), expected), name


@pytest.mark.parametrize("flatten_model", [False, True])
def test_follows_ema_module_converted_by_the_user(flatten_model):
    torch.manual_seed(0)
    model = ToyNet()
    model(torch.randn(4, 8))
    ema = ModelEMA(model, 0.5, flatten_model=flatten_model)
    start = {name: snapshot(t) for name, t in ema.state_dict()["tensors"].items()}
    ema.module.double()  # new storage for every floating tensor, new objects for the buffers
    model(torch.randn(4, 8))
    ema.update()
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    reference.state = start
    reference.update(tracked, 0.5)
    module_tensors = dict(itertools.chain(ema.module.named_parameters(), ema.module.named_buffers()))
    for name, expected in reference.state.items():
        torch.testing.assert_close(snapshot(module_tensors[name]), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_buffers_changed_during_use_ema_weights_do_not_leak_into_the_ema():
    """BatchNorm in train mode (or DDP's buffer broadcast) writes buffers while the EMA is in the model."""
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.9)
    model(torch.randn(16, 8))
    ema.update()
    ema_before = [snapshot(t) for t in ema._tracker.binding.ema_tensors]
    model_before = {name: snapshot(t) for name, t in model.state_dict().items()}
    with ema.use_ema_weights():
        model.train()(torch.randn(16, 8))  # updates running_mean/var and num_batches_tracked in the model
    for name, tensor in model.state_dict().items():
        assert torch.equal(snapshot(tensor), model_before[name]), name
    for name, before, after in zip(ema.tensor_names, ema_before, ema._tracker.binding.ema_tensors):
        assert torch.equal(snapshot(after), before), name


@pytest.mark.parametrize(
    "saved_with, loaded_with, option",
    [
        (dict(update_every=4), dict(), "update_every"),
        (dict(), dict(update_every=2), "update_every"),
        (dict(all_buffers=True), dict(), "all_buffers"),
        (dict(), dict(all_parameters=True), "all_parameters"),
    ],
)
def test_a_state_saved_with_other_counting_or_tracking_options_is_refused(tmp_path, saved_with, loaded_with, option):
    names = ModelEMA(ToyNet()).tensor_names  # the same tensors either way: only the options tell the states apart
    saved = ModelEMA(ToyNet(), 0.9, tensor_names=names, **saved_with)
    for _ in range(4):
        saved.update()
    path = saved.save(tmp_path / "ema.pt")
    loading = ModelEMA(ToyNet(), 0.9, tensor_names=names, **loaded_with)
    before = {name: tensor.clone() for name, tensor in loading.state_dict()["tensors"].items()}
    for load in (lambda: loading.load_state_dict(saved.state_dict()), lambda: loading.load(path)):
        with pytest.raises(ValueError, match=f"nothing was loaded.*{option} "):
            load()
        assert loading.num_updates == 0
        assert all(torch.equal(loading.state_dict()["tensors"][n], t) for n, t in before.items())
