"""Checkpoints: atomic files, clear errors that change nothing, and exact resumption mid-schedule."""

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.learner import load_model

from fastema import EMACallback, EMASchedule, InverseGammaWarmup, ModelEMA, PostHocEMACallback
from helpers import ToyNet, kill_while_writing, make_learner
from reference import ReferenceEMA, expected_tracked


def trained_ema(steps=5, decay=0.7, seed=0):
    torch.manual_seed(seed)
    model = ToyNet()
    ema = ModelEMA(model, decay)
    for step in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 8))
        ema.update(decay - 0.01 * step)
    return model, ema


def ema_tensors(ema):
    return {name: t.clone() for name, t in ema.state_dict()["tensors"].items()}


def assert_same_tensors(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# --- ModelEMA files ---------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    _, ema = trained_ema()
    path = ema.save(tmp_path / "ema.pt")
    _, other = trained_ema(steps=2, seed=1)
    other.load(path)
    assert_same_tensors(ema_tensors(other), ema_tensors(ema))
    assert other.num_updates == 5 and other.last_decay == ema.last_decay
    assert not list(tmp_path.glob("*.tmp"))  # no temporary left behind


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_file_raises_naming_it_and_changes_nothing(tmp_path, damage):
    _, ema = trained_ema()
    path = ema.save(tmp_path / "ema.pt")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    _, other = trained_ema(steps=2, seed=1)
    before = ema_tensors(other)
    with pytest.raises(RuntimeError, match=f"Cannot read checkpoint {path}"):
        other.load(path)
    assert_same_tensors(ema_tensors(other), before)
    assert other.num_updates == 2


def test_mismatched_checkpoint_lists_every_problem_and_changes_nothing(tmp_path):
    _, ema = trained_ema()
    state = ema.state_dict()
    state["tensors"] = dict(state["tensors"])
    state["tensors"]["head.weight"] = torch.zeros(5, 5)
    state["tensors"]["body.0.bias"] = state["tensors"]["body.0.bias"].double()
    del state["tensors"]["head.bias"]
    state["tensors"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    before = ema_tensors(ema)
    with pytest.raises(ValueError) as info:
        ema.load(path)
    message = str(info.value)
    for expected in (str(path), "head.weight", "(5, 5)", "body.0.bias", "float64", "head.bias", "extra.weight"):
        assert expected in message
    assert_same_tensors(ema_tensors(ema), before)


def test_missing_file_raises_file_not_found(tmp_path):
    _, ema = trained_ema()
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        ema.load(tmp_path / "nothing.pt")


def test_load_rejects_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "fastema.ModelEMA", "payload": os.system}, path)  # weights_only refuses functions
    _, ema = trained_ema()
    with pytest.raises(RuntimeError, match="weights-only"):
        ema.load(path)


KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from fastema import ModelEMA
    from helpers import ToyNet

    torch.manual_seed(0)
    ema = ModelEMA(ToyNet(), 0.5)
    ema.save({path!r})                     # the previous, complete checkpoint
    with torch.no_grad():
        for tensor in ema.state_dict()["tensors"].values():
            tensor.add_(1)
    hang_mid_write()                        # the next write: half a file, then we get killed
    ema.save({path!r})
    """
)


def test_killed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ema.pt"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    returncode = kill_while_writing(script)
    assert returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".ema.pt.*.tmp"))  # the half-written temporary the kill left
    torch.manual_seed(0)
    expected = ModelEMA(ToyNet(), 0.5)  # the same construction as the first, complete save
    loaded = ModelEMA(ToyNet(), 0.5)
    loaded.load(path)
    assert_same_tensors(ema_tensors(loaded), ema_tensors(expected))
    loaded.save(path)  # the next save cleans up after the killed writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.pt"]


def test_save_leaves_another_live_writers_temporary_alone(tmp_path):
    path = tmp_path / "ema.pt"
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that no process has any more
    dead_pid.wait()
    live = tmp_path / f".ema.pt.{socket.gethostname()}.{os.getpid()}.0badc0de.tmp"  # this (live) process's
    # Another machine's, from a pid that is dead here: it may well be alive there.
    elsewhere = tmp_path / f".ema.pt.another-host.{dead_pid.pid}.0badc0de.tmp"
    abandoned = tmp_path / f".ema.pt.{socket.gethostname()}.{dead_pid.pid}.0badc0de.tmp"
    for temporary in (live, elsewhere, abandoned):
        temporary.write_bytes(b"in progress")
    trained_ema()[1].save(path)
    assert live.exists() and elsewhere.exists() and not abandoned.exists()


def test_save_writes_through_a_symlink_as_torch_save_does(tmp_path):
    target = tmp_path / "runs" / "ema-final.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "ema.pt"
    link.symlink_to(target)
    _, ema = trained_ema()
    ema.save(link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    loaded = trained_ema(steps=1, seed=1)[1]
    loaded.load(target)
    assert_same_tensors(ema_tensors(loaded), ema_tensors(ema))


def test_files_get_the_permissions_of_a_plain_torch_save(tmp_path):
    old_umask = os.umask(0o022)
    try:
        ema_path = trained_ema()[1].save(tmp_path / "ema.pt")
        learn = make_learner(path=tmp_path)  # a Learner without an EMA: Learner.save is patched for it too
        model_path = learn.save("plain")
        torch.save({}, tmp_path / "reference.pt")
        expected = stat.S_IMODE((tmp_path / "reference.pt").stat().st_mode)
        assert expected == 0o644
        assert stat.S_IMODE(ema_path.stat().st_mode) == stat.S_IMODE(model_path.stat().st_mode) == expected
        os.chmod(ema_path, 0o640)  # an existing file keeps its mode, as torch.save over it would
        trained_ema()[1].save(ema_path)
        assert stat.S_IMODE(ema_path.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_an_unwritable_target_is_named_in_the_error(tmp_path, monkeypatch):
    from fastema.core import checkpoint

    real_open = os.open

    def refusing_open(path, flags, *args):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint.os, "open", refusing_open)
    with pytest.raises(PermissionError, match=r"Cannot write checkpoint .*ema\.pt: Permission denied") as info:
        trained_ema()[1].save(tmp_path / "ema.pt")
    assert ".tmp" not in str(info.value)


@pytest.mark.cuda
def test_checkpoint_made_on_cuda_loads_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = ToyNet().cuda()
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        model.head.weight.add_(1)
    ema.update()
    ema.save(tmp_path / "ema.pt")
    cpu = ModelEMA(ToyNet(), 0.5)
    cpu.load(tmp_path / "ema.pt")
    assert_same_tensors(ema_tensors(cpu), {k: v.cpu() for k, v in ema_tensors(ema).items()})


@pytest.mark.cuda
def test_checkpoint_made_with_an_offloaded_ema_loads_beside_a_cuda_model_and_back(tmp_path):
    _, ema = trained_ema()
    offloaded = ModelEMA(ToyNet().cuda(), 0.7, device="cpu")  # a CUDA model with its EMA in host memory
    offloaded.load_state_dict(ema.state_dict())
    offloaded.save(tmp_path / "offloaded.pt")
    beside = ModelEMA(ToyNet().cuda(), 0.7)  # the EMA on the GPU, beside the model
    beside.load(tmp_path / "offloaded.pt")
    assert all(t.device.type == "cuda" for t in beside.state_dict()["tensors"].values())
    assert_same_tensors({k: v.cpu() for k, v in ema_tensors(beside).items()}, ema_tensors(ema))
    beside.save(tmp_path / "beside.pt")
    offloaded.load(tmp_path / "beside.pt")
    assert_same_tensors(ema_tensors(offloaded), ema_tensors(ema))


# --- fastai: learn.save / learn.load and SaveModelCallback ------------------------------------------


def test_learn_save_writes_a_sibling_file_and_load_restores_model_ema(tmp_path):
    learn = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path)
    learn.fit(2)
    saved_ema = {k: v.clone() for k, v in learn.model_ema.state_dict().items()}
    model_file = learn.save("run")
    assert model_file == tmp_path / "models" / "run.pth" and (tmp_path / "models" / "run.ema.pth").is_file()

    # The model file is exactly fastai's format: plain fastai (no EMA callback) loads it.
    plain = make_learner(path=tmp_path, seed=1)
    plain.create_opt()
    load_model(model_file, plain.model, plain.opt)
    for name, value in learn.model.state_dict().items():
        assert torch.equal(plain.model.state_dict()[name], value), name

    fresh = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, seed=1)
    fresh.load("run")
    assert_same_tensors(dict(fresh.model_ema.state_dict()), saved_ema)
    assert fresh.ema.engine.num_updates == learn.ema.engine.num_updates == 16


def test_learn_load_with_a_damaged_ema_file_changes_nothing(tmp_path):
    learn = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path)
    learn.fit(1)
    learn.save("run")
    ema_file = tmp_path / "models" / "run.ema.pth"
    ema_file.write_bytes(ema_file.read_bytes()[:100])
    fresh = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, seed=1)
    model_before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"run\.ema\.pth"):
        fresh.load("run")
    assert_same_tensors(dict(fresh.model.state_dict()), model_before)
    assert not hasattr(fresh, "model_ema")


def test_learn_load_with_an_ema_of_another_model_changes_nothing(tmp_path):
    learn = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path)
    learn.fit(1)
    learn.save("run")
    other = ModelEMA(ToyNet(n_hidden=4)).state_dict()  # another model: other shapes, one name it lacks
    other["tensors"]["extra.weight"] = torch.zeros(1)
    for engine, problem in (
        (other, r"unexpected keys \['extra.weight'\]; body.0.weight: shape \(4, 8\) != \(16, 8\)"),
        (other | {"tensors": {}}, "holds no EMA tensors"),
    ):
        torch.save(learn.ema.ema_checkpoint() | {"engine": engine}, tmp_path / "models" / "run.ema.pth")
        fresh = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, seed=1)
        model_before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
        with pytest.raises(ValueError, match="run.ema.pth: .*" + problem):
            fresh.load("run")
        assert_same_tensors(dict(fresh.model.state_dict()), model_before)
        assert not hasattr(fresh, "model_ema")


def test_learn_load_refuses_an_ema_saved_with_another_update_every_and_changes_nothing(tmp_path):
    learn = make_learner(cbs=[EMACallback(decay=0.9, update_every=4)], path=tmp_path)
    learn.fit(1)
    learn.save("run")
    fresh = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, seed=1)
    model_before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"run\.ema\.pth: .*update_every 4 != 1"):
        fresh.load("run")
    assert_same_tensors(dict(fresh.model.state_dict()), model_before)
    assert not hasattr(fresh, "model_ema")


def test_a_checkpoint_saved_unfrozen_loads_into_a_frozen_learner_and_resumes(tmp_path):
    from fastai.torch_core import params

    splitter = lambda m: [params(m.body) + params(m.frozen), params(m.head)]  # noqa: E731
    learn = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, splitter=splitter)
    learn.fine_tune(1, freeze_epochs=1)  # ends unfrozen: the EMA tracks the body too
    learn.save("tuned")
    frozen = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, splitter=splitter, seed=1)
    frozen.freeze()  # as vision_learner starts
    frozen.load("tuned")
    assert_same_tensors(dict(frozen.model_ema.state_dict()), dict(learn.model_ema.state_dict()))
    assert sorted(frozen.ema.engine.tensor_names) == sorted(learn.ema.engine.tensor_names)
    frozen.fit(2, start_epoch=1)  # continues the loaded EMA, with the tensors it tracked
    assert frozen.ema.engine.num_updates == learn.ema.engine.num_updates + N_ITER_RESUMED
    assert "body.0.weight" in frozen.ema.engine.tensor_names


N_ITER_RESUMED = 8  # one epoch of make_learner's 64 samples in batches of 8


def test_learn_load_refuses_an_ema_file_written_by_another_save(tmp_path):
    learn = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path)
    learn.fit(1)
    model_file = learn.save("run")
    first_model = model_file.read_bytes()
    learn.fit(1)
    learn.save("run")
    model_file.write_bytes(first_model)  # as if the second save crashed after its EMA file, before its model file
    fresh = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, seed=1)
    model_before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"run\.ema\.pth: it was not written by the save that wrote .*run\.pth"):
        fresh.load("run")
    assert_same_tensors(dict(fresh.model.state_dict()), model_before)
    assert not hasattr(fresh, "model_ema")
    learn.save("run")  # a complete pair loads
    fresh.load("run")
    assert_same_tensors(dict(fresh.model_ema.state_dict()), dict(learn.model_ema.state_dict()))


def test_save_model_callback_keeps_the_best_ema_model(tmp_path):
    class EMALossAtEachEpoch(Callback):
        order = SaveModelCallback.order - 1

        def after_epoch(self):
            self.snapshots = getattr(self, "snapshots", [])
            self.snapshots.append({k: v.clone() for k, v in self.learn.ema.engine.module.state_dict().items()})

    spy = EMALossAtEachEpoch()
    # "Best" = highest loss (comp=np.greater): an early epoch, which the last EMA cannot impersonate.
    saver = SaveModelCallback(monitor="valid_loss", fname="best", comp=np.greater)
    learn = make_learner(cbs=[EMACallback(decay=0.8), spy, saver], path=tmp_path, lr=0.5)
    learn.fit(5)
    # validate_ema=True: the monitored valid_loss is the EMA's, so "best" is the best EMA model.
    losses = [row[1] for row in learn.recorder.values]
    best_epoch = max(range(5), key=losses.__getitem__)
    assert best_epoch != 4  # so the final EMA would not pass for the best one
    assert_same_tensors(dict(learn.model_ema.state_dict()), spy.snapshots[best_epoch])


class StopAfterEpoch(Callback):
    order = SaveModelCallback.order + 1  # after the epoch's checkpoint was written

    def __init__(self, epoch):
        self.stop_epoch = epoch

    def after_epoch(self):
        if self.epoch == self.stop_epoch:
            raise CancelFitException


class UpdateLog(Callback):
    """(global step, decay, update count) after every EMA update."""

    order = EMACallback.order + 1

    def __init__(self):
        self.rows = []

    def after_batch(self):
        callback = self.learn.ema if hasattr(self.learn, "ema") else self.learn.ema_schedule
        if self.training and callback.engine is not None and callback._started:
            self.rows.append((self.epoch * self.n_iter + self.iter, callback.decay, callback.engine.num_updates))


RESUME_CASES = [
    # (callback factory, with gradient accumulation, fit method)
    pytest.param(lambda: EMASchedule(0.5, 0.99, start=1, finish=4), False, "fit", id="int-start-finish-fit"),
    pytest.param(lambda: EMASchedule(0.5, 0.99, start=0.1, finish=0.6), False, "fit_one_cycle", id="float-one-cycle"),
    pytest.param(lambda: EMASchedule(0.5, 0.99, start=1, finish=4), True, "fit_one_cycle", id="int-grad-accum"),
    pytest.param(lambda: EMASchedule(0.5, 0.99, start=0.1, finish=0.6), True, "fit", id="float-grad-accum"),
    pytest.param(
        lambda: EMASchedule(final_decay=0.99, start=1, schedule=InverseGammaWarmup(power=0.75), update_every=3),
        False,
        "fit",
        id="warmup-update-every",
    ),
    # Saved before the EMA started: the resumed fit must start it at `start`, not take it as running.
    pytest.param(lambda: EMASchedule(0.5, 0.99, start=4, finish=5), False, "fit", id="saved-before-start"),
]


@pytest.mark.parametrize("make_callback,accumulate,method", RESUME_CASES)
def test_resume_mid_schedule_is_bit_identical(tmp_path, make_callback, accumulate, method):
    n_epochs, stop_after = 6, 2  # interrupted in the middle of the warm-up (finish = epoch 4 / 60% of steps)

    def learner(extra, seed=0):
        cbs = [make_callback(), UpdateLog()] + ([GradientAccumulation(n_acc=16)] if accumulate else []) + extra
        return make_learner(cbs=cbs, path=tmp_path, seed=seed, lr=0.1)

    straight = learner([])
    getattr(straight, method)(n_epochs)

    first = learner([SaveModelCallback(fname="epoch", every_epoch=True, with_opt=True), StopAfterEpoch(stop_after)])
    getattr(first, method)(n_epochs)
    assert first.ema_schedule.decay < 0.99  # the schedule was still in progress

    resumed = learner([], seed=1)  # a fresh process would build everything again; a different seed proves the load
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "No EMA checkpoint ... beside ..."
        resumed.load(f"epoch_{stop_after}", with_opt=True)
    getattr(resumed, method)(n_epochs, start_epoch=stop_after + 1)

    assert_same_tensors(dict(resumed.model_ema.state_dict()), dict(straight.model_ema.state_dict()))
    assert_same_tensors(dict(resumed.model.state_dict()), dict(straight.model.state_dict()))
    straight_log, first_log, resumed_log = (
        x.cbs.filter(lambda cb: isinstance(cb, UpdateLog))[0].rows for x in (straight, first, resumed)
    )
    assert first_log + resumed_log == straight_log  # same steps, decays and update counts
    start_step = {1: 8, 4: 32, 0.1: 5}[straight.ema_schedule.start]  # epoch 1 or 4, or round(0.1 * 48 steps)
    optimizer_steps = [b for b in range(48) if b >= start_step and (not accumulate or b % 2 == 1)]
    update_every = straight.ema_schedule.update_every
    assert straight_log[-1][2] == straight.ema_schedule.engine.num_updates == len(optimizer_steps) // update_every


def test_fresh_fit_after_load_starts_a_new_ema_but_start_epoch_continues(tmp_path):
    learn = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path)
    learn.fit(2)
    learn.save("run")
    fresh = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, seed=1)
    fresh.load("run")
    fresh.fit(1)  # start_epoch=0: a new EMA, as any fit without resume
    assert fresh.ema.engine.num_updates == 8


def test_reference_after_resume(tmp_path):
    """The continued EMA equals the float64 reference started from the saved EMA."""
    learn = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path)
    learn.fit(3, cbs=[StopAfterEpoch(0)])
    learn.save("run")
    resumed = make_learner(cbs=[EMACallback(decay=0.9)], path=tmp_path, seed=1)
    resumed.load("run")
    reference = ReferenceEMA(dict(resumed.model_ema.state_dict()))

    class Follow(Callback):
        order = EMACallback.order + 1

        def after_step(self):
            reference.update(expected_tracked(self.learn.model), 0.9)

    resumed.fit(3, start_epoch=1, cbs=[Follow()])
    assert resumed.ema.engine.num_updates == 24 == 8 + reference.num_updates
    for name, expected in reference.state.items():
        actual = resumed.model_ema.state_dict()[name]
        if expected.is_floating_point():
            torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(actual, expected), name


@pytest.mark.parametrize(
    "make_callback",
    [lambda: EMACallback(decay=0.9), lambda: PostHocEMACallback((0.05, 0.10), validate_sigma_rel=0.05)],
    ids=["EMACallback", "PostHocEMACallback"],
)
def test_save_during_ema_validation_raises_instead_of_writing_swapped_weights(tmp_path, make_callback):
    class SaveWhileValidating(Callback):
        order = EMACallback.order - 1  # its after_validate runs before the EMA callback swaps back

        def after_validate(self):
            try:
                self.learn.save("mid")
            except RuntimeError as error:
                self.error = error

    spy = SaveWhileValidating()
    learn = make_learner(cbs=[make_callback(), spy], path=tmp_path)
    learn.fit(1)
    assert "during EMA validation" in str(spy.error)
    assert not (tmp_path / "models" / "mid.pth").exists()
