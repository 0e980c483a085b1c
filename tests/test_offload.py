"""An EMA on another device than the model: the background pipeline (on CPU) and the CUDA offload (marked)."""

import threading

import pytest
import torch

from fastema import ModelEMA
from fastema.core import offload as _offload
from fastema.core import steps as _steps
from fastema.core.offload import OffloadedStep
from fastema.core.plan import kernel_steps
from helpers import ToyNet, all_tensors, assert_matches_reference, assert_state_matches, update_forbidding_cuda_sync
from reference import ReferenceEMA, expected_tracked, snapshot


class ThreadSpy:
    """Wraps a group's step to record which thread ran it."""

    def __init__(self, group):
        self.group, self.threads = group, []

    def step(self, weight):
        self.threads.append(threading.get_ident())
        self.group.step(weight)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_background_update_uses_the_snapshot_taken_at_step_time(model_dtype):
    """The model is overwritten right after each step, as the next optimizer step would; the EMA must not see it."""
    generator = torch.Generator().manual_seed(0)
    model = {
        "weight": torch.randn(300, 7, generator=generator).to(model_dtype),
        "bias": torch.randn(7, generator=generator).to(model_dtype),
        "count": torch.tensor(0),
    }
    ema_tensors = [t.float().clone() if t.is_floating_point() else t.clone() for t in model.values()]
    reference = ReferenceEMA(model)
    spies = []

    def make_inner(ema, mirror):
        spies.extend(ThreadSpy(step) for step in kernel_steps(ema, mirror, [True] * len(ema), None))
        return spies

    group = OffloadedStep(ema_tensors, list(model.values()), [True, True, False], make_inner, background=True)
    decay = 0.8
    for _ in range(25):
        for tensor in model.values():
            tensor.add_(torch.randint(-3, 4, tensor.shape, generator=generator).to(tensor.dtype))
        group.step(1 - decay)
        reference.update(model, decay)
        for tensor in model.values():  # the next "optimizer step", before the background update is awaited
            tensor.fill_(1000)
        group.wait()
    assert_state_matches(dict(zip(model, ema_tensors)), reference.state, rtol=1e-6, atol=1e-6)
    threads = {thread for spy in spies for thread in spy.threads}
    assert threads and threading.get_ident() not in threads  # the averaging ran in the background thread


def test_background_error_is_raised_by_the_next_wait():
    model = [torch.ones(3)]
    ema = [torch.zeros(3)]

    class Broken:
        def step(self, weight):
            raise RuntimeError("kernel failed")

    group = OffloadedStep(ema, model, [True], lambda e, m: [Broken()], background=True)
    group.step(0.5)
    with pytest.raises(RuntimeError, match="kernel failed"):
        group.wait()
    group.wait()  # reported once


def test_a_failed_background_update_surfaces_on_the_next_call_and_blocks_reads_until_reset():
    from fastema.core.plan import Plan

    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.5)
    failures = [RuntimeError("kernel failed")]

    class FailsOnce(_steps.Step):
        def __init__(self, inner):
            self.inner = inner

        def step(self, weight):
            if failures:
                raise failures.pop()
            for step in self.inner:
                step.step(weight)

    binding = ema._tracker.binding
    ema._tracker.plan = Plan(
        [
            OffloadedStep(  # a background step, as an offloaded EMA has, on CPU
                binding.ema_tensors,
                binding.model_locals,
                binding.is_parameter,
                lambda e, m: [FailsOnce(kernel_steps(e, m, [True] * len(e), None))],
                background=True,
            )
        ]
    )
    ema.update()  # returns at once; the update fails in the background thread
    for call in (ema.update, lambda: ema.module, ema.state_dict, ema.use_ema_weights().__enter__):
        with pytest.raises(RuntimeError, match="kernel failed"):
            call()
    assert ema.num_updates == 1
    ema.reset()  # the EMA starts again from the model: usable again
    reference = ReferenceEMA(expected_tracked(model))
    with torch.no_grad():
        model.head.weight.add_(1)
    ema.update()
    reference.update(expected_tracked(model), 0.5)
    ema.synchronize()
    assert_matches_reference(ema, reference)


# ---- CUDA: a CUDA model with its EMA offloaded to host memory --------------------------------------------


def adam_steps(model, ema, reference, tracked, n_steps, decay, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(n_steps):
        x = torch.randn(16, 8, generator=generator).to("cuda", dtype)
        loss = model(x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.update(tracked, decay)  # snapshots (and syncs) before the update, outside it
        update_forbidding_cuda_sync(ema)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,ema_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("flatten_model", [False, True])
def test_cuda_model_with_cpu_ema_matches_reference_without_host_sync(dtype, ema_dtype, flatten_model):
    torch.manual_seed(0)
    model = ToyNet().to("cuda", dtype)
    ema = ModelEMA(model, 0.9, device="cpu", ema_dtype=ema_dtype, flatten_model=flatten_model)
    assert all(t.device.type == "cpu" for t in all_tensors(ema.module).values())
    offloaded = [step for step in ema._tracker.plan.steps if isinstance(step, OffloadedStep)]
    offloaded += [
        inner for step in ema._tracker.plan.packed for inner in step.inner if isinstance(inner, OffloadedStep)
    ]
    assert offloaded and all(m.mirror[0].is_pinned() for m in offloaded)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    adam_steps(model, ema, reference, tracked, 40, 0.9, dtype)
    assert ema.num_updates == 40
    assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_offloaded_snapshot_is_not_overwritten_by_the_next_optimizer_step():
    """Large tensors make the device-to-host copy slow; the optimizer is queued right behind it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 4096).cuda()
    ema = ModelEMA(model, 0.5, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    reference = ReferenceEMA(expected_tracked(model))
    for _ in range(5):
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.ones_like(model.bias)
        optimizer.step()
        reference.update(expected_tracked(model), 0.5)
        ema.update()
    # the last update's copy is still in flight when this step is queued; had the copy read its result,
    # every weight would be off by 0.5 (decay 0.5 times the step of 1.0)
    optimizer.step()
    assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_offloaded_snapshot_of_buffers_is_not_overwritten_by_the_next_forward():
    """BatchNorm writes its running statistics in place in the next forward, queued right behind the update."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.BatchNorm1d(4096)).cuda()
    ema = ModelEMA(model, 0.5, device="cpu")
    reference = ReferenceEMA(expected_tracked(model))
    x = torch.randn(64, 4096, device="cuda")
    for step in range(5):
        model.train()(x * (step + 2))
        reference.update(expected_tracked(model), 0.5)
        ema.update()
        model.train()(x)  # had the copy of the statistics waited on the side stream, it could read these
    ema.synchronize()
    assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_offloaded_ema_takes_no_gpu_memory():
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ema = ModelEMA(model, device="cpu")
    for _ in range(3):
        ema.update()
    ema.synchronize()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert torch.cuda.max_memory_allocated() - before < model_bytes / 8


@pytest.mark.cuda
def test_fastai_validation_with_an_offloaded_ema_restores_the_model_exactly():
    from fastema import EMACallback
    from helpers import make_learner

    learn = make_learner(cbs=[EMACallback(decay=0.9, ema_device="cpu")])
    learn.dls.cuda()
    learn.model.cuda()
    learn.fit(2)
    model_weights = {name: snapshot(t) for name, t in learn.model.state_dict().items()}
    ema = learn.ema.engine
    ema_loss = None
    with ema.use_ema_weights():
        ema_loss = learn.validate()[0]
        in_model = {name: snapshot(t) for name, t in learn.model.state_dict().items()}
    for name, tensor in all_tensors(learn.model_ema).items():
        if name in in_model:
            assert torch.equal(in_model[name], snapshot(tensor)), name
    for name, tensor in learn.model.state_dict().items():
        assert torch.equal(snapshot(tensor), model_weights[name]), name
    assert learn.recorder.values[-1][1] == pytest.approx(ema_loss)  # the fit's last validation used the EMA


def test_optimizer_hook_reaches_each_offloaded_step_and_goes_away_with_the_last():
    """The global `torch.optim` step pre-hook lives exactly as long as some offloaded step needs it."""
    import gc

    calls = []

    class Waiting:  # stands in for an offloaded step whose copy may still be in flight
        def before_model_write(self):
            calls.append(self)

    def sgd_step():
        parameter = torch.nn.Parameter(torch.ones(3))
        parameter.grad = torch.ones(3)
        torch.optim.SGD([parameter], lr=0.1).step()

    assert not _offload.optimizer_hook_installed()
    first, second = Waiting(), Waiting()
    _offload._watch_optimizer_steps(first)
    _offload._watch_optimizer_steps(second)
    sgd_step()
    assert sorted(map(id, calls)) == sorted([id(first), id(second)])
    calls.clear()
    _offload._unwatch_optimizer_steps(first)
    assert _offload.optimizer_hook_installed()  # `second` still needs it
    del second
    gc.collect()
    _offload._release(None, watched=True)  # what a collected OffloadedStep's finalizer does
    assert not _offload.optimizer_hook_installed()
    sgd_step()
    assert calls == []


def test_fastai_callback_lets_the_engine_guard_every_optimizer_step(monkeypatch):
    from fastema import EMACallback
    from helpers import make_learner

    guarded = []
    monkeypatch.setattr(ModelEMA, "before_model_write", lambda self: guarded.append(self.num_steps))
    learn = make_learner(cbs=[EMACallback(decay=0.9)])
    learn.fit(1)  # 8 optimizer steps, then a validation that swaps the EMA into the model
    assert guarded == [*range(8), 8]  # before each step (after the previous update), and before the swap
