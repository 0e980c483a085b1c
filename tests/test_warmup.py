"""update_every and the warm-up schedules, against their formulas and the float64 reference."""

import math

import pytest
import torch
from fastai.callback.core import Callback

from fastema import EMACallback, EMASchedule, ExponentialWarmup, InverseGammaWarmup, ModelEMA
from helpers import ToyNet, assert_matches_reference, make_learner
from reference import ReferenceEMA, expected_tracked


def toy_input(generator):
    return torch.randn(16, 8, generator=generator, dtype=torch.float64)


def ultralytics_decay(updates, decay, tau):
    return decay * (1 - math.exp(-updates / tau))


def inverse_gamma_decay(optimization_step, decay, inv_gamma, power, min_decay):
    # As diffusers' EMAModel.get_decay / timm ModelEmaV3.get_decay (update_after_step = 0).
    step = max(0, optimization_step - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / inv_gamma) ** -power
    return max(min(value, decay), min_decay)


WARMUPS = [
    (ExponentialWarmup(tau=5), lambda n, d: ultralytics_decay(n, d, 5)),
    (InverseGammaWarmup(), lambda n, d: inverse_gamma_decay(n, d, 1.0, 2 / 3, 0.0)),
    (InverseGammaWarmup(inv_gamma=2, power=0.75, min_decay=0.3), lambda n, d: inverse_gamma_decay(n, d, 2, 0.75, 0.3)),
]


@pytest.mark.parametrize("warmup,formula", WARMUPS, ids=repr)
def test_warmups_follow_their_formulas(warmup, formula):
    for step in [1, 2, 3, 10, 100, 10_000, 10**7]:
        assert warmup(step, 0.9999) == pytest.approx(formula(step, 0.9999), abs=1e-15), step
    assert InverseGammaWarmup(power=0.75)(10_001, 0.9999) == pytest.approx(0.999, abs=1e-6)  # diffusers' rule of thumb


def run_engine(n_steps, decay, decay_of_step, update_every=1, **kwargs):
    """ModelEMA with 3 SGD steps per model update call pattern, and the reference updated by the test's own rule."""
    torch.manual_seed(0)
    model = ToyNet().double()
    ema = ModelEMA(model, decay, update_every=update_every, **kwargs)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, n_steps + 1):
        loss = model(toy_input(generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        if step % update_every == 0:
            reference.update(tracked, decay_of_step(step) ** update_every)
    return ema, reference


def assert_close_to_reference(ema, reference):
    assert_matches_reference(ema, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("warmup,formula", WARMUPS, ids=repr)
@pytest.mark.parametrize("update_every", [1, 3])
def test_engine_warmup_and_update_every_match_reference(warmup, formula, update_every):
    ema, reference = run_engine(30, 0.95, lambda n: formula(n, 0.95), update_every, warmup=warmup)
    assert ema.num_steps == 30 and ema.num_updates == reference.num_updates == 30 // update_every
    assert ema.last_decay == pytest.approx(formula(30, 0.95))
    assert_close_to_reference(ema, reference)


def test_update_every_uses_decay_to_the_power_n():
    ema, reference = run_engine(20, 0.9, lambda n: 0.9, update_every=4)
    assert ema.num_updates == 5
    assert_close_to_reference(ema, reference)


def test_update_every_state_round_trip_mid_window_is_exact():
    straight, _ = run_engine(10, 0.9, lambda n: 0.9, update_every=4)
    torch.manual_seed(0)
    model = ToyNet().double()
    first = ModelEMA(model, 0.9, update_every=4)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    resumed = None
    for step in range(1, 11):
        loss = model(toy_input(generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        (resumed or first).update()
        if step == 6:  # between two updates of a window
            resumed = ModelEMA(model, 0.9, update_every=4)
            resumed.load_state_dict(first.state_dict())
    assert (resumed.num_steps, resumed.num_updates) == (10, 2)
    for a, b in zip(resumed._tracker.binding.ema_tensors, straight._tracker.binding.ema_tensors):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(update_every=0), ValueError),
        (dict(update_every=2.0), TypeError),
        (dict(update_every=True), TypeError),
        (dict(warmup=lambda n, d: d), TypeError),
    ],
)
def test_bad_update_every_or_warmup_raises_naming_it(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        ModelEMA(ToyNet(), **kwargs)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: ExponentialWarmup(tau=0), "tau"),
        (lambda: InverseGammaWarmup(power=-1), "power"),
        (lambda: InverseGammaWarmup(inv_gamma=math.inf), "inv_gamma"),
        (lambda: InverseGammaWarmup(min_decay=2), "min_decay"),
    ],
)
def test_bad_warmup_arguments_raise(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    "make,name", [(lambda: ExponentialWarmup(tau="3"), "tau"), (lambda: InverseGammaWarmup(power=None), "power")]
)
def test_warmup_arguments_of_the_wrong_type_raise_type_errors(make, name):
    with pytest.raises(TypeError, match=name):
        make()


# ---- fastai ----------------------------------------------------------------------------------------------


def test_callback_update_every_counts_and_matches_reference():
    from test_callback import StepRecorder, assert_matches_reference

    recorder = StepRecorder(0, decay_of_step=None)
    ema = EMACallback(decay=0.9, update_every=3)
    learn = make_learner(cbs=[recorder, ema])
    learn.fit(3)  # 24 optimizer steps
    assert ema.engine.num_steps == 24 and ema.engine.num_updates == 8
    # The reference: the same run's weights after steps 3, 6, ..., 24, averaged with 0.9 ** 3.
    torch.manual_seed(0)
    replay = make_learner(cbs=[WeightLog()])
    replay.fit(3)
    reference = ReferenceEMA(replay.weight_log.weights[0])
    for step, weights in enumerate(replay.weight_log.weights[1:], start=1):
        if step % 3 == 0:
            reference.update(weights, 0.9**3)
    assert_matches_reference(learn.model_ema, reference)


class WeightLog(Callback):
    """The tracked tensors before training and after every optimizer step."""

    def before_fit(self):
        self.weights = [{n: t.detach().clone() for n, t in expected_tracked(self.learn.model).items()}]

    def after_step(self):
        self.weights.append({n: t.detach().clone() for n, t in expected_tracked(self.learn.model).items()})


@pytest.mark.parametrize("warmup,formula", WARMUPS[:2], ids=repr)
def test_ema_schedule_with_a_warmup_follows_the_formula_from_start(warmup, formula):
    from test_callback import DecaySpy

    spy = DecaySpy()
    callback = EMASchedule(final_decay=0.99, start=1, schedule=warmup)
    learn = make_learner(cbs=[callback, spy])
    learn.fit(3)
    updates = [(step, decay) for step, decay in spy.decays if step >= 8]
    assert [step for step, _ in updates] == list(range(8, 24))
    for step, decay in updates:
        assert decay == pytest.approx(formula(step - 8 + 1, 0.99), abs=1e-15), step
    assert callback.engine.num_updates == 16
