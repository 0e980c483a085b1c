"""Switch EMA: `switch()` copies the EMA into the model in place, the optimizer's state untouched; `SwitchEMA` says
at which epoch or step boundaries the callbacks do it."""

import pytest
import torch

from fastema import ModelEMA, SwitchEMA
from fastema.core.schedules import check_switch
from helpers import ToyNet


def test_switch_copies_the_ema_into_the_model_in_place_and_leaves_the_optimizer_alone():
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(torch.randn(8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
    expected = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}
    optimizer_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.state}
    tensors = dict(model.state_dict(keep_vars=True))
    assert not torch.equal(model.head.weight, expected["head.weight"])
    ema.switch()
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor is tensors[name], name  # in place: the optimizer still holds the model's tensors
        if name in expected:
            assert torch.equal(tensor, expected[name]), name
    for parameter in optimizer.state:
        for key, value in optimizer.state[parameter].items():
            assert torch.equal(value, optimizer_state[id(parameter)][key]), key
    assert ema.num_updates == 3  # the EMA goes on from where it was
    with ema.use_ema_weights(), pytest.raises(RuntimeError, match="inside use_ema_weights"):
        ema.switch()


def test_switch_ema_is_due_at_the_multiples_of_every_between_start_and_end():
    every_epoch = SwitchEMA()
    assert [count for count in range(6) if every_epoch.due(count, "epoch")] == [1, 2, 3, 4, 5]
    assert not every_epoch.due(3, "step")
    bounded = SwitchEMA(every=4, unit="step", start=6, end=17)
    assert [count for count in range(30) if bounded.due(count, "step")] == [8, 12, 16]
    inclusive = SwitchEMA(every=2, unit="step", start=4, end=8)  # both bounds are multiples: both switch
    assert [count for count in range(12) if inclusive.due(count, "step")] == [4, 6, 8]
    with pytest.raises(ValueError, match="Invalid switch_every: 0"):
        check_switch(0)
    for bad, error in [
        (dict(every=0), ValueError),
        (dict(unit="batch"), ValueError),
        (dict(start=-1), ValueError),
        (dict(start=5, end=2), ValueError),
        (dict(every=1.5), TypeError),
    ]:
        with pytest.raises(error):
            SwitchEMA(**bad)


def test_a_step_switch_waits_for_the_first_real_update():
    import copy

    from fastema._trainer import ModelEMAFactory, StepDrivenEMA

    torch.manual_seed(0)
    model = ToyNet()
    twin = copy.deepcopy(model)  # trained the same way, without an EMA
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (model, twin)]
    driver = StepDrivenEMA(ModelEMAFactory(0.5, None, dict(update_every=4)), 0, switch=SwitchEMA(every=2, unit="step"))
    driver.begin(model, optimizers[:1], 100)
    try:
        for _ in range(2):  # a switch is due at step 2, but the EMA (update_every=4) has not moved yet
            x = torch.randn(4, 8)
            for m, optimizer in zip((model, twin), optimizers):
                m(x).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        assert driver.engine.num_steps == 2 and driver.engine.num_updates == 0
    finally:
        driver.end()
    for name, value in twin.state_dict().items():  # not thrown back to the weights the EMA started from
        assert torch.equal(model.state_dict()[name], value), name


# ---- through the integrations -----------------------------------------------------------------------------


def optimizer_tensors(optimizer):
    """Every tensor in a torch or fastai optimizer's state, by (parameter id, key)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return {
        (id(parameter), key): value
        for parameter, state in inner.state.items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


class Switches(list):
    """The step counts at which `ModelEMA.switch` ran; `optimizer()` gives the run's optimizer once it exists."""

    def optimizer(self):
        raise NotImplementedError


@pytest.fixture
def switches(monkeypatch):
    """Records every `ModelEMA.switch` and checks each: the model holds the EMA after it, and the optimizer's state
    is the same before and after."""
    calls = Switches()
    original = ModelEMA.switch

    def switch(engine):
        before = {key: value.clone() for key, value in optimizer_tensors(calls.optimizer()).items()}
        original(engine)
        after = optimizer_tensors(calls.optimizer())
        assert before and before.keys() == after.keys()
        assert all(torch.equal(value, after[key]) for key, value in before.items())
        model, ema = engine.model.state_dict(), engine.module.state_dict()
        assert all(torch.equal(model[name], ema[name]) for name in engine.tensor_names)
        calls.append(engine.num_steps)

    monkeypatch.setattr(ModelEMA, "switch", switch)
    return calls


def test_fastai_switches_at_the_end_of_each_epoch(switches):
    from fastai.optimizer import Adam

    from fastema import EMACallback
    from helpers import make_learner

    learn = make_learner(cbs=[EMACallback(0.5, switch_every=1)])
    learn.opt_func = Adam
    switches.optimizer = lambda: learn.opt
    learn.fit(2)  # 8 optimizer steps an epoch
    assert list(switches) == [8, 16]


def test_lightning_switches_at_the_configured_steps(switches):
    from fastema.lightning import EMACallback
    from test_trainers import lightning_data, lightning_module, lightning_trainer

    trainer = lightning_trainer([EMACallback(0.5, switch_every=SwitchEMA(every=3, unit="step", start=4, end=10))])
    switches.optimizer = lambda: trainer.optimizers[0]
    trainer.fit(lightning_module(), lightning_data(), lightning_data(16))  # 24 optimizer steps
    assert list(switches) == [6, 9]


def test_hf_trainer_switches_at_the_end_of_each_epoch(switches, tmp_path):
    from fastema.transformers import EMACallback
    from test_trainers import hf_trainer, tiny_bert

    trainer = hf_trainer(tiny_bert(), EMACallback(0.5, switch_every=1), tmp_path, max_steps=-1, num_train_epochs=2)
    switches.optimizer = lambda: trainer.optimizer
    trainer.train()  # 32 samples, 4 per batch, 2 batches a step: 4 optimizer steps an epoch
    assert list(switches) == [4, 8]
