"""Post-hoc EMA (EDM2): power-function EMAs against a float64 for-loop, synthesis against a float64 solve
written here, exact resume, and the snapshot directory's errors."""

import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastema.posthoc import PostHocEMA, gamma_to_sigma_rel, sigma_rel_to_gamma, synthesize
from helpers import ConvNet, ToyNet, calls_during
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
    from fastema import _steps

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
    assert len(lerps) == 4 and sum(1 for step in ema._stacked for _ in step.batches) == 1


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
    other = PostHocEMA(ToyNet(n_hidden=4), SIGMA_RELS, snapshot_dir=tmp_path / "run")
    other.num_steps = 24
    other.snapshot()  # another model's snapshots in the same directory
    with pytest.raises(ValueError, match="mixes snapshots of different models"):
        synthesize(tmp_path / "run", 0.05)
    damaged = tmp_path / "damaged"
    recorded_run(damaged, steps=8)
    bad = damaged / f"posthoc-step{8:010d}-ema1.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=f"Cannot read checkpoint {bad}"):
        synthesize(damaged, 0.05)


KILLED_SNAPSHOT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from fastema import checkpoint
    from fastema.posthoc import PostHocEMA
    from helpers import ToyNet

    torch.manual_seed(0)
    ema = PostHocEMA(ToyNet(), (0.05, 0.10), snapshot_dir={path!r})
    ema.num_steps = 8
    ema.snapshot()                          # complete snapshots at step 8
    real_save = torch.save

    def slow_save(obj, stream, **kwargs):   # write half, then hang: the parent kills us mid-write
        real_save(obj, stream, **kwargs)
        stream.truncate(stream.tell() // 2)
        stream.flush()
        print("writing", flush=True)
        time.sleep(60)

    checkpoint.torch.save = slow_save
    ema.num_steps = 16
    ema.snapshot()
    """
)


def test_a_snapshot_killed_mid_write_leaves_the_directory_usable(tmp_path):
    script = KILLED_SNAPSHOT.format(tests=str(Path(__file__).parent), path=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        process.stdout.close()
    assert list(tmp_path.glob(".posthoc-step*.tmp"))  # the half-written temporary
    synthesized = synthesize(tmp_path, 0.07)  # from the complete step-8 snapshots
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
    with pytest.raises(ValueError, match="sigma_rels"):
        wrong.load_state_dict(state)
    for name, value in ema.ema_tensors(0.05).items():
        assert torch.equal(value, before[name])


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
