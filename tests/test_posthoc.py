"""Post-hoc EMA (EDM2): power-function EMAs against a float64 for-loop, synthesis against a float64 solve
written here, exact resume, and the snapshot directory's errors."""

import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastema.posthoc import PostHocEMA, gamma_to_sigma_rel, sigma_rel_to_gamma, synthesize
from helpers import ConvNet, ToyNet, calls_during, kill_while_writing
from reference import expected_tracked, snapshot

SIGMA_RELS = (0.05, 0.10)


# ---- the reference: written from the paper's definitions, independent of fastema -----------------------


def reference_gamma(sigma_rel):
    """The largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2), by numpy."""
    t = sigma_rel**-2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return max(root.real for root in roots if abs(root.imag) < 1e-9)


class ReferencePowerEMA:
    """float64 EMA with decay (1 - N/t) ** (gamma + 1) at optimizer step t (updates at multiples of N)."""

    def __init__(self, gamma, update_every=1):
        self.gamma, self.update_every, self.state = gamma, update_every, None

    def update(self, tensors, step):
        if step % self.update_every:
            return
        current = {name: snapshot(t) for name, t in tensors.items()}
        decay = (1 - self.update_every / step) ** (self.gamma + 1)
        if self.state is None:
            self.state = current  # the first update (decay 0) copies the model
        for name, value in current.items():
            if value.is_floating_point():
                self.state[name] = decay * self.state[name] + (1 - decay) * value
            else:
                self.state[name] = value


def reference_coefficients(steps, gammas, step, gamma):
    """x with A x = b (A: the snapshots' profiles' inner products, b: with the target), summing to 1."""

    def inner(t_a, g_a, t_b, g_b):  # integral over [0, min] of (g_a+1) tau^g_a / t_a^(g_a+1) * (same for b)
        m = min(t_a, t_b)
        return (g_a + 1) * (g_b + 1) * m ** (g_a + g_b + 1) / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1))

    a = np.array([[inner(ti, gi, tj, gj) for tj, gj in zip(steps, gammas)] for ti, gi in zip(steps, gammas)])
    b = np.array([inner(ti, gi, step, gamma) for ti, gi in zip(steps, gammas)])
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


def train(model, ema, steps, references=(), seed=0, start=0):
    """Real SGD steps; after each one update the EMA and the references."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.5)
    tracked = expected_tracked(model)
    for step in range(start + 1, start + steps + 1):
        model(torch.randn(8, 8, generator=generator).to(next(model.parameters()).dtype)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        for reference in references:
            reference.update(tracked, step)


def assert_close_to(tensors, expected, rtol=1e-5, atol=1e-6):
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(snapshot(tensors[name]), value, rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(tensors[name], value), name


# ---- the profiles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.15, 0.25, 0.2886])
def test_sigma_rel_and_gamma_convert_as_the_closed_forms_say(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(reference_gamma(sigma_rel), rel=1e-9)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("bad,error", [(0.0, ValueError), (0.29, ValueError), (-0.1, ValueError), ("0.1", TypeError)])
def test_sigma_rel_out_of_range_raises_naming_it(bad, error):
    with pytest.raises(error, match="sigma_rel"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(error, match="sigma_rels"):
        PostHocEMA(ToyNet(), sigma_rels=(0.05, bad))


# ---- tracking ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,dtype",
    [
        (dict(), torch.float64),
        (dict(update_every=3), torch.float64),
        (dict(flatten_model=True), torch.float64),
        (dict(foreach=False), torch.float64),
        (dict(ema_dtype=torch.float32), torch.bfloat16),
    ],
    ids=["default", "update-every-3", "flat", "loop", "float32-of-bfloat16"],
)
def test_power_emas_match_the_float64_reference(options, dtype, monkeypatch):
    from fastema.core import steps as _steps

    monkeypatch.setitem(_steps.STAGING_ELEMENTS, "cpu", 50)  # several batches and chunks per update
    torch.manual_seed(0)
    model = ToyNet().to(dtype)
    ema = PostHocEMA(model, SIGMA_RELS, **options)
    references = [ReferencePowerEMA(reference_gamma(s), options.get("update_every", 1)) for s in SIGMA_RELS]
    train(model, ema, 30, references)
    assert ema.num_steps == 30 and ema.num_updates == 30 // options.get("update_every", 1)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-10, atol=1e-12)
    for sigma_rel, reference in zip(SIGMA_RELS, references):
        assert_close_to(ema.ema_tensors(sigma_rel), reference.state, **tolerance)
        module_state = dict(ema.module_for(sigma_rel).state_dict())
        assert_close_to(module_state, reference.state, **tolerance)
    wide, narrow = (ema.ema_tensors(s)["head.weight"] for s in SIGMA_RELS)
    assert not torch.equal(wide, narrow)  # two different averages


def test_update_reads_the_model_once_and_neither_syncs_nor_allocates_model_sized_memory():
    model = ConvNet()
    ema = PostHocEMA(model, (0.03, 0.06, 0.09, 0.12))
    ema.update()
    functions, ops = calls_during(ema.update)
    assert functions <= {"_set_grad_enabled", "_foreach_copy_", "lerp_", "data_ptr"}, functions
    # One staging copy per batch (the model read once), then one lerp per EMA from the staged values.
    assert ops == {"_foreach_copy_", "lerp_"}, ops
    lerps = []
    original = torch.Tensor.lerp_
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "lerp_", lambda self, *args: lerps.append(self.data_ptr()) or original(self, *args))
        ema.update()
    assert len(lerps) == 4 and sum(1 for step in ema._stacks.stacked for _ in step.batches) == 1
    (stacked,) = ema._stacks.stacked
    copies, copy = [], stacked.copy
    stacked.copy = lambda *args: copies.append(1) or copy(*args)
    ema.update()
    assert len(copies) == 1  # the model staged once, not once per EMA


def test_use_ema_weights_and_module_for_give_one_tracked_ema():
    torch.manual_seed(0)
    model = ConvNet()
    ema = PostHocEMA(model, SIGMA_RELS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ema.update()
    ema.update()
    own = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randn(2, 3, 5, 5)
    expected = ema.module_for(0.10)(x)
    with ema.use_ema_weights(0.10):
        torch.testing.assert_close(model.eval()(x), expected)
        with pytest.raises(RuntimeError, match="inside use_ema_weights"):
            ema.update()
    for name, value in model.state_dict().items():
        assert torch.equal(value, own[name]), name
    with pytest.raises(ValueError, match="sigma_rel"):
        ema.module_for(0.07)


def test_reads_inside_use_ema_weights_raise_rather_than_return_the_model(tmp_path):
    ema = PostHocEMA(ToyNet(), SIGMA_RELS)
    ema.update()
    with ema.use_ema_weights(0.05):
        assert ema.ema_weights_in_use
        for read in (lambda: ema.ema_tensors(0.05), ema.state_dict, lambda: ema.save(tmp_path / "never.pt")):
            with pytest.raises(RuntimeError, match="inside use_ema_weights"):
                read()
    assert not ema.ema_weights_in_use and not (tmp_path / "never.pt").exists()


def test_an_in_place_write_inside_use_ema_weights_is_kept_in_the_ema_with_a_warning():
    torch.manual_seed(0)
    model = ToyNet()
    ema = PostHocEMA(model, SIGMA_RELS)
    ema.update()
    own = model.head.weight.detach().clone()
    written = r"\['head.weight'\] were written in place"
    with pytest.warns(UserWarning, match=written), ema.use_ema_weights(0.05), torch.no_grad():
        model.head.weight.fill_(3.0)
    assert torch.equal(model.head.weight, own)  # the model's own weights back
    assert torch.all(ema.ema_tensors(0.05)["head.weight"] == 3.0)  # the write went into that EMA, as it says
    assert not torch.any(ema.ema_tensors(0.10)["head.weight"] == 3.0)


def test_an_update_that_fails_part_way_leaves_every_read_refused_until_a_load():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2).double())  # two dtypes: two stacked steps
    ema = PostHocEMA(model, SIGMA_RELS)
    ema.update()
    good = ema.state_dict()
    good["emas"] = [{name: tensor.clone() for name, tensor in saved.items()} for saved in good["emas"]]  # not views
    _, second = ema._stacks.stacked
    second.step = lambda weight: (_ for _ in ()).throw(RuntimeError("out of memory"))  # after the first moved
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    with pytest.raises(RuntimeError, match=r"update failed .*out of memory"):
        ema.update()
    del second.step
    assert ema.num_updates == 1
    for read in (ema.update, lambda: ema.module_for(0.05), lambda: ema.ema_tensors(0.05), ema.state_dict):
        with pytest.raises(RuntimeError, match="incomplete"):
            read()
    with pytest.raises(RuntimeError, match="incomplete"), ema.use_ema_weights(0.05):
        pass
    ema.load_state_dict(good)  # overwrites every EMA: usable again, exactly as saved
    for index, sigma_rel in enumerate(SIGMA_RELS):
        for name, tensor in ema.ema_tensors(sigma_rel).items():
            assert torch.equal(tensor, good["emas"][index][name]), name
    ema.update()
    assert ema.num_updates == 2


def live_reference_run(model, ema, steps, references, start=0, seed=0):
    """As `train`, with the reference reading the model's tensors afresh at each step (they may be replaced)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.5)
    for step in range(start + 1, start + steps + 1):
        model(torch.randn(8, 8, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        for reference in references:
            reference.update(expected_tracked(model), step)


@pytest.mark.parametrize("flatten_model", [False, True], ids=["tensors", "flat"])
def test_replacing_a_parameter_s_data_is_followed(flatten_model):
    torch.manual_seed(0)
    model = ToyNet()
    ema = PostHocEMA(model, SIGMA_RELS, flatten_model=flatten_model)
    references = [ReferencePowerEMA(reference_gamma(s)) for s in SIGMA_RELS]
    live_reference_run(model, ema, 5, references)
    with torch.no_grad():
        model.head.weight.data = torch.full_like(model.head.weight, 0.05)  # leaves the packed buffer, if any
    live_reference_run(model, ema, 5, references, start=5, seed=1)
    for sigma_rel, reference in zip(SIGMA_RELS, references):
        assert_close_to(ema.ema_tensors(sigma_rel), reference.state)


@pytest.mark.parametrize("flatten_model", [False, True])
def test_parameters_replaced_straight_in_the_modules_dicts_are_followed(flatten_model):
    # What FSDP2's fully_shard does to every parameter: `module._parameters[name] = new`, which no hook sees.
    torch.manual_seed(0)
    model = ToyNet()
    ema = PostHocEMA(model, SIGMA_RELS, flatten_model=flatten_model)
    references = [ReferencePowerEMA(reference_gamma(s)) for s in SIGMA_RELS]
    live_reference_run(model, ema, 3, references)
    for module in model.modules():
        for key, parameter in list(module._parameters.items()):
            module._parameters[key] = nn.Parameter(parameter.detach() + 1.0, parameter.requires_grad)
    live_reference_run(model, ema, 3, references, start=3, seed=1)
    for sigma_rel, reference in zip(SIGMA_RELS, references):
        assert_close_to(ema.ema_tensors(sigma_rel), reference.state)


def test_a_memory_layout_or_device_change_after_construction_raises_and_a_dtype_change_is_followed():
    torch.manual_seed(0)
    model = ConvNet()
    ema = PostHocEMA(model, SIGMA_RELS)
    ema.update()
    model.to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"conv\.weight changed shape, memory layout or device"):
        ema.update()
    model = ToyNet()
    ema = PostHocEMA(model, SIGMA_RELS)
    references = [ReferencePowerEMA(reference_gamma(s)) for s in SIGMA_RELS]
    live_reference_run(model, ema, 3, references)
    model.double()
    live_reference_run(model.float(), ema, 3, references, start=3)
    for sigma_rel, reference in zip(SIGMA_RELS, references):
        assert_close_to(ema.ema_tensors(sigma_rel), reference.state)
    model.to("meta")
    with pytest.raises(RuntimeError, match="memory layout or device"):
        ema.update()


def test_channels_last_models_built_so_are_averaged_in_their_memory_order():
    torch.manual_seed(0)
    model = ConvNet().to(memory_format=torch.channels_last)
    ema = PostHocEMA(model, SIGMA_RELS)
    references = [ReferencePowerEMA(reference_gamma(s)) for s in SIGMA_RELS]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(0)
    tracked = expected_tracked(model)
    for step in range(1, 7):
        model(torch.randn(2, 3, 5, 5, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        for reference in references:
            reference.update(tracked, step)
    assert model.conv.weight.stride() != model.conv.weight.contiguous().stride()
    for sigma_rel, reference in zip(SIGMA_RELS, references):
        assert_close_to(ema.ema_tensors(sigma_rel), reference.state)


def test_flatten_model_packs_the_tracked_tensors_into_one_buffer():
    model = ToyNet()
    ema = PostHocEMA(model, SIGMA_RELS, flatten_model=True)
    (stacked,) = ema._stacks.stacked
    pieces = [piece for _, model_pieces, _, _ in stacked.batches for piece in model_pieces]
    assert len(pieces) == 1  # one read of one buffer
    storages = {model.body[0].weight.untyped_storage().data_ptr(), model.head.bias.untyped_storage().data_ptr()}
    assert storages == {pieces[0].untyped_storage().data_ptr()}


def test_stacked_step_refuses_pieces_that_are_not_consecutive():
    from fastema.core.steps import StackedStep

    with pytest.raises(ValueError, match="consecutive"):
        StackedStep(torch.zeros(2, 10), [torch.ones(3), torch.ones(3)], [0, 4], fused=True)


# ---- snapshots and synthesis ---------------------------------------------------------------------------


def recorded_run(tmp_path, steps=40, snapshot_every=8, **options):
    torch.manual_seed(0)
    model = ToyNet().double()
    ema = PostHocEMA(model, SIGMA_RELS, snapshot_every=snapshot_every, snapshot_dir=tmp_path, **options)
    references = [ReferencePowerEMA(reference_gamma(s)) for s in SIGMA_RELS]
    reference_snapshots = []  # (step, gamma, state) from the float64 references, at the same steps

    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.5)
    tracked = expected_tracked(model)
    for step in range(1, steps + 1):
        model(torch.randn(8, 8, generator=generator, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        for reference in references:
            reference.update(tracked, step)
            if step % snapshot_every == 0:
                reference_snapshots.append((step, reference.gamma, {k: v.clone() for k, v in reference.state.items()}))
    return model, ema, reference_snapshots


@pytest.mark.parametrize("sigma_rel,step", [(0.07, None), (0.12, 24), (0.03, 40)])
def test_synthesis_equals_a_float64_solve_over_the_reference_snapshots(tmp_path, sigma_rel, step):
    _, _, reference_snapshots = recorded_run(tmp_path)
    target_step = step or 40
    used = [(t, g, state) for t, g, state in reference_snapshots if t <= target_step]
    x = reference_coefficients(
        [t for t, _, _ in used], [g for _, g, _ in used], target_step, reference_gamma(sigma_rel)
    )
    expected = {name: sum(xi * state[name] for xi, (_, _, state) in zip(x, used)) for name in used[0][2]}
    latest = max(used, key=lambda item: item[0])[2]
    expected.update({name: value for name, value in latest.items() if not value.is_floating_point()})
    synthesized = synthesize(tmp_path, sigma_rel, step=step)
    assert synthesized.keys() == expected.keys()
    assert_close_to(synthesized, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("index", [0, 1])
def test_synthesising_a_tracked_profile_at_a_snapshot_step_returns_that_snapshot(tmp_path, index):
    recorded_run(tmp_path)
    snapshot_file = tmp_path / f"posthoc-step{32:010d}-ema{index}.pt"
    saved = torch.load(snapshot_file, weights_only=True)["tensors"]
    synthesized = synthesize(tmp_path, SIGMA_RELS[index], step=32)
    assert_close_to(synthesized, {name: snapshot(value) for name, value in saved.items()}, rtol=1e-6, atol=1e-8)


def test_snapshots_record_step_gamma_sigma_rel_and_can_be_smaller(tmp_path):
    recorded_run(tmp_path, steps=16, snapshot_dtype=torch.float32)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"posthoc-step{s:010d}-ema{i}.pt" for s in (8, 16) for i in (0, 1)]
    state = torch.load(tmp_path / files[-1], weights_only=True)
    assert state["step"] == 16 and state["sigma_rel"] == 0.10 and state["gamma"] == pytest.approx(reference_gamma(0.10))
    assert state["tensors"]["head.weight"].dtype == torch.float32  # float64 EMA, float32 snapshot
    assert state["tensors"]["body.1.num_batches_tracked"].dtype == torch.int64


def test_resume_mid_run_is_bit_identical(tmp_path):
    def run(directory, interrupt_at=None):
        torch.manual_seed(0)
        model = ToyNet().double()
        options = dict(snapshot_every=6, snapshot_dir=directory, update_every=2)
        ema = PostHocEMA(model, SIGMA_RELS, **options)
        generator = torch.Generator().manual_seed(3)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.5)
        for step in range(1, 21):
            model(torch.randn(8, 8, generator=generator, dtype=torch.float64)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
            if step == interrupt_at:  # between an update and a snapshot: a new process builds a new EMA
                ema.save(tmp_path / "posthoc.pt")
                ema = PostHocEMA(model, SIGMA_RELS, **options)
                ema.load(tmp_path / "posthoc.pt")
        return ema

    straight, resumed = run(tmp_path / "straight"), run(tmp_path / "resumed", interrupt_at=11)
    assert resumed.num_steps == straight.num_steps == 20 and resumed.num_updates == straight.num_updates == 10
    for sigma_rel in SIGMA_RELS:
        for name, value in straight.ema_tensors(sigma_rel).items():
            assert torch.equal(resumed.ema_tensors(sigma_rel)[name], value), name
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir()) and len(names) == 6  # 6, 12, 18
    for name in names:
        first, second = (torch.load(tmp_path / run / name, weights_only=True) for run in ("straight", "resumed"))
        assert first["step"] == second["step"]
        for key, value in first["tensors"].items():
            assert torch.equal(second["tensors"][key], value), (name, key)


def test_bad_snapshot_directories_raise_naming_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        synthesize(tmp_path / "nowhere", 0.05)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no posthoc"):
        synthesize(tmp_path / "empty", 0.05)
    recorded_run(tmp_path / "run", steps=16)
    with pytest.raises(ValueError, match=r"step: 12; .* at steps \[8, 16\]"):
        synthesize(tmp_path / "run", 0.05, step=12)
    with pytest.raises(ValueError, match="sigma_rel"):
        synthesize(tmp_path / "run", 0.3)
    # Another run refuses to write into the directory (before its first snapshot), leaving it as it was.
    before = sorted(path.name for path in (tmp_path / "run").iterdir())
    other = PostHocEMA(ToyNet(n_hidden=4), SIGMA_RELS, snapshot_dir=tmp_path / "run", snapshot_every=2)
    other.update()
    with pytest.raises(ValueError, match="holds snapshots of another training run"):
        other.update()  # step 2: its first snapshot
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == before
    # Snapshots of another run copied in anyway: synthesize refuses to mix them.
    elsewhere = PostHocEMA(ToyNet(), SIGMA_RELS, snapshot_dir=tmp_path / "elsewhere")
    for _ in range(24):
        elsewhere.update()
    (written,) = [path for path in elsewhere.snapshot() if path.name.endswith("ema0.pt")]
    shutil.copy(written, tmp_path / "run" / written.name)
    with pytest.raises(ValueError, match="mixes snapshots of different training runs"):
        synthesize(tmp_path / "run", 0.05)
    # The same run but another model (a file edited by hand): refused too.
    edited = torch.load(written, weights_only=True)
    edited["run"] = torch.load(tmp_path / "run" / before[0], weights_only=True)["run"]
    edited["layout"] = edited["layout"][:-1]
    torch.save(edited, tmp_path / "run" / written.name)
    with pytest.raises(ValueError, match="mixes snapshots of different models"):
        synthesize(tmp_path / "run", 0.05)
    damaged = tmp_path / "damaged"
    recorded_run(damaged, steps=8)
    bad = damaged / f"posthoc-step{8:010d}-ema1.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=f"Cannot read checkpoint {bad}"):
        synthesize(damaged, 0.05)


def test_a_snapshot_needs_an_update_first(tmp_path):
    ema = PostHocEMA(ToyNet(), SIGMA_RELS, snapshot_dir=tmp_path / "never", update_every=4)
    with pytest.raises(RuntimeError, match="before the first update"):
        ema.snapshot()
    assert not (tmp_path / "never").exists()


def test_snapshot_between_updates_is_labelled_with_the_last_update(tmp_path):
    torch.manual_seed(0)
    model = ToyNet()
    ema = PostHocEMA(model, SIGMA_RELS, snapshot_dir=tmp_path, update_every=4)
    references = [ReferencePowerEMA(reference_gamma(s), update_every=4) for s in SIGMA_RELS]
    live_reference_run(model, ema, 10, references)
    paths = ema.snapshot()  # 10 steps, the last update at step 8
    assert [path.name for path in paths] == [f"posthoc-step{8:010d}-ema{i}.pt" for i in (0, 1)]
    assert ema.last_snapshot_step == ema.last_update_step == 8
    for sigma_rel, reference in zip(SIGMA_RELS, references):  # a tracked width synthesizes to itself
        assert_close_to(synthesize(tmp_path, sigma_rel), reference.state)


def test_a_snapshot_file_claiming_step_0_is_refused_by_name(tmp_path):
    recorded_run(tmp_path, steps=8)
    path = tmp_path / f"posthoc-step{8:010d}-ema0.pt"
    state = torch.load(path, weights_only=True)
    state["step"] = 0
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"Invalid snapshot {path}: its step 0"):
        synthesize(tmp_path, 0.07)


def test_synthesis_of_float32_snapshots_sums_in_float64(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.add_(1000.0)  # large values: a float32 sum of many terms would lose the last digits
    ema = PostHocEMA(model, SIGMA_RELS, snapshot_every=2, snapshot_dir=tmp_path)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        with torch.no_grad():
            model.weight.add_(torch.randn(64, 64, generator=generator))
        ema.update()
    headers = sorted((torch.load(p, weights_only=True) for p in tmp_path.iterdir()), key=lambda s: s["step"])
    x = reference_coefficients([h["step"] for h in headers], [h["gamma"] for h in headers], 60, reference_gamma(0.01))
    assert np.abs(x).sum() > 20  # large alternating coefficients
    expected = sum(c * h["tensors"]["weight"].double() for c, h in zip(x, headers)).float()
    synthesized = synthesize(tmp_path, 0.01)["weight"]
    assert synthesized.dtype == torch.float32
    ulp = torch.finfo(torch.float32).eps * expected.abs()
    assert ((synthesized - expected).abs() <= 2 * ulp).all()


def test_complex_parameters_are_synthesized_not_copied(tmp_path):
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.real = nn.Parameter(torch.zeros(3))
            self.complex = nn.Parameter(torch.zeros(3, dtype=torch.complex64))

    model = Complex()
    ema = PostHocEMA(model, SIGMA_RELS, snapshot_every=5, snapshot_dir=tmp_path)
    for step in range(1, 21):
        with torch.no_grad():
            model.real.fill_(step)
            model.complex.fill_(complex(step, step))
        ema.update()
    for sigma_rel in SIGMA_RELS:  # a tracked width is recovered: each EMA's own value, complex included
        synthesized = synthesize(tmp_path, sigma_rel)
        expected = ema.ema_tensors(sigma_rel)
        torch.testing.assert_close(synthesized["complex"], expected["complex"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(synthesized["real"], expected["real"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(ema.ema_tensors(0.05)["complex"], ema.ema_tensors(0.10)["complex"])


def test_only_rank_0_writes_snapshots(tmp_path, monkeypatch):
    from fastema.posthoc import averager as posthoc

    ema = PostHocEMA(ToyNet(), SIGMA_RELS, snapshot_dir=tmp_path)
    ema.update()
    monkeypatch.setattr(posthoc, "rank", lambda: 1)
    paths = ema.snapshot()
    assert [path.name for path in paths] == [f"posthoc-step{1:010d}-ema{i}.pt" for i in (0, 1)]
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(posthoc, "rank", lambda: 0)
    assert [path.exists() for path in ema.snapshot()] == [True, True]


KILLED_SNAPSHOT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from fastema.posthoc import PostHocEMA
    from helpers import ToyNet

    torch.manual_seed(0)
    ema = PostHocEMA(ToyNet(), (0.05, 0.10), snapshot_dir={path!r})
    ema.update()
    ema.snapshot()                          # complete snapshots at step 1
    hang_mid_write()                        # the next write: half a file, then we get killed
    ema.update()
    ema.snapshot()
    """
)


def test_a_snapshot_killed_mid_write_leaves_the_directory_usable(tmp_path):
    script = KILLED_SNAPSHOT.format(tests=str(Path(__file__).parent), path=str(tmp_path))
    kill_while_writing(script)
    assert list(tmp_path.glob(".posthoc-step*.tmp"))  # the half-written temporary
    synthesized = synthesize(tmp_path, 0.07)  # from the complete step-1 snapshots
    torch.manual_seed(0)
    model = ToyNet()
    for name, value in synthesized.items():  # nothing has moved: every EMA is still the model
        assert torch.allclose(value, dict(model.state_dict())[name].to(value.dtype), atol=1e-6), name


def test_state_dict_checks_everything_before_writing(tmp_path):
    ema = PostHocEMA(ToyNet(), SIGMA_RELS)
    ema.update()
    state = ema.state_dict()
    before = {k: v.clone() for k, v in ema.ema_tensors(0.05).items()}
    other = PostHocEMA(ToyNet(n_hidden=4), SIGMA_RELS)
    with pytest.raises(ValueError, match="nothing was loaded"):
        other.load_state_dict(state)
    wrong = PostHocEMA(ToyNet(), (0.05, 0.15))
    wrong_before = {k: v.clone() for k, v in wrong.ema_tensors(0.05).items()}
    with pytest.raises(ValueError, match="sigma_rels"):
        wrong.load_state_dict(state)
    for name, value in wrong.ema_tensors(0.05).items():
        assert torch.equal(value, wrong_before[name]), name  # the refused load wrote nothing
    for name, value in ema.ema_tensors(0.05).items():
        assert torch.equal(value, before[name])
    target = PostHocEMA(ToyNet(), SIGMA_RELS)
    target_before = {k: v.clone() for k, v in target.ema_tensors(0.10).items()}
    for change, match in [
        (dict(update_every=2), "update_every"),
        (dict(snapshot_every=8), "snapshot_every"),
        (dict(run=None), "'run'"),
        (dict(emas=[{**state["emas"][0], "extra": torch.zeros(1)}, state["emas"][1]]), "unexpected keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict({**state, **change})
        for name, value in target.ema_tensors(0.10).items():
            assert torch.equal(value, target_before[name]), (match, name)
    assert target.num_steps == 0
    target.load_state_dict(state)
    assert target.run_id == ema.run_id and target.num_steps == 1  # the same run continues


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(sigma_rels=()), TypeError, "sigma_rels"),
        (dict(sigma_rels=(0.05, 0.05)), ValueError, "sigma_rels"),
        (dict(snapshot_every=10), ValueError, "snapshot_dir"),
        (dict(snapshot_every=0, snapshot_dir="x"), ValueError, "snapshot_every"),
        (dict(snapshot_every=5, snapshot_dir="x", update_every=2), ValueError, "snapshot_every"),
        (dict(snapshot_dtype=torch.int8), ValueError, "snapshot_dtype"),
        (dict(device="cpu"), ValueError, "device"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, name):
    with pytest.raises(error, match=name):
        PostHocEMA(nn.Linear(2, 2), **kwargs)


# ---- fastai --------------------------------------------------------------------------------------------


class PowerReference:
    """Wraps the optimizer's step (tests only): float64 power EMAs over the steps that really happened."""

    def __init__(self, learn, sigma_rels):
        self.references = [ReferencePowerEMA(reference_gamma(s)) for s in sigma_rels]
        self.steps = 0
        original = learn.opt.step

        def counting_step(*args, **kwargs):
            original(*args, **kwargs)
            self.steps += 1
            for reference in self.references:
                reference.update(expected_tracked(learn.model), self.steps)

        learn.opt.step = counting_step


@pytest.mark.filterwarnings("ignore:load_learner` uses Python's insecure pickle:UserWarning")
def test_fastai_callback_tracks_the_power_emas_over_real_optimizer_steps_and_snapshots_each_epoch(tmp_path):
    from fastai.callback.training import GradientAccumulation

    from fastema import PostHocEMACallback
    from helpers import make_learner

    callback = PostHocEMACallback(SIGMA_RELS, snapshot_dir="snapshots")
    learn = make_learner(cbs=[callback, GradientAccumulation(n_acc=16)], path=tmp_path)  # a step every 2 batches
    learn.create_opt()
    reference = PowerReference(learn, SIGMA_RELS)
    learn.fit(2)
    assert reference.steps == 8 == callback.engine.num_updates
    for sigma_rel, expected in zip(SIGMA_RELS, reference.references):
        assert_close_to(callback.engine.ema_tensors(sigma_rel), expected.state)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        f"posthoc-step{s:010d}-ema{i}.pt" for s in (4, 8) for i in (0, 1)
    ]
    assert learn.posthoc_ema is callback.engine
    learn.export("export.pkl")  # for inference: the K EMAs stay behind
    from fastai.learner import load_learner

    assert not hasattr(load_learner(tmp_path / "export.pkl"), "posthoc_ema")
    assert learn.posthoc_ema is callback.engine


def test_fastai_validation_with_a_tracked_ema_and_the_sweep(tmp_path):
    from fastema import PostHocEMACallback
    from helpers import make_learner
    from test_callback import evaluate

    callback = PostHocEMACallback(SIGMA_RELS, snapshot_every=4, validate_sigma_rel=0.10)
    learn = make_learner(cbs=[callback], path=tmp_path, lr=0.2)
    learn.fit(2)
    ema_loss, _ = evaluate(callback.engine.module_for(0.10), learn.dls)
    assert learn.recorder.values[-1][1] == pytest.approx(ema_loss, rel=1e-5)  # validated with the tracked EMA

    own = {name: value.clone() for name, value in learn.model.state_dict().items()}
    rows = learn.posthoc_sweep([0.03, 0.07, 0.12], plot=tmp_path / "sweep.png")
    assert [row["sigma_rel"] for row in rows] == [0.03, 0.07, 0.12]
    for row in rows:  # each validation used the synthesized EMA: check against it loaded into a fresh model
        model = make_learner().model
        model.load_state_dict(synthesize(tmp_path / "posthoc", row["sigma_rel"]), strict=False)
        model.frozen.load_state_dict(learn.model.frozen.state_dict())  # untracked: the model's own
        assert row["valid_loss"] == pytest.approx(evaluate(model, learn.dls)[0], rel=1e-5)
        assert set(row) == {"sigma_rel", "valid_loss", "accuracy"}
    assert len({row["valid_loss"] for row in rows}) == 3
    for name, value in learn.model.state_dict().items():
        assert torch.equal(value, own[name]), name  # the model's weights back, bit for bit
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fastai_resume_with_start_epoch_is_bit_identical(tmp_path):
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.tracker import SaveModelCallback

    from fastema import PostHocEMACallback
    from helpers import make_learner

    class StopAfter(Callback):
        order = SaveModelCallback.order + 1

        def after_epoch(self):
            if self.epoch == 1:
                raise CancelFitException

    def learner(directory, extra=(), seed=0):
        callback = PostHocEMACallback(SIGMA_RELS, snapshot_every=4, snapshot_dir=directory, start=1)
        return make_learner(cbs=[callback, *extra], path=tmp_path, seed=seed, lr=0.1), callback

    straight, straight_callback = learner("straight")
    straight.fit(4)
    first, _ = learner("resumed", [SaveModelCallback(fname="epoch", every_epoch=True, with_opt=True), StopAfter()])
    first.fit(4)
    resumed, resumed_callback = learner("resumed", seed=1)
    resumed.load("epoch_1", with_opt=True)
    resumed.fit(4, start_epoch=2)
    for sigma_rel in SIGMA_RELS:
        for name, value in straight_callback.engine.ema_tensors(sigma_rel).items():
            assert torch.equal(resumed_callback.engine.ema_tensors(sigma_rel)[name], value), name
    assert resumed_callback.engine.num_steps == straight_callback.engine.num_steps == 24
    straight_files = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert straight_files == sorted(p.name for p in (tmp_path / "resumed").iterdir())


def test_fastai_a_second_fit_into_the_same_directory_is_refused_before_training(tmp_path):
    from fastema import PostHocEMACallback
    from helpers import make_learner

    learn = make_learner(cbs=[PostHocEMACallback(SIGMA_RELS)], path=tmp_path)
    learn.fit(1)
    own = {name: value.clone() for name, value in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match="holds snapshots of another training run"):
        learn.fit(1)
    for name, value in learn.model.state_dict().items():
        assert torch.equal(value, own[name]), name  # refused before any step


def test_fastai_the_end_of_fit_is_always_a_snapshot_and_update_every_labels_it(tmp_path):
    from fastema import PostHocEMACallback
    from helpers import make_learner

    callback = PostHocEMACallback(SIGMA_RELS, snapshot_every=6, update_every=2)
    learn = make_learner(cbs=[callback], path=tmp_path)  # 8 steps per epoch
    learn.create_opt()
    reference = PowerReference(learn, SIGMA_RELS)
    for expected in reference.references:
        expected.update_every = 2
    learn.fit(2)
    steps = sorted({int(p.name[12:22]) for p in (tmp_path / "posthoc").iterdir()})
    assert steps == [6, 12, 16]  # every 6 steps, and the last step
    for sigma_rel, expected in zip(SIGMA_RELS, reference.references):
        assert_close_to(synthesize(tmp_path / "posthoc", sigma_rel), expected.state)


def test_fastai_sweep_names_metrics_as_validate_returns_them_and_restores_on_error(tmp_path):
    from fastai.learner import Recorder

    from fastema import PostHocEMACallback
    from helpers import make_learner

    learn = make_learner(cbs=[PostHocEMACallback(SIGMA_RELS, all_buffers=True)], path=tmp_path)
    learn.fit(1)
    fresh = make_learner(path=tmp_path)  # another process, say: never fit, no recorder names
    fresh.model.load_state_dict(learn.model.state_dict())
    fresh.recorder.train_metrics, fresh.recorder.add_time = True, False
    rows = fresh.posthoc_sweep([0.07], snapshot_dir=tmp_path / "posthoc")
    assert set(rows[0]) == {"sigma_rel", "valid_loss", "accuracy"}
    assert 0 <= rows[0]["accuracy"] <= 1 and rows[0]["valid_loss"] > 0 and isinstance(fresh.recorder, Recorder)
    assert "calls" in synthesize(tmp_path / "posthoc", 0.07)  # a non-persistent buffer, swept too

    own = {name: value.clone() for name, value in learn.model.state_dict().items()}
    calls = learn.model.calls.clone()

    def failing_validate(*args, **kwargs):
        raise RuntimeError("validation failed")

    learn.validate = failing_validate
    with pytest.raises(RuntimeError, match="validation failed"):
        learn.posthoc_sweep([0.07])
    for name, value in learn.model.state_dict().items():
        assert torch.equal(value, own[name]), name  # restored although validation raised
    assert torch.equal(learn.model.calls, calls)


def test_fastai_validate_ema_read_at_each_validation(tmp_path):
    from fastema import EMACallback
    from helpers import make_learner
    from test_callback import evaluate

    callback = EMACallback(decay=0.5)
    learn = make_learner(cbs=[callback], path=tmp_path, lr=0.2)
    callback.validate_ema = False  # changed after construction: validation uses the model's weights
    learn.fit(1)
    assert learn.recorder.values[-1][1] == pytest.approx(evaluate(learn.model, learn.dls)[0], rel=1e-5)
    assert learn.recorder.values[-1][1] != pytest.approx(evaluate(callback.engine.module, learn.dls)[0], rel=1e-5)


def test_fastai_checking_a_checkpoint_leaves_a_flattened_model_where_it_is(tmp_path):
    from fastema import PostHocEMACallback
    from helpers import make_learner

    callback = PostHocEMACallback(SIGMA_RELS, flatten_model=True)
    learn = make_learner(cbs=[callback], path=tmp_path)
    learn.fit(1)
    learn.save("end")
    state = torch.load(tmp_path / "models" / "end.ema.pth", weights_only=True)
    fresh_callback = PostHocEMACallback(SIGMA_RELS, flatten_model=True)
    fresh = make_learner(cbs=[fresh_callback], path=tmp_path)
    addresses = [p.data_ptr() for p in fresh.model.parameters()]
    fresh_callback.check_ema_checkpoint(state, "end.ema.pth")
    assert [p.data_ptr() for p in fresh.model.parameters()] == addresses


def test_command_line_writes_one_state_dict_per_sigma_rel(tmp_path, capsys):
    from fastema.__main__ import main

    recorded_run(tmp_path / "snapshots", steps=16)
    main(
        [
            "posthoc",
            str(tmp_path / "snapshots"),
            "--sigma-rel",
            "0.05,0.08",
            "--step",
            "8",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    printed = capsys.readouterr().out
    for sigma_rel in (0.05, 0.08):
        path = tmp_path / "out" / f"posthoc-sigma{sigma_rel:g}-step8.pt"
        assert str(path) in printed
        written = torch.load(path, weights_only=True)
        for name, value in synthesize(tmp_path / "snapshots", sigma_rel, step=8).items():
            assert torch.equal(written[name], value), name
    with pytest.raises(SystemExit, match="sigma-rel"):
        main(["posthoc", str(tmp_path / "snapshots"), "--sigma-rel", "wide", "--out", str(tmp_path / "out")])


def test_posthoc_demo_prints_the_sweep_and_writes_its_plot(tmp_path, capsys):
    from fastema.__main__ import main

    main(["demo", "--posthoc", "--epochs", "2", "--output", str(tmp_path / "demo.png")])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.strip()[:1] == "0" and line.count("|") == 2]
    assert len(rows) == 10  # the whole sweep, one row per sigma_rel
    losses = [float(row.split("|")[1]) for row in rows]
    assert len(set(losses)) == 10  # ten different EMAs
    assert (tmp_path / "demo-posthoc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
