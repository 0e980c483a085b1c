"""Following the model: every way PyTorch moves, casts, re-lays-out or replaces a tracked tensor is followed
on the next update (checked against the float64 reference), or raises; never a silently stale average."""

import copy
import itertools

import pytest
import torch
from torch import nn

from fastema import ModelEMA
from fastema.core import tracking as _binding
from helpers import (
    ConvNet,
    RunningAverage,
    ToyNet,
    all_tensors,
    assert_matches_reference,
    assert_update_runs_only_ema_kernels,
)
from reference import ReferenceEMA, expected_tracked

LAYOUTS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(flatten_model=True), id="flat"),
    pytest.param(dict(ema_dtype=torch.float64), id="staged"),
]


def step_and_compare(model, ema, reference, decay=0.5, steps=3, make_input=None):
    """Change every weight (as an optimizer would), update both EMAs, and compare."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
        if make_input is not None:
            model.train()(make_input())
        ema.update()
        reference.update(expected_tracked(model), decay)
    assert_matches_reference(ema, reference, rtol=1e-6, atol=1e-6)


def start(model, **options):
    ema = ModelEMA(model, 0.5, **options)
    return ema, ReferenceEMA(dict(ema.state_dict()["tensors"]))


def conv_input(dtype=torch.float32):
    return lambda: torch.randn(2, 3, 5, 5, dtype=dtype)


@pytest.mark.parametrize("options", LAYOUTS)
def test_partial_channels_last_conversion_of_a_partly_channels_last_model(options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    model[0].to(memory_format=torch.channels_last)  # the first 4-d tensor is channels-last already
    ema, reference = start(model, **options)
    model.to(memory_format=torch.channels_last)  # only the second conv's weight changes layout
    step_and_compare(model, ema, reference, make_input=lambda: torch.randn(2, 3, 7, 7))
    if options.get("flatten_model"):  # followed and packed again: one buffer, strides of the model
        packed = ema._tracker.plan.packed[0]
        assert all(
            p.untyped_storage().data_ptr() == packed.model_flat.untyped_storage().data_ptr() for p in model.parameters()
        )
        assert ema.module[2].weight.stride() == model[2].weight.stride()


@pytest.mark.parametrize("options", LAYOUTS)
@pytest.mark.parametrize("conversion", ["whole", "submodule"])
def test_conversions_with_the_overwrite_flag_make_new_parameters(options, conversion):
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, **options)
    old_weight = model.head.weight
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        (model if conversion == "whole" else model.head).double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert model.head.weight is not old_weight  # a new Parameter, which nothing tracked
    step_and_compare(model, ema, reference, make_input=conv_input(torch.float64) if conversion == "whole" else None)


@pytest.mark.parametrize("options", LAYOUTS)
def test_partial_dtype_conversion_of_one_submodule(options):
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, **options)
    model.norm.double()  # its parameters (.data =) and its buffers (new objects) change; nothing else
    step_and_compare(model, ema, reference)


@pytest.mark.parametrize("options", LAYOUTS)
def test_p_data_assignment_by_hand(options):
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, **options)
    model.head.weight.data = torch.full_like(model.head.weight, 3.0)  # new storage, same object
    model.norm.running_mean.data = torch.full((6,), 2.0)
    step_and_compare(model, ema, reference)


@pytest.mark.parametrize("options", LAYOUTS)
def test_swap_tensors_and_load_state_dict_assign(options):
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, **options)
    torch.utils.swap_tensors(model.conv.bias, nn.Parameter(torch.full((6,), 5.0)))
    model.load_state_dict({name: torch.ones_like(t) for name, t in model.state_dict().items()}, assign=True)
    step_and_compare(model, ema, reference)


@pytest.mark.parametrize("options", LAYOUTS)
def test_module_replaced_by_one_of_the_same_shape(options):
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, **options)
    model.head = nn.Linear(6, 4)  # what `setattr` registers: the global registration hook sees it
    step_and_compare(model, ema, reference)


def test_model_built_on_meta_then_materialised_starts_the_ema_from_the_initialised_weights():
    with torch.device("meta"):
        model = ToyNet()
    ema = ModelEMA(model, 0.5)
    assert ema.module.head.weight.device.type == "meta"
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.calls.zero_()
    reference = ReferenceEMA(expected_tracked(model))  # the first real weights the EMA can see
    ema.update()
    reference.update(expected_tracked(model), 0.5)
    assert all(t.device.type == "cpu" for t in all_tensors(ema.module).values())
    step_and_compare(model, ema, reference, make_input=lambda: torch.randn(4, 8))


def test_ema_module_converted_by_the_user_keeps_its_dtype_and_its_untracked_tensors_follow():
    torch.manual_seed(0)
    model = ToyNet()
    ema, reference = start(model)
    ema.module.double()
    step_and_compare(model, ema, reference, make_input=lambda: torch.randn(4, 8))
    assert all(t.dtype == torch.float64 for t in all_tensors(ema.module).values() if t.is_floating_point())
    ema.module(torch.randn(2, 8, dtype=torch.float64))  # frozen (untracked) weights converted alike


def test_model_converted_untracked_tensors_of_the_ema_module_follow():
    """ema.module must stay runnable: its frozen weights follow the model, in the EMA's dtype."""
    torch.manual_seed(0)
    model = ToyNet()
    ema, reference = start(model)
    model.double()
    step_and_compare(model, ema, reference, make_input=lambda: torch.randn(4, 8, dtype=torch.float64))
    frozen = ema.module.frozen.weight
    assert frozen.dtype == torch.float32 and torch.equal(frozen, model.frozen.weight.float())
    ema.module(torch.randn(2, 8))
    model.float()
    ema.update()
    assert ema.module.frozen.weight.data_ptr() == model.frozen.weight.data_ptr()  # shared again


@pytest.mark.cuda
@pytest.mark.parametrize("options", LAYOUTS)
def test_model_moved_to_cuda_and_back_is_followed_with_its_untracked_tensors(options):
    torch.manual_seed(0)
    model = ToyNet()
    ema, reference = start(model, **options)
    model.cuda()
    step_and_compare(model, ema, reference, make_input=lambda: torch.randn(4, 8, device="cuda"))
    assert all(t.device.type == "cuda" for t in all_tensors(ema.module).values())
    ema.module(torch.randn(2, 8, device="cuda"))
    model.head.cpu()  # a partial move
    with torch.no_grad():
        model.head.weight.add_(1)
    ema.update()
    assert ema.module.head.weight.device.type == "cpu"


def test_structure_change_raises_instead_of_averaging_something_else():
    model = ConvNet()
    ema = ModelEMA(model, 0.5)
    model.head = nn.Linear(6, 7)  # another shape
    with pytest.raises(RuntimeError, match=r"head\.weight changed shape"):
        ema.update()
    model = ConvNet()
    ema = ModelEMA(model, 0.5)
    del model.norm
    model.norm = nn.Identity()
    with pytest.raises(RuntimeError, match="no longer has the tensors"):
        ema.update()


def test_a_hand_made_change_of_dtype_fails_loudly_and_the_ema_refuses_to_be_read_until_reset():
    """`p.data = ...` with another dtype is followed only after refresh(); before that the update fails."""
    model = ConvNet()
    ema = ModelEMA(model, 0.5)
    model.head.weight.data = model.head.weight.data.double()  # no module API saw this
    with pytest.raises(RuntimeError, match="EMA update failed"):
        ema.update()
    with pytest.raises(RuntimeError, match="incomplete"):
        ema.state_dict()
    ema.refresh()
    ema.reset()
    ema.update()
    torch.testing.assert_close(ema.module.head.weight, model.head.weight.float())


def test_the_per_update_check_reads_one_counter_when_nothing_changed(monkeypatch):
    """The full pass over the tensors runs only after a module change: never on an ordinary training step."""
    torch.manual_seed(0)
    model = ConvNet()
    ema = ModelEMA(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checks = []
    real_current = _binding.Binding.current
    monkeypatch.setattr(_binding.Binding, "current", lambda self: checks.append(1) or real_current(self))
    for _ in range(3):
        model.train()(torch.randn(2, 3, 5, 5)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()(torch.randn(2, 3, 5, 5))
        ema.update()
    assert checks == []
    model.head.to(torch.float32)  # a conversion that changes nothing still counts as a possible change
    ema.update()
    assert checks == [1]


def test_two_flattened_emas_of_one_model_share_its_buffer_and_allocate_nothing_per_update():
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    first = ModelEMA(model, 0.9, flatten_model=True)
    second = ModelEMA(model, 0.99, flatten_model=True)
    addresses = [p.data_ptr() for p in model.parameters()]
    assert second._tracker.plan.packed[0].model_flat.data_ptr() == first._tracker.plan.packed[0].model_flat.data_ptr()
    references = [ReferenceEMA(expected_tracked(model)) for _ in range(2)]
    for step in range(4):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * step)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            first.update()
            second.update()
        allocated = sum(e.self_cpu_memory_usage for e in profiler.key_averages() if e.self_cpu_memory_usage > 0)
        assert allocated == 0, step
        for reference, decay in zip(references, (0.9, 0.99)):
            reference.update(expected_tracked(model), decay)
    assert [p.data_ptr() for p in model.parameters()] == addresses  # neither re-packed the other's buffer
    for ema, reference in zip((first, second), references):
        assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-6)


def test_parameters_in_the_users_flat_buffer_are_read_in_place_and_training_is_unchanged():
    """A contiguous-parameters optimizer steps one buffer that the parameters view; packing must not move them."""

    def train(flatten):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        master = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        offset = 0
        for parameter in model.parameters():
            parameter.data = master[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        ema = ModelEMA(model, 0.8, flatten_model=flatten) if flatten is not None else None
        reference = ReferenceEMA(expected_tracked(model))
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            model(torch.randn(16, 4, generator=generator)).square().mean().backward()
            gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            with torch.no_grad():
                master.sub_(0.1 * gradient)  # the optimizer steps the master buffer, never the parameters
            model.zero_grad()
            if ema is not None:
                ema.update()
                reference.update(expected_tracked(model), 0.8)
        return model, master, ema, reference

    plain, _, _, _ = train(None)
    model, master, ema, reference = train(True)
    for trained, untouched in zip(model.parameters(), plain.parameters()):
        assert torch.equal(trained, untouched)  # training exactly as without an EMA
    assert all(p.untyped_storage().data_ptr() == master.untyped_storage().data_ptr() for p in model.parameters())
    assert ema._tracker.plan.packed and ema._tracker.plan.packed[0].model_flat.data_ptr() == master.data_ptr()
    assert_matches_reference(ema, reference)


def test_parameter_hooks_keep_firing_and_gradients_are_unchanged_after_packing():
    def gradients(flatten):
        torch.manual_seed(0)
        model = ConvNet()
        seen = []
        model.conv.weight.register_hook(lambda grad: seen.append("hook") or grad * 2)
        model.head.weight.register_post_accumulate_grad_hook(lambda p: seen.append("post"))
        if flatten:
            ModelEMA(model, flatten_model=True)
        model(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))).sum().backward()
        return seen, [p.grad.clone() for p in model.parameters()]

    packed_hooks, packed_grads = gradients(True)
    plain_hooks, plain_grads = gradients(False)
    assert packed_hooks == plain_hooks and sorted(plain_hooks) == ["hook", "post"]
    for packed, plain in zip(packed_grads, plain_grads):
        assert torch.equal(packed, plain)


def test_packing_keeps_each_parameters_autograd_node():
    """DDP registers its all-reduce on each parameter's gradient accumulator; packing must keep that node."""
    model = ConvNet()
    nodes = [p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()]
    ModelEMA(model, flatten_model=True)
    assert [p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()] == nodes


def test_a_view_held_by_the_user_keeps_its_tensor_out_of_the_packed_buffer():
    model = ConvNet()
    alias = model.head.weight.data  # the user keeps writing through this
    ema = ModelEMA(model, 0.5, flatten_model=True)
    assert model.head.weight.data_ptr() == alias.data_ptr()
    alias.fill_(2.0)
    reference = ReferenceEMA(dict(ema.state_dict()["tensors"]))
    ema.update()
    reference.update(expected_tracked(model), 0.5)
    assert_matches_reference(ema, reference)


def test_lora_style_ema_shares_the_frozen_base_and_costs_only_the_adapters():
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]).requires_grad_(False)
    adapters = nn.ModuleList(
        nn.Sequential(nn.Linear(64, 2, bias=False), nn.Linear(2, 64, bias=False)) for _ in range(4)
    )
    model = nn.ModuleDict(dict(base=base, adapters=adapters))
    ema = ModelEMA(model)
    model_storages = {t.untyped_storage().data_ptr() for t in all_tensors(model).values()}
    own = sum(
        t.numel() * t.element_size()
        for t in all_tensors(ema.module).values()
        if t.untyped_storage().data_ptr() not in model_storages
    )
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.parameters())
    assert own == adapter_bytes  # the EMA holds the adapters only; the frozen base is the model's own
    copied = ModelEMA(copy.deepcopy(model), ema_dtype=torch.float64)  # another dtype: copies, as they must be
    assert all(t.dtype == torch.float64 for t in all_tensors(copied.module).values())


def test_deprecated_weight_norm_model_can_be_averaged():
    with pytest.warns(FutureWarning, match="weight_norm"):
        model = nn.utils.weight_norm(nn.Linear(3, 2))
    model(torch.randn(2, 3))  # the hook leaves `weight` as a computed tensor, which deepcopy refuses
    ema, reference = start(model)
    step_and_compare(model, ema, reference)
    assert ema.module(torch.randn(1, 3)).shape == (1, 2)


def test_ema_module_holds_the_models_current_untracked_values():
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model)
    model.train()(torch.randn(4, 8))  # bumps the non-persistent `calls` buffer
    with torch.no_grad():
        model.frozen.weight.mul_(2)
    assert ema.module.calls.item() == 1 and torch.equal(ema.module.frozen.weight, model.frozen.weight)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_unwraps_compiled_and_data_parallel_models(wrap):
    model = ToyNet()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    ema = ModelEMA(wrapped)
    assert ema.model is model
    assert set(ema.tensor_names) == set(expected_tracked(model)) and not any(
        name.startswith(("_orig_mod.", "module.")) for name in ema.tensor_names
    )


def test_every_model_change_event_moves_the_counter():
    model = ConvNet()
    _binding.watch_module_changes()
    for change in (
        lambda: model.to(torch.float64),
        lambda: model.head.to(memory_format=torch.contiguous_format),
        lambda: setattr(model, "extra", nn.Linear(1, 1)),
        lambda: model.register_buffer("scale", torch.ones(1)),
        lambda: setattr(model.head, "bias", nn.Parameter(torch.zeros(4))),
    ):
        before = _binding.changes()
        change()
        assert _binding.changes() > before


@pytest.mark.parametrize("all_parameters,all_buffers", list(itertools.product([False, True], [False, True])))
def test_tracked_names_match_the_reference_choice(all_parameters, all_buffers):
    model = ToyNet()
    assert (
        _binding.tracked_tensors(model, all_parameters, all_buffers).keys()
        == expected_tracked(model, all_parameters, all_buffers).keys()
    )


def tied_model():
    model = nn.Module()
    model.emb = nn.Embedding(5, 4)
    model.out = nn.Linear(4, 5, bias=False)
    model.out.weight = model.emb.weight
    return model


@pytest.mark.parametrize("options", LAYOUTS)
@pytest.mark.parametrize("untie", ["load_state_dict(assign=True)", "meta + to_empty"])
def test_weights_untied_after_construction_are_never_written_by_the_ema(options, untie):
    if untie == "meta + to_empty":
        with torch.device("meta"):
            model = tied_model()
        ema = ModelEMA(model, 0.5, **options)
        model.to_empty(device="cpu")  # materialises the two names as two tensors
        with torch.no_grad():
            model.emb.weight.normal_()
            model.out.weight.normal_()
    else:
        torch.manual_seed(0)
        model = tied_model()
        ema = ModelEMA(model, 0.5, **options)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert model.out.weight is not model.emb.weight
    model_before = {name: t.detach().clone() for name, t in all_tensors(model).items()}
    ema.update()
    for name, tensor in all_tensors(model).items():
        assert torch.equal(tensor, model_before[name]), name  # update() only reads the model
    assert ema.module.out.weight is not ema.module.emb.weight  # the EMA's module is untied alike
    assert torch.equal(ema.module.out.weight, model.out.weight.to(ema.module.out.weight.dtype))  # now untracked
    if "ema_dtype" not in options:  # ...and, in the model's dtype, the model's own storage
        assert ema.module.out.weight.data_ptr() == model.out.weight.data_ptr()


def test_tied_weights_stay_tied_in_the_ema_module():
    torch.manual_seed(0)
    model = tied_model()
    ema, reference = start(model)
    step_and_compare(model, ema, reference)
    assert ema.module.out.weight is ema.module.emb.weight and ema.tensor_names == ["emb.weight"]


def test_packing_leaves_shared_memory_and_foreign_storage_where_they_are():
    import numpy as np

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model.share_memory()  # Hogwild: other processes see these storages
    ModelEMA(model, 0.5, flatten_model=True)
    assert all(p.is_shared() for p in model.parameters())
    array = np.zeros((3, 3), dtype=np.float32)
    numpy_backed = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    numpy_backed[0].weight = nn.Parameter(torch.from_numpy(array))
    ModelEMA(numpy_backed, 0.5, flatten_model=True)
    with torch.no_grad():
        numpy_backed[0].weight.fill_(2.0)
    assert (array == 2.0).all()  # still the array's memory


def test_a_frozen_parameter_replaced_by_hand_is_shared_again_when_the_ema_module_is_read():
    model = ToyNet()
    ema = ModelEMA(model, 0.9)
    model.frozen.weight.data = torch.ones(16, 16)  # no module API sees this
    ema.update()
    assert torch.equal(ema.module.frozen.weight, model.frozen.weight)
    assert ema.module.frozen.weight.data_ptr() == model.frozen.weight.data_ptr()


def test_an_untracked_submodule_replaced_is_followed_by_the_ema_module():
    model = ToyNet()
    ema = ModelEMA(model, 0.9)
    model.frozen = nn.Linear(16, 16).requires_grad_(False)
    ema.update()
    assert ema.module.frozen.weight.data_ptr() == model.frozen.weight.data_ptr()


@pytest.mark.parametrize("flatten_model", [False, True])
def test_ema_module_re_laid_out_by_the_user_follows_the_models_layout_again(flatten_model):
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, flatten_model=flatten_model)
    ema.module.to(memory_format=torch.channels_last)
    step_and_compare(model, ema, reference)
    assert ema.module.conv.weight.stride() == model.conv.weight.stride()


def test_a_model_made_channels_last_after_the_ema_keeps_the_staged_step_allocation_free(monkeypatch):
    from fastema.core import steps as _steps

    monkeypatch.setitem(_steps.STAGING_ELEMENTS, "cpu", 100)  # the conv weight (648 elements) is chunked
    torch.manual_seed(0)
    model = ConvNet().bfloat16()
    model.conv = nn.Conv2d(3, 24, 3, padding=1).bfloat16()
    ema = ModelEMA(model, 0.5, ema_dtype=torch.float32)
    model.to(memory_format=torch.channels_last)
    ema.update()  # follows: the EMA takes the model's layout
    assert ema.module.conv.weight.stride() == model.conv.weight.stride()
    assert_update_runs_only_ema_kernels(ema)


def test_a_large_tensor_replaced_by_hand_is_followed_by_the_staged_step(monkeypatch):
    from fastema.core import steps as _steps

    monkeypatch.setitem(_steps.STAGING_ELEMENTS, "cpu", 10)  # every weight is split into precomputed chunks
    torch.manual_seed(0)
    model = ConvNet().bfloat16()
    ema, reference = start(model, ema_dtype=torch.float32)
    model.head.weight.data = torch.full((4, 6), 3.0, dtype=torch.bfloat16)
    step_and_compare(model, ema, reference)


def test_swap_tensors_alone_is_followed_by_a_packed_step():
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, flatten_model=True)
    torch.utils.swap_tensors(model.head.weight, nn.Parameter(torch.full((4, 6), 2.0)))
    step_and_compare(model, ema, reference)


@pytest.mark.parametrize("options", LAYOUTS)
def test_a_buffer_reassigned_in_every_forward_is_followed_without_a_new_plan_each_step(options, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(RunningAverage(0.9, 0.1), nn.Linear(8, 2))
    ema, reference = start(model, **options)
    checks = []
    real_current = _binding.Binding.current
    monkeypatch.setattr(_binding.Binding, "current", lambda self: checks.append(1) or real_current(self))
    step_and_compare(model, ema, reference, steps=10, make_input=lambda: torch.randn(4, 8))
    assert len(checks) <= 3  # learning that `average` is replaced each step, then reading it through its slot
    model(torch.randn(4, 8))
    if not options:  # reading shape, dtype and device of the reassigned buffer (`__get__`) is all it adds
        assert_update_runs_only_ema_kernels(ema, also={"__get__"})


def test_a_refused_update_does_not_count_as_a_step():
    model = ConvNet()
    ema = ModelEMA(model, 0.5, update_every=2)
    model.head = nn.Linear(6, 7)
    ema.update()  # counts the step (update_every=2): nothing to read yet
    for _ in range(3):
        with pytest.raises(RuntimeError, match="changed shape"):
            ema.update()
    assert ema.num_steps == 1  # the first call only counted (update_every=2); the refused ones did not


def test_tensor_names_chooses_exactly_what_is_averaged():
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.5, tensor_names=["head.weight", "frozen.weight", "body.1.num_batches_tracked"])
    reference = ReferenceEMA({name: t for name, t in all_tensors(model).items() if name in ema.tensor_names})
    with torch.no_grad():
        model.frozen.weight.add_(1.0)
        model.head.weight.add_(1.0)
    model(torch.randn(4, 8))
    ema.update()
    reference.update({name: t for name, t in all_tensors(model).items() if name in ema.tensor_names}, 0.5)
    assert_matches_reference(ema, reference)
    for bad, error in ((["nope"], ValueError), ([], ValueError), ("head.weight", TypeError)):
        with pytest.raises(error, match="tensor_names"):
            ModelEMA(model, tensor_names=bad)


@pytest.mark.parametrize("options", LAYOUTS)
def test_a_buffer_reassigned_in_every_forward_is_averaged_on_time_when_other_modules_are_created(options):
    # A loss module built inside the loop registers a buffer: the counter moves, the binding is current,
    # and the slot step must still read the tensor of *this* forward, not the previous one.
    torch.manual_seed(0)
    model = nn.Sequential(RunningAverage(), nn.Linear(8, 2))
    ema, reference = start(model, **options)

    def new_module_and_input():
        nn.BatchNorm1d(3)  # an unrelated module, registering its buffers in the same step
        return torch.randn(4, 8)

    step_and_compare(model, ema, reference, steps=8, make_input=new_module_and_input)


@pytest.mark.parametrize("options", LAYOUTS)
def test_all_parameters_replaced_straight_in_the_modules_dicts_are_followed_one_needs_refresh(options):
    # What FSDP2's fully_shard does: `module._parameters[name] = new` for every parameter, which no hook sees.
    # fastema watches the first tracked tensor by identity, so replacing them all is noticed by itself.
    torch.manual_seed(0)
    model = ConvNet()
    ema, reference = start(model, **options)
    step_and_compare(model, ema, reference, steps=1)
    for module in model.modules():
        for key, parameter in list(module._parameters.items()):
            module._parameters[key] = nn.Parameter(parameter.detach().clone())
    step_and_compare(model, ema, reference, steps=2)  # the new parameters are averaged, not the old objects
    # One later tensor alone is not watched (that would cost a look at every slot per update): refresh() it.
    last = [module for module in model.modules() if module._parameters][-1]
    key = next(iter(last._parameters))
    last._parameters[key] = nn.Parameter(last._parameters[key].detach().clone())
    ema.refresh()
    step_and_compare(model, ema, reference, steps=2)
