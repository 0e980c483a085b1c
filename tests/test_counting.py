"""update() inside torch.compile (as users compile optimizer.step()): no graph break, the eager result, no recompile
as the decay changes; counts and decay in tensors. Dynamo's own backends (no inductor) keep these tests fast."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from fastema import ExponentialWarmup, InverseGammaWarmup, ModelEMA
from helpers import ConvNet, MixedNet, RunningAverage, ToyNet, calls_during
from reference import ReferenceEMA, expected_tracked


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def perturb(model, step):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * (step + 1))
        model.train()(torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(p.dtype))


def assert_same(ema, eager):
    assert (ema.num_updates, ema.num_steps) == (eager.num_updates, eager.num_steps)
    assert ema.last_decay == pytest.approx(eager.last_decay, rel=1e-12)
    for name, a, b in zip(ema.tensor_names, ema._tracker.binding.ema_tensors, eager._tracker.binding.ema_tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("decay_kind", ["float", "tensor", "default"])
def test_compiled_update_has_no_graph_break_matches_eager_and_does_not_recompile(decay_kind):
    torch.manual_seed(0)
    model = ToyNet()
    ema, eager = ModelEMA(model, 0.9), ModelEMA(model, 0.9)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    # aot_eager: dynamo's float handling as inductor gets it (a float the graph fills in would be specialised).
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)  # fullgraph: a graph break would raise
    def train_step(decay):
        if decay is None:
            ema.update()
        else:
            ema.update(decay=decay)

    for step in range(8):
        perturb(model, step)
        decay = 0.9 + 0.01 * step if decay_kind != "default" else None
        train_step(torch.tensor(decay, dtype=torch.float64) if decay_kind == "tensor" else decay)
        eager.update(decay)
        reference.update(tracked, 0.9 if decay is None else decay)
        if step == 1:
            # The first call moves the counts into tensors (one recompile); dynamo makes a float dynamic then too.
            warm = counter.frame_count
    assert warm <= 4 and counter.frame_count == warm  # six more decays, no recompile
    assert isinstance(ema._counts.tensors["num_updates"], torch.Tensor) and ema.num_updates == 8
    assert_same(ema, eager)
    for name, expected in reference.state.items():
        actual = dict(ema.state_dict()["tensors"])[name]
        if expected.is_floating_point():
            torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("warmup", [ExponentialWarmup(tau=3.0), InverseGammaWarmup(power=0.75, min_decay=0.1)])
def test_compiled_warmup_matches_eager(warmup):
    torch.manual_seed(0)
    model = ToyNet()
    ema, eager = ModelEMA(model, 0.99, warmup=warmup), ModelEMA(model, 0.99, warmup=warmup)
    train_step = torch.compile(ema.update, backend="eager", fullgraph=True)
    for step in range(6):
        perturb(model, step)
        train_step()
        eager.update()
    assert_same(ema, eager)


def test_aot_functionalised_mixed_precision_update_matches_eager():
    """aot_eager functionalises the in-place update as inductor would (the staged bf16 -> fp32 step here)."""
    torch.manual_seed(0)
    model = ToyNet().bfloat16()
    ema = ModelEMA(model, 0.9, ema_dtype=torch.float32)
    eager = ModelEMA(model, 0.9, ema_dtype=torch.float32)
    train_step = torch.compile(ema.update, backend="aot_eager", fullgraph=True)
    for step in range(4):
        perturb(model, step)
        train_step()
        eager.update()
    assert_same(ema, eager)


@pytest.mark.parametrize("compile_step", [False, True])
@pytest.mark.parametrize("ema_dtype", [torch.float32, None])
def test_compiled_update_of_every_kind_of_tensor_matches_eager(compile_step, ema_dtype):
    """fp32, bf16 and fp16 tensors, channels-last, a strided parameter; a compiled step traced into the caller."""
    torch.manual_seed(0)
    model = MixedNet()
    ema = ModelEMA(model, 0.9, ema_dtype=ema_dtype, compile=compile_step)
    eager = ModelEMA(model, 0.9, ema_dtype=ema_dtype)
    counter = CompileCounter()
    train_step = torch.compile(ema.update, backend=counter, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
            model.train()(torch.randn(2, 3, 5, 5, generator=generator))
        train_step()
        eager.update()
    assert counter.frame_count <= 2
    assert not any(step.function for step in ema._tracker.plan.compiled)  # traced into the graph, not compiled apart
    for name, a, b in zip(ema.tensor_names, ema._tracker.binding.ema_tensors, eager._tracker.binding.ema_tensors):
        # The traced single pass (compile_step) and the eager staged step round alike: lerp in float32.
        torch.testing.assert_close(a, b, rtol=torch.finfo(a.dtype).eps if a.is_floating_point() else 0, atol=0,
                                   msg=name)  # fmt: skip


def test_compiled_update_after_the_model_changes_follows_it():
    torch.manual_seed(0)
    model = ConvNet()
    ema, eager = ModelEMA(model, 0.8), ModelEMA(model, 0.8)
    counter = CompileCounter()
    train_step = torch.compile(ema.update, backend=counter)  # re-planning is eager: a graph break when it happens
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        if step == 3:
            model.to(memory_format=torch.channels_last)  # new layouts: the next call re-plans
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        train_step()
        eager.update()
    assert ema.module.conv.weight.stride() == model.conv.weight.stride()
    assert_same(ema, eager)
    with torch.no_grad():
        model.head.weight.data = model.head.weight.data.clone()  # same layout: the graph reads the new data
        model.head.weight.add_(1.0)
    train_step()
    eager.update()
    assert_same(ema, eager)


@pytest.mark.parametrize("change", ["submodule replaced", "tensor object replaced"])
def test_compiled_update_follows_a_replaced_submodule_or_tensor_object(change):
    """Guards on the modules' and tensors' identities: the old objects are never averaged again."""
    torch.manual_seed(0)
    model = ConvNet()
    ema = ModelEMA(model, 0.5)
    train_step = torch.compile(ema.update, backend="eager")
    train_step()
    if change == "submodule replaced":
        model.head = torch.nn.Linear(model.head.in_features, model.head.out_features)
    else:
        model.head.weight = torch.nn.Parameter(model.head.weight.detach().clone())
    with torch.no_grad():
        model.head.weight.fill_(10.0)
    for _ in range(4):
        train_step()
    assert ema.num_updates == 5
    # Four updates toward 10 from values within 1 of 0: within 11 * 0.5**4 of 10 (the old head's stay near 0).
    assert (ema.module.head.weight - 10.0).abs().max() <= 11.0 * 0.5**4
    assert ema.module.head.weight is not model.head.weight


@pytest.mark.parametrize("plan", ["flatten_model", "staged chunks"])
def test_compiled_update_reads_new_data_given_in_place_of_a_packed_or_chunked_tensor(plan, monkeypatch):
    """`p.data = ...` with the same layout passes dynamo's guards: the graph must read the tensor, not a view."""
    from fastema.core import steps as _steps

    torch.manual_seed(0)
    model = ToyNet()
    if plan == "staged chunks":
        monkeypatch.setitem(_steps.STAGING_ELEMENTS, "cpu", 40)  # the head's 48 weights are read in chunks
        model = model.bfloat16()
    options = {"flatten_model": True} if plan == "flatten_model" else {"ema_dtype": torch.float32, "compile": False}
    ema, eager = ModelEMA(model, 0.5, **options), ModelEMA(model, 0.5, **options)
    train_step = torch.compile(ema.update, backend="eager", fullgraph=True)
    train_step()
    eager.update()
    with torch.no_grad():
        model.head.weight.data = model.head.weight.data.clone()  # same shape, strides and dtype
        model.head.weight.add_(10.0)
    for _ in range(3):
        train_step()
        eager.update()
    torch.testing.assert_close(ema.module.head.weight, eager.module.head.weight, rtol=1e-6, atol=1e-6)
    assert (ema.module.head.weight.float() - model.head.weight.float()).abs().max() < 10.0 * 0.5**3 + 1.0


@pytest.mark.parametrize("kind", ["sharded", "offloaded"])
def test_a_sharded_or_offloaded_ema_is_not_updated_inside_a_graph(kind, monkeypatch):
    """Shards are followed by address, which no graph checks; an offloaded update runs in a thread: refused."""
    from fastema.core.plan import Plan

    model = ToyNet()
    ema = ModelEMA(model, 0.9)
    if kind == "sharded":
        ema._tracker.sharded = True  # stands for an FSDP2 / ZeRO-3 EMA (the distributed tests run real ones)
    else:  # stands for a CUDA model's EMA on the host (device="cpu"; no GPU here)
        monkeypatch.setattr(Plan, "offloaded", property(lambda self: True))
    for fullgraph in (True, False):
        with pytest.raises(Exception, match=r"sharded EMA .* or of an offloaded one"):
            torch.compile(ema.update, backend="eager", fullgraph=fullgraph)()
    assert ema.num_steps == 0 and ema._counts.tensors is None
    ema.update()  # outside a graph
    assert ema.num_updates == 1


def test_a_plan_knows_when_a_step_is_offloaded():
    from fastema.core.offload import OffloadedStep
    from fastema.core.plan import PackedStep, Plan

    assert not ModelEMA(ToyNet())._tracker.plan.offloaded
    offloaded = OffloadedStep.__new__(OffloadedStep)  # its kind is what counts here
    assert Plan([offloaded]).offloaded
    packed = PackedStep.__new__(PackedStep)
    packed.inner = [offloaded]
    assert Plan([packed]).offloaded


def test_decays_are_checked_before_counting_once_the_counts_are_tensors():
    ema = ModelEMA(ToyNet(), 0.9)
    ema.update(decay=torch.tensor(0.5, dtype=torch.float64))  # the counts move into tensors
    for bad, error in [(1.5, ValueError), (-0.1, ValueError), (True, TypeError), ("x", TypeError)]:
        with pytest.raises(error, match="Invalid decay"):
            ema.update(decay=bad)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ema.update(decay=torch.tensor([0.5, 0.6]))
    assert (ema.num_steps, ema.num_updates, ema.last_decay) == (1, 1, 0.5)
    bf16 = ModelEMA(ToyNet().bfloat16(), 0.9)
    bf16.update(decay=torch.tensor(0.5, dtype=torch.float64))
    with pytest.warns(UserWarning, match="round to nothing"):
        bf16.update(decay=0.99999)


def test_a_decay_tensor_that_requires_grad_leaves_no_graph_in_the_counts():
    import copy

    ema = ModelEMA(ToyNet(), 0.9)
    ema.update(decay=torch.tensor(0.9, dtype=torch.float64, requires_grad=True))
    assert ema._counts.tensors["last_decay"].grad_fn is None
    assert copy.deepcopy(ema).last_decay == 0.9


@pytest.mark.parametrize("foreach", [True, False])
def test_a_16_bit_ema_takes_a_tensor_weight_as_exactly_as_a_float(foreach):
    """A tensor decay's weight is not rounded to 16 bits: as with a float, it stays in float32."""
    torch.manual_seed(0)
    model = ToyNet().bfloat16()
    by_tensor, by_float = ModelEMA(model, foreach=foreach), ModelEMA(model, foreach=foreach)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    by_tensor.update(decay=torch.tensor(0.9, dtype=torch.float64))  # bf16(0.1) = 0.10009765625
    by_float.update(decay=0.9)
    for a, b in zip(by_tensor._tracker.binding.ema_tensors, by_float._tracker.binding.ema_tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_counts_in_tensors_read_write_and_save_like_numbers(tmp_path):
    model = ToyNet()
    ema = ModelEMA(model, 0.9)
    ema.update()  # eager: Python numbers
    ema.update(decay=torch.tensor(0.5, dtype=torch.float64))  # a tensor decay moves the counts into tensors
    assert ema._counts.tensors is not None
    assert (ema.num_updates, ema.num_steps, ema.last_decay) == (2, 2, 0.5)
    assert type(ema.num_updates) is int and type(ema.last_decay) is float
    state = ema.state_dict()
    assert (state["num_updates"], state["last_decay"]) == (2, 0.5)
    ema.update()
    assert (ema.num_updates, ema.last_decay) == (3, 0.9)  # later eager calls keep counting in the tensors
    ema.reset()
    assert (ema.num_updates, ema.num_steps, ema.last_decay) == (0, 0, 0.9)
    twin = ModelEMA(ToyNet(), 0.9)
    twin.update(decay=torch.tensor(0.7, dtype=torch.float64))
    path = ema.save(tmp_path / "ema.pt")
    twin.load(path)
    assert (twin.num_updates, twin.num_steps) == (0, 0) and twin._counts.tensors is not None
    with pytest.raises(ValueError, match="decay"):
        ema.update(decay=torch.tensor([0.5, 0.6]))


def test_captured_update_neither_syncs_nor_allocates_model_sized_memory():
    ema = ModelEMA(ToyNet(), 0.9)
    decay = torch.tensor(0.8, dtype=torch.float64)
    ema.update(decay=decay)
    functions, ops = calls_during(lambda: ema.update(decay=decay))
    assert not {"item", "tolist", "cpu", "__bool__"} & functions, functions
    assert "_local_scalar_dense" not in ops, ops  # what every device-to-host read goes through
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        ema.update(decay=decay)
    allocated = sum(e.self_cpu_memory_usage for e in profiler.key_averages() if e.self_cpu_memory_usage > 0)
    assert allocated <= 256  # a few 0-d weights and counts: nothing that grows with the model


def test_update_every_is_refused_where_updates_are_captured():
    ema = ModelEMA(ToyNet(), 0.9, update_every=2)
    with pytest.raises(ValueError, match="update_every"):
        ema.update(decay=torch.tensor(0.9, dtype=torch.float64))
    assert ema.num_steps == 0


@pytest.mark.cuda
def test_cuda_graph_captures_the_update():
    """Capture one update in a CUDA graph; each replay is one more update, with the decay read from a tensor."""
    torch.manual_seed(0)
    model = ToyNet().cuda()
    ema, eager = ModelEMA(model, 0.9), ModelEMA(model, 0.9)
    decay = torch.tensor(0.9, dtype=torch.float64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ema.update(decay=decay)  # warm-up outside the capture (counts move into tensors)
    torch.cuda.current_stream().wait_stream(stream)
    eager.update(0.9)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.update(decay=decay)  # recorded, not run
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        decay.fill_(0.9 - 0.01 * step)
        graph.replay()
        eager.update(0.9 - 0.01 * step)
    torch.cuda.synchronize()
    assert ema.num_updates == eager.num_updates == 6
    for a, b in zip(ema._tracker.binding.ema_tensors, eager._tracker.binding.ema_tensors):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_update_averages_a_buffer_the_model_replaces_in_every_forward():
    """Such a tensor is read through its slot: the graph takes this forward's tensor, not the one it was traced with."""

    torch.manual_seed(0)
    model = torch.nn.Sequential(RunningAverage(), torch.nn.Linear(8, 2))
    ema, eager = ModelEMA(model, 0.5), ModelEMA(model, 0.5)
    for _ in range(3):  # eagerly first: the EMA learns that `average` is replaced each step
        model(torch.randn(4, 8))
        ema.update()
        eager.update()
    assert "0.average" in ema._tracker.volatile
    train_step = torch.compile(ema.update, backend="eager", fullgraph=True)
    for _ in range(4):
        model(torch.randn(4, 8))
        train_step()
        eager.update()
    assert_same(ema, eager)


def test_a_replaced_submodule_without_tensors_costs_one_re_check_not_one_per_call(monkeypatch):
    from fastema.core.tracker import Tracker

    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.5)
    train_step = torch.compile(ema.update, backend="eager")
    train_step()
    model.body[2] = torch.nn.ReLU()  # holds no tensor: the binding stays current, the module links change
    follows = []
    real_follow = Tracker.follow
    monkeypatch.setattr(Tracker, "follow", lambda self, force=False: follows.append(1) or real_follow(self, force))
    for _ in range(4):
        train_step()
    assert len(follows) == 1 and ema.num_updates == 5
    torch.compile(ema.update, backend="eager", fullgraph=True)()  # no graph break left


@pytest.mark.parametrize("flatten_model", [False, True])
def test_a_16_bit_ema_with_a_tensor_weight_allocates_batches_not_the_model(flatten_model, monkeypatch):
    """Its float32 math goes through two buffers of one staging batch, whatever the model's size."""
    from torch.profiler import ProfilerActivity, profile

    from fastema.core import steps as _steps

    monkeypatch.setitem(_steps.STAGING_ELEMENTS, "cpu", 1024)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4)).bfloat16()
    ema, by_float = ModelEMA(model, flatten_model=flatten_model), ModelEMA(model, flatten_model=flatten_model)
    decay = torch.tensor(0.9, dtype=torch.float64)
    ema.update(decay=decay)
    by_float.update(0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        ema.update(decay=decay)
    allocated = sum(e.self_cpu_memory_usage for e in profiler.key_averages() if e.self_cpu_memory_usage > 0)
    assert allocated <= 2 * 1024 * 4 + 256  # the model's 66K float32 values would be 260 KB
    by_float.update(0.9)
    for a, b in zip(ema._tracker.binding.ema_tensors, by_float._tracker.binding.ema_tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_compiled_update_refuses_a_replaced_buffer_of_another_shape_before_counting():
    class Growing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)
            self.register_buffer("average", torch.zeros(8))

        def forward(self, x, size=8):
            self.average = torch.zeros(size) + x.mean()  # a new tensor every call
            return self.linear(x)

    model = Growing()
    ema = ModelEMA(model, 0.5)
    for _ in range(3):
        model(torch.randn(4, 8))
        ema.update()
    model(torch.randn(4, 8), size=9)
    with pytest.raises(RuntimeError, match="changed shape from"):
        torch.compile(ema.update, backend="eager")()
    assert ema.num_steps == 3


def test_a_compiled_update_follows_a_tensor_replaced_in_a_submodule_that_took_over_the_old_tensors():
    """As `SyncBatchNorm.convert_sync_batchnorm` does: a new module holding the old tensors, then a new tensor."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    ema = ModelEMA(model, 0.5)
    train_step = torch.compile(ema.update, backend="eager")
    train_step()
    new = torch.nn.Linear(2, 2)
    new.weight, new.bias = model[1].weight, model[1].bias  # the same tensor objects in a new module
    model[1] = new
    train_step()
    train_step()
    model[1].weight = torch.nn.Parameter(torch.full((2, 2), 10.0))
    for _ in range(6):
        train_step()
    assert (ema.module[1].weight - 10.0).abs().max() <= 11.0 * 0.5**6


@pytest.mark.parametrize("compiled", [False, True])
def test_an_integer_tensor_in_place_of_a_floating_buffer_is_copied_not_averaged(compiled):
    """Eagerly (a buffer replaced in every forward, read through its slot) and inside a graph alike."""

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("count", torch.zeros(()))
            self.calls = 0

        def forward(self, x):
            self.calls += 4
            self.count = torch.tensor(self.calls)  # an int64 tensor, new at every call
            return self.linear(x)

    model = Counter()
    ema = ModelEMA(model, 0.5)
    update = torch.compile(ema.update, backend="eager") if compiled else ema.update
    for step in range(6):
        model(torch.randn(1, 2))
        (update if step >= 3 else ema.update)()
    assert ema.module.count.item() == model.count.item() == 24
