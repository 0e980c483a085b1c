"""EMACallback and EMASchedule on real fastai Learners, checked against the float64 reference."""

import math
from functools import partial

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import SchedCos, SchedExp, SchedLin, SchedPoly
from fastai.callback.training import GradientAccumulation
from fastai.learner import load_learner

from fastema import EMACallback, EMASchedule
from helpers import assert_state_matches, make_learner
from reference import ReferenceEMA, expected_tracked

N_ITER = 8  # 64 training samples, batch size 8


class StepRecorder(Callback):
    """Wraps the optimizer's step (tests only) to record every step that really happened.

    Runs before the EMA callback, so the EMA's starting point can be snapshotted independently.
    """

    order = -5

    def __init__(self, start_step=0, decay_of_step=None, nested_validation=True):
        self.start_step, self.decay_of_step = start_step, decay_of_step
        self.nested_validation = nested_validation  # False: the lock tells nothing (a test holds it)
        self.steps, self.batches, self.reference = [], 0, None

    def before_fit(self):
        if self.nested_validation and self.learn.lock.locked():  # learn.validate() inside a fit fires before_fit
            return
        self.steps, self.batches, self.reference = [], 0, None
        original_step = self.learn.opt.step

        def counting_step(*args, **kwargs):
            original_step(*args, **kwargs)
            step = self.epoch * self.n_iter + self.iter
            self.steps.append(step)
            if self.reference is not None:
                tracked = expected_tracked(self.learn.model)
                self.reference.update(tracked, self.decay_of_step(step))

        self.learn.opt.step = counting_step

    def before_batch(self):
        if not self.training:
            return
        self.batches += 1
        if self.epoch * self.n_iter + self.iter == self.start_step and self.decay_of_step is not None:
            self.reference = ReferenceEMA(expected_tracked(self.learn.model))

    def after_fit(self):
        if not (self.nested_validation and self.learn.lock.locked()):
            del self.learn.opt.step


def assert_matches_reference(ema_module, reference, rtol=1e-5):
    assert_state_matches(dict(ema_module.state_dict()), reference.state, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("start,start_step", [(0, 0), (1, N_ITER), (0.25, 8)])
def test_ema_matches_reference_and_counts_steps(start, start_step):
    recorder = StepRecorder(start_step, decay_of_step=lambda step: 0.9)
    ema = EMACallback(decay=0.9, start=start)
    learn = make_learner(cbs=[recorder, ema])
    learn.fit(4)  # 32 steps
    real_steps = [s for s in recorder.steps if s >= start_step]
    assert len(recorder.steps) == 32
    assert ema.engine.num_updates == len(real_steps) == recorder.reference.num_updates
    assert_matches_reference(learn.model_ema, recorder.reference)
    assert learn.ema is ema


def test_flatten_model_in_a_learner_matches_reference_and_validates_with_the_ema():
    recorder = StepRecorder(8, decay_of_step=lambda step: 0.9)
    ema = EMACallback(decay=0.9, start=0.25, flatten_model=True)
    learn = make_learner(cbs=[recorder, ema])
    learn.fit(4)
    assert ema.engine.num_updates == 24 == recorder.reference.num_updates
    assert len({p.untyped_storage().data_ptr() for p in learn.model.parameters() if p.requires_grad}) == 1
    assert_matches_reference(learn.model_ema, recorder.reference)
    assert learn.recorder.values[-1][1] == pytest.approx(evaluate(learn.model_ema, learn.dls)[0], rel=1e-5)


def test_gradient_accumulation_updates_once_per_optimizer_step():
    recorder = StepRecorder(0, decay_of_step=lambda step: 0.8)
    ema = EMACallback(decay=0.8)
    learn = make_learner(cbs=[recorder, ema, GradientAccumulation(n_acc=24)])  # a step every 3 batches
    learn.fit(3)
    assert recorder.batches == 24
    assert len(recorder.steps) == 8
    assert ema.engine.num_updates == len(recorder.steps)
    assert_matches_reference(learn.model_ema, recorder.reference)


def test_without_skip_ema_every_batch_updates():
    recorder = StepRecorder()
    ema = EMACallback(decay=0.8, skip_ema=False)
    learn = make_learner(cbs=[recorder, ema, GradientAccumulation(n_acc=24)])
    learn.fit(3)
    assert len(recorder.steps) == 8
    assert ema.engine.num_updates == recorder.batches == 24


class OverflowEveryThirdBatch(Callback):
    """On a CPU machine MixedPrecision disables its CUDA GradScaler: swap in a real CPU GradScaler,
    and force an overflow (an inf gradient) on every third batch so the scaler skips those steps."""

    order = MixedPrecision.order + 1

    def before_fit(self):
        self.learn.scaler = torch.amp.GradScaler("cpu")
        self.forced = 0

    def after_backward(self):
        if self.iter % 3 == 0:
            self.learn.model.head.weight.grad[0, 0] = float("inf")
            self.forced += 1


@pytest.mark.filterwarnings("ignore:CUDA is not available or torch_xla is imported:UserWarning")
@pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available:UserWarning")
@pytest.mark.parametrize("skip_ema", [True, False])
def test_mixed_precision_skipped_steps(skip_ema):
    recorder = StepRecorder(0, decay_of_step=lambda step: 0.9)
    ema = EMACallback(decay=0.9, skip_ema=skip_ema)
    overflow = OverflowEveryThirdBatch()
    learn = make_learner(cbs=[recorder, ema, MixedPrecision(), overflow])
    learn.fit(3)
    assert recorder.batches == 24 and overflow.forced == 9
    assert len(recorder.steps) == 24 - 9, "the grad scaler skips exactly the overflowing steps"
    if skip_ema:
        assert ema.engine.num_updates == len(recorder.steps)
        assert_matches_reference(learn.model_ema, recorder.reference)
    else:
        assert ema.engine.num_updates == recorder.batches


def cosine(start, end, pct):
    return start + (1 + math.cos(math.pi * (1 - pct))) * (end - start) / 2


SCHEDULES = {
    "cos": (SchedCos, cosine),
    "lin": (SchedLin, lambda s, e, p: s + p * (e - s)),
    "exp": (SchedExp, lambda s, e, p: s * (e / s) ** p),
    "poly": (partial(SchedPoly, power=0.5), lambda s, e, p: s + (e - s) * p**0.5),
    "custom": (lambda s, e: lambda p: s + (e - s) * p * p, lambda s, e, p: s + (e - s) * p * p),
}


class DecaySpy(Callback):
    order = EMACallback.order + 1

    def before_fit(self):
        self.decays = []

    def after_step(self):
        self.decays.append((self.epoch * self.n_iter + self.iter, self.learn.ema_schedule.decay))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("start,finish,start_step,finish_step", [(0, 0.5, 0, 16), (1, 3, 8, 24), (0.25, 2, 8, 16)])
def test_schedule_decay_sequence_matches_formula(name, start, finish, start_step, finish_step):
    schedule, formula = SCHEDULES[name]
    start_decay, final_decay = 0.5, 0.99

    def expected_decay(step):
        pct = (step - start_step) / (finish_step - start_step)
        return final_decay if pct >= 1 else formula(start_decay, final_decay, pct)

    spy, recorder = DecaySpy(), StepRecorder(start_step, decay_of_step=expected_decay)
    callback = EMASchedule(start_decay, final_decay, start=start, finish=finish, schedule=schedule)
    learn = make_learner(cbs=[recorder, callback, spy])
    learn.fit(4)
    updates = [(step, decay) for step, decay in spy.decays if step >= start_step]
    assert [step for step, _ in updates] == list(range(start_step, 32))
    for step, decay in updates:
        assert decay == pytest.approx(expected_decay(step), abs=1e-12), step
    assert callback.engine.num_updates == len(updates)
    assert_matches_reference(learn.model_ema, recorder.reference)


class WeightsAroundValidation(Callback):
    """Snapshots the model before the EMA swaps weights in, and after it swaps them back."""

    def __init__(self, order):
        self.order = order
        self.snapshots = []

    def before_validate(self):
        self.snapshots.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})

    def after_validate(self):
        self.snapshots.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})


def evaluate(model, dls):
    model.eval()
    losses, correct, total = [], 0, 0
    with torch.no_grad():
        for x, y in dls.valid:
            out = model(x)
            losses.append(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
    return (sum(losses) / total).item(), correct / total


def test_validation_uses_ema_and_restores_model_bit_identical():
    before, after = WeightsAroundValidation(order=0), WeightsAroundValidation(order=EMACallback.order + 1)
    ema = EMACallback(decay=0.9)
    learn = make_learner(cbs=[ema, before, after])
    learn.fit(2)
    # before.snapshots[2k] is the model before validation k; after.snapshots[2k+1] is it after restoring.
    for k in range(2):
        pre, post = before.snapshots[2 * k], after.snapshots[2 * k + 1]
        for name in pre:
            assert torch.equal(pre[name], post[name]), name
        during = after.snapshots[2 * k]  # inside validation: the model holds the EMA weights
        assert not torch.equal(during["head.weight"], pre["head.weight"])
    valid_loss, accuracy = learn.recorder.values[-1][1], learn.recorder.values[-1][2]
    ema_loss, ema_accuracy = evaluate(learn.model_ema, learn.dls)
    assert valid_loss == pytest.approx(ema_loss, rel=1e-5)
    assert accuracy == pytest.approx(ema_accuracy)
    raw_loss, _ = evaluate(learn.model, learn.dls)
    assert raw_loss != pytest.approx(ema_loss, rel=1e-5)


def test_validate_ema_false_uses_model_weights():
    learn = make_learner(cbs=[EMACallback(decay=0.9, validate_ema=False)])
    learn.fit(1)
    assert learn.recorder.values[-1][1] == pytest.approx(evaluate(learn.model, learn.dls)[0], rel=1e-5)


def test_replace_weights_copies_ema_into_model():
    recorder = StepRecorder(0, decay_of_step=lambda step: 0.9)
    ema = EMACallback(decay=0.9, replace_weights=True)
    learn = make_learner(cbs=[recorder, ema])
    learn.fit(1)
    assert not hasattr(learn, "model_ema")
    assert_matches_reference(learn.model, recorder.reference)  # the model now holds the float64-checked EMA
    for name, value in ema.engine.state_dict()["tensors"].items():
        assert torch.equal(learn.model.state_dict()[name], value), name


def test_get_preds_after_fit_uses_model_weights():
    learn = make_learner(cbs=[EMACallback(decay=0.9)])
    learn.fit(1)
    assert_validate_and_get_preds_use_the_models_own_weights(learn)


def test_second_fit_behaves_like_the_first():
    ema = EMACallback(decay=0.9, start=1)
    learn = make_learner(cbs=[ema])
    learn.fit(2)
    first_ema = learn.model_ema
    assert ema.engine.num_updates == N_ITER
    learn.fit(3)
    assert ema.start == 1
    assert ema.engine.num_updates == 2 * N_ITER
    assert learn.model_ema is not first_ema


def test_resume_continues_from_model_ema():
    learn = make_learner()
    learn.fit(1, cbs=[EMACallback(decay=0.9)])
    previous = {k: v.clone() for k, v in learn.model_ema.state_dict().items()}
    resumed = EMACallback(decay=1.0, resume=True)  # decay 1: the resumed EMA must not move at all
    learn.fit(1, cbs=[resumed])
    assert resumed.engine.num_updates == N_ITER
    for name, value in previous.items():
        if value.is_floating_point():
            assert torch.equal(learn.model_ema.state_dict()[name], value), name


def test_resume_with_a_mismatched_model_ema_raises_and_without_one_starts_afresh():
    learn = make_learner(cbs=[EMACallback(resume=True)])
    learn.model_ema = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="resume"):
        learn.fit(1)
    recorder = StepRecorder(0, decay_of_step=lambda step: 0.9)
    learn = make_learner(cbs=[recorder, EMACallback(decay=0.9, resume=True)])
    learn.fit(1)  # no earlier EMA (the first fit of fine_tune): a fresh one, started with the fit
    assert_matches_reference(learn.model_ema, recorder.reference)


def test_fine_tune_with_resume_continues_the_frozen_fits_ema_into_the_unfrozen_one():
    from fastai.torch_core import params

    class ContinueFromFrozen(StepRecorder):
        """The unfrozen fit's reference starts from the EMA the frozen fit left (every tensor it now tracks)."""

        frozen_ema = None

        def before_fit(self):
            super().before_fit()
            if self.frozen_ema is not None and not self.learn.lock.locked():
                self.reference = ReferenceEMA({n: self.frozen_ema[n] for n in expected_tracked(self.learn.model)})

        def after_fit(self):
            super().after_fit()
            if self.frozen_ema is None and not self.learn.lock.locked():
                self.frozen_ema = {k: v.clone() for k, v in self.learn.model_ema.state_dict().items()}

    recorder = ContinueFromFrozen(start_step=-1, decay_of_step=lambda step: 0.9)
    ema = EMACallback(decay=0.9, resume=True)
    learn = make_learner(cbs=[ema], splitter=lambda m: [params(m.body) + params(m.frozen), params(m.head)])
    ContinueFromFrozen.order = EMACallback.order + 1  # after the EMA callback has set learn.model_ema
    learn.fine_tune(1, freeze_epochs=1, cbs=[recorder])
    assert ema.engine.num_updates == N_ITER == recorder.reference.num_updates
    assert_matches_reference(learn.model_ema, recorder.reference)


def test_resume_result_matches_reference():
    recorder = StepRecorder(0, decay_of_step=lambda step: 0.9)
    learn = make_learner()
    learn.fit(1, cbs=[recorder, EMACallback(decay=0.9)])
    reference = recorder.reference
    steps_before = len(recorder.steps)

    class Continue(StepRecorder):
        def before_fit(self):
            super().before_fit()
            self.reference = reference

    continuing = Continue(start_step=-1, decay_of_step=lambda step: 0.9)
    learn.fit(1, cbs=[continuing, EMACallback(decay=0.9, resume=True)])
    assert steps_before == N_ITER and reference.num_updates == 2 * N_ITER
    assert_matches_reference(learn.model_ema, reference)


def test_lr_find_after_a_fit_leaves_that_fits_ema_alone(tmp_path):
    ema = EMACallback(decay=0.9)
    learn = make_learner(cbs=[ema], path=tmp_path)
    learn.fit(1)
    engine, model_ema = ema.engine, learn.model_ema
    before = {k: v.clone() for k, v in model_ema.state_dict().items()}
    learn.lr_find(num_it=10, show_plot=False)  # saves and loads `_tmp` around its own fit
    assert ema.engine is engine and learn.model_ema is model_ema and engine.num_updates == N_ITER
    for name, value in before.items():
        assert torch.equal(model_ema.state_dict()[name], value), name
    assert not (tmp_path / "models" / "_tmp.ema.pth").exists()


def test_lr_find_neither_creates_nor_updates_an_ema():
    ema = EMACallback(decay=0.9)
    learn = make_learner(cbs=[ema])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.lr_find(num_it=10, show_plot=False)
    assert ema.engine is None and not hasattr(learn, "model_ema")
    for name, value in before.items():
        assert torch.equal(learn.model.state_dict()[name], value), name


def test_fit_cbs_fit_one_cycle_and_foreach_loop():
    from fastema.core import steps as _steps

    ema = EMACallback(decay=0.9, foreach=False)
    learn = make_learner()
    learn.fit_one_cycle(2, cbs=[ema])
    assert ema.engine.num_updates == 2 * N_ITER and hasattr(learn, "model_ema")
    assert not hasattr(learn, "ema")  # removed with the fit's temporary callbacks
    assert {step.kernel for step in ema.engine._tracker.plan.steps} == {_steps.lerp_loop, _steps.copy_loop}


def test_fine_tune_starts_a_fresh_ema_for_the_unfrozen_fit():
    from fastai.torch_core import params

    ema = EMACallback(decay=0.9)
    learn = make_learner(cbs=[ema], splitter=lambda m: [params(m.body) + params(m.frozen), params(m.head)])
    learn.fine_tune(1, freeze_epochs=1)
    assert ema.engine.num_updates == N_ITER  # the second (unfrozen) fit's steps
    assert "body.0.weight" in ema.engine.tensor_names
    assert learn.model_ema is ema.engine.module


@pytest.mark.filterwarnings("ignore:load_learner` uses Python's insecure pickle:UserWarning")
def test_export_is_lean_and_export_ema_exports_the_ema_model(tmp_path):
    learn = make_learner(cbs=[EMASchedule(0.5, 0.9)], path=tmp_path)
    learn.fit(1)
    learn.export("export.pkl")
    assert learn.model_ema is learn.ema_schedule.engine.module  # untouched by the export
    loaded = load_learner(tmp_path / "export.pkl")
    assert not hasattr(loaded, "model_ema") and loaded.ema_schedule.engine is None  # no EMA model, no engine
    for name, value in learn.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    plain = make_learner(path=tmp_path)
    plain.export("plain.pkl")
    # The EMA adds nothing to the file: only the callback's few attributes.
    assert (tmp_path / "export.pkl").stat().st_size < 1.2 * (tmp_path / "plain.pkl").stat().st_size

    learn.export_ema("ema.pkl")
    assert learn.model is not learn.model_ema and isinstance(learn.model, type(learn.model_ema))
    ema_learner = load_learner(tmp_path / "ema.pkl")
    for name, value in learn.model_ema.state_dict().items():
        assert torch.equal(ema_learner.model.state_dict()[name], value), name
    x = learn.dls.valid.one_batch()[0]
    assert torch.equal(ema_learner.model.eval()(x), learn.model_ema(x))


BAD_ARGUMENTS = [
    (EMACallback, dict(decay=1.01), ValueError, "decay"),
    (EMACallback, dict(decay=-0.1), ValueError, "decay"),
    (EMACallback, dict(decay=None), TypeError, "decay"),
    (EMACallback, dict(start=1.0), ValueError, "start"),
    (EMACallback, dict(start=-1), ValueError, "start"),
    (EMACallback, dict(start="1"), TypeError, "start"),
    (EMACallback, dict(start=True), TypeError, "start"),
    (EMACallback, dict(ema_device="nonsense"), ValueError, "ema_device"),
    (EMACallback, dict(foreach=1), TypeError, "foreach"),
    (EMACallback, dict(validate_ema="yes"), TypeError, "validate_ema"),
    (EMACallback, dict(flatten_model=1), TypeError, "flatten_model"),
    (EMASchedule, dict(flatten_model=True, foreach=False), ValueError, "flatten_model"),
    (EMASchedule, dict(start_decay=2.0), ValueError, "start_decay"),
    (EMASchedule, dict(final_decay=-1.0), ValueError, "final_decay"),
    (EMASchedule, dict(start=0.5, finish=0.4), ValueError, "finish"),
    (EMASchedule, dict(start=2, finish=2), ValueError, "finish"),
    (EMASchedule, dict(finish=0.0), ValueError, "finish"),
    (EMASchedule, dict(finish=1.5), ValueError, "finish"),
    (EMASchedule, dict(schedule="cos"), TypeError, "schedule"),
    (EMASchedule, dict(schedule=lambda s, e: 3), TypeError, "schedule"),
]


@pytest.mark.parametrize("cls,kwargs,error,name", BAD_ARGUMENTS)
def test_bad_arguments_raise_at_construction(cls, kwargs, error, name):
    with pytest.raises(error, match=name):
        cls(**kwargs)


@pytest.mark.parametrize(
    "callback,name",
    [
        (EMACallback(start=5), "start"),
        (EMASchedule(start=0, finish=6), "finish"),
        (EMASchedule(start=0.5, finish=1), "finish"),
    ],
)
def test_positions_outside_the_fit_raise_before_training(callback, name):
    learn = make_learner(cbs=[callback])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=name):
        learn.fit(2)
    for key, value in before.items():
        assert torch.equal(learn.model.state_dict()[key], value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_ema_device_raises():
    with pytest.raises(ValueError, match="ema_device"):
        EMACallback(ema_device="cuda")


class ValidateDuringFit(Callback):
    order = EMACallback.order + 1

    def __init__(self):  # not before_fit: learn.validate() fires before_fit too
        self.results, self.inside = [], False

    def after_epoch(self):
        if self.inside:  # learn.validate() fires after_epoch itself on the way out
            return
        self.inside = True
        try:
            self.results.append(self.learn.validate())
        finally:
            self.inside = False


def test_learn_validate_during_fit_uses_ema():
    ema, probe = EMACallback(decay=0.9), ValidateDuringFit()
    learn = make_learner(cbs=[ema, probe])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1)
    valid_loss = probe.results[-1][0]
    assert valid_loss == pytest.approx(evaluate(learn.model_ema, learn.dls)[0], rel=1e-5)
    assert valid_loss != pytest.approx(evaluate(learn.model, learn.dls)[0], rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    assert ema.engine.num_updates == N_ITER  # the nested validate's fit events did not restart the EMA


def test_learn_validate_during_fit_keeps_the_ema_running():
    recorder = StepRecorder(0, decay_of_step=lambda step: 0.9)
    ema = EMACallback(decay=0.9)
    probe = ValidateDuringFit()
    learn = make_learner(cbs=[recorder, ema, probe])
    learn.fit(3)
    learn.remove_cbs([probe, recorder])
    assert ema.engine.num_updates == 3 * N_ITER
    assert_matches_reference(learn.model_ema, recorder.reference)
    engine = ema.engine
    learn.validate()  # after fit: the model's own weights, and the EMA is left alone
    assert ema.engine is engine


class Interrupted(Exception):
    """Stands in for Ctrl-C: any exception other than fastai's cancels skips `after_fit`."""


class FailDuringValidation(Callback):
    def after_batch(self):
        if not self.training:
            self.snapshot = {k: v.clone() for k, v in self.learn.model.state_dict().items()}
            raise Interrupted("stopped during validation")


def test_interrupted_validation_can_be_restored_exactly():
    ema = EMACallback(decay=0.9)
    learn = make_learner(cbs=[ema, WeightsAroundValidation(order=0)])
    with pytest.raises(Interrupted):
        learn.fit(1, cbs=[FailDuringValidation()])
    own_weights = learn.cbs.filter(lambda cb: isinstance(cb, WeightsAroundValidation))[0].snapshots[0]
    assert not torch.equal(learn.model.head.weight, own_weights["head.weight"])  # EMA weights still in
    learn.ema.restore_model_weights()
    for name, value in own_weights.items():
        assert torch.equal(learn.model.state_dict()[name], value), name


def test_two_ema_callbacks_on_one_learner_are_refused_before_training():
    learn = make_learner(cbs=[EMACallback(decay=0.99), EMASchedule(0.9, 0.999)])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match="2 EMA callbacks on one Learner"):
        learn.fit(1)
    for name, value in before.items():
        assert torch.equal(learn.model.state_dict()[name], value), name


def assert_validate_and_get_preds_use_the_models_own_weights(learn):
    own_loss, _ = evaluate(learn.model, learn.dls)
    assert learn.validate()[0] == pytest.approx(own_loss, rel=1e-6)
    preds, _ = learn.get_preds()
    learn.model.eval()
    with torch.no_grad():
        expected = torch.softmax(torch.cat([learn.model(x) for x, _ in learn.dls.valid]), dim=1)
    torch.testing.assert_close(preds, expected)


def test_validate_after_a_refused_fit_uses_the_models_own_weights():
    learn = make_learner(cbs=[EMACallback(decay=0.5, start=1)])
    learn.fit(2)  # an EMA that has started, and differs from the model
    with pytest.raises(ValueError, match="start"):
        learn.fit(1)  # start=1 is past this fit's only epoch: refused before training
    assert_validate_and_get_preds_use_the_models_own_weights(learn)


class FailDuringTraining(Callback):
    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 3:
            raise Interrupted("stopped during training")


def test_validate_after_a_fit_interrupted_during_training_uses_the_models_own_weights():
    learn = make_learner(cbs=[EMACallback(decay=0.5)])
    with pytest.raises(Interrupted):
        learn.fit(3, cbs=[FailDuringTraining()])
    assert_validate_and_get_preds_use_the_models_own_weights(learn)


def test_validate_after_an_interrupted_validation_restores_the_model_first():
    ema = EMACallback(decay=0.5)
    learn = make_learner(cbs=[ema, WeightsAroundValidation(order=0)])
    with pytest.raises(Interrupted):
        learn.fit(1, cbs=[FailDuringValidation()])
    own_weights = learn.cbs.filter(lambda cb: isinstance(cb, WeightsAroundValidation))[0].snapshots[0]
    own_model = make_learner().model
    own_model.load_state_dict(own_weights)
    own_loss, _ = evaluate(own_model, learn.dls)
    assert learn.validate()[0] == pytest.approx(own_loss, rel=1e-6)  # the model's weights are back before it runs
    for name, value in own_weights.items():
        assert torch.equal(learn.model.state_dict()[name], value), name
    assert_validate_and_get_preds_use_the_models_own_weights(learn)


def test_learn_save_after_an_interrupted_validation_writes_the_models_own_weights(tmp_path):
    learn = make_learner(cbs=[EMACallback(decay=0.5), WeightsAroundValidation(order=0)], path=tmp_path)
    with pytest.raises(Interrupted):
        learn.fit(1, cbs=[FailDuringValidation()])
    own_weights = learn.cbs.filter(lambda cb: isinstance(cb, WeightsAroundValidation))[0].snapshots[0]
    learn.save("after", with_opt=False)
    saved = torch.load(tmp_path / "models" / "after.pth", weights_only=True)
    for name, value in own_weights.items():
        assert torch.equal(saved[name], value), name


def test_a_learner_lock_left_held_does_not_switch_the_ema_off():
    """fastcore leaves `learn.lock` held when a callback raises in get_preds' before_fit; fits must still average."""
    recorder = StepRecorder(0, decay_of_step=lambda step: 0.9, nested_validation=False)
    learn = make_learner(cbs=[recorder, EMACallback(decay=0.9)])
    learn.lock.acquire()
    try:
        learn.fit(1)
    finally:
        learn.lock.release()
    assert learn.ema.engine.num_updates == N_ITER
    assert_matches_reference(learn.model_ema, recorder.reference)


def test_schedule_given_as_a_warmup_class_uses_its_default_formula():
    from fastema import InverseGammaWarmup

    spy, recorder = DecaySpy(), StepRecorder(0, decay_of_step=lambda step: InverseGammaWarmup()(step + 1, 0.99))
    callback = EMASchedule(final_decay=0.99, schedule=InverseGammaWarmup)
    learn = make_learner(cbs=[recorder, callback, spy])
    learn.fit(1)
    assert [decay for _, decay in spy.decays] == [InverseGammaWarmup()(n, 0.99) for n in range(1, N_ITER + 1)]
    assert_matches_reference(learn.model_ema, recorder.reference)


def test_resumed_schedule_does_not_warm_up_again():
    learn = make_learner()
    learn.fit(1, cbs=[EMASchedule(0.5, 0.99, finish=0.5)])
    spy = DecaySpy()
    learn.fit(1, cbs=[EMASchedule(0.5, 0.99, finish=0.5, resume=True), spy])
    assert [decay for _, decay in spy.decays] == [0.99] * N_ITER
