"""Pickles written by fastema 0.1 (whole EMAs, exported Learners' schedules) load and keep working."""

from pathlib import Path

import pytest
import torch

from fastema import InverseGammaWarmup, ModelEMA, PostHocEMA

# Written by fastema 0.1 (commit a8bc363): a Sequential model, a ModelEMA (InverseGammaWarmup) and a
# PostHocEMA of it after 3 updates, an InverseGammaWarmup, and the EMAs' tensors as plain tensors.
FIXTURE = Path(__file__).parent / "data" / "fastema01_pickles.pt"


@pytest.fixture(autouse=True)
def forget_old_paths(monkeypatch):
    """Each test imports the old paths afresh (and sees their warning), whatever ran before."""
    import sys

    from fastema._compat import MOVED

    for name in MOVED:
        if name in sys.modules:
            monkeypatch.delitem(sys.modules, name)


def load_fixture():
    with pytest.warns(DeprecationWarning, match="fastema 0.1's path"):
        return torch.load(FIXTURE, weights_only=False)


def nudge(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def test_a_model_ema_pickled_by_0_1_loads_and_continues_like_a_new_one():
    old = load_fixture()
    ema, model = old["ema"], old["model"]
    assert isinstance(ema, ModelEMA) and ema.model is model and ema.num_updates == 3
    for name, value in ema.state_dict()["tensors"].items():
        assert torch.equal(value, old["ema_state"][name]), name
    twin = ModelEMA(model, 0.9, warmup=InverseGammaWarmup())  # what a user builds today, loaded the same
    twin.load_state_dict(ema.state_dict())
    nudge(model, 1)
    ema.update()
    twin.update()
    for name, value in twin.state_dict()["tensors"].items():
        assert torch.equal(ema.state_dict()["tensors"][name], value), name
    assert not torch.equal(ema.state_dict()["tensors"]["0.weight"], old["ema_state"]["0.weight"])  # it moved
    own = {name: value.clone() for name, value in model.state_dict().items()}
    with ema.use_ema_weights():
        assert torch.equal(model[0].weight, ema.state_dict()["tensors"]["0.weight"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, own[name]), name


def test_a_post_hoc_ema_pickled_by_0_1_loads_and_continues_like_a_new_one():
    old = load_fixture()
    posthoc, model = old["posthoc"], old["model"]
    assert isinstance(posthoc, PostHocEMA) and posthoc.num_updates == 3
    for sigma_rel, expected in old["posthoc_state"].items():
        for name, value in posthoc.ema_tensors(sigma_rel).items():
            assert torch.equal(value, expected[name]), (sigma_rel, name)
    twin = PostHocEMA(model, (0.05, 0.1))
    twin.load_state_dict(posthoc.state_dict())
    nudge(model, 2)
    posthoc.update()
    twin.update()
    for sigma_rel in (0.05, 0.1):
        for name, value in twin.ema_tensors(sigma_rel).items():
            assert torch.equal(posthoc.ema_tensors(sigma_rel)[name], value), (sigma_rel, name)


def test_a_schedule_pickled_by_0_1_is_today_s_class():
    warmup = load_fixture()["warmup"]
    assert type(warmup) is InverseGammaWarmup
    assert warmup(10, 0.9999) == InverseGammaWarmup()(10, 0.9999)


def test_an_old_path_hands_out_only_names_its_successor_has():
    import importlib

    with pytest.warns(DeprecationWarning, match="fastema.engine is fastema 0.1's path, now fastema.core.model_ema"):
        engine = importlib.import_module("fastema.engine")
    assert engine.ModelEMA is ModelEMA
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        _ = engine.nothing_here


@pytest.mark.slow
@pytest.mark.parametrize("name", ["EMACallback", "EMASchedule"])
def test_a_callback_pickled_before_compile_existed_fits_with_the_default(name):
    """fastai's attribute lookup would otherwise hand `learn.model.compile` (a method) to the engine."""
    import pickle

    import fastema
    from helpers import make_learner

    callback = getattr(fastema, name)()
    del callback.__dict__["compile"]  # what a callback exported before `compile=` holds
    restored = pickle.loads(pickle.dumps(callback))
    learn = make_learner(cbs=[restored], n_train=16, bs=8)
    learn.fit(1)
    assert restored.engine.compile is None and restored.engine.num_updates == 2
