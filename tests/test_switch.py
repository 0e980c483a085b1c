"""Switch EMA: `switch()` copies the EMA into the model in place, the optimizer's state untouched; `SwitchEMA` says
at which epoch or step boundaries the callbacks do it."""

import pytest
import torch

from fastema import ModelEMA, SwitchEMA
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
    for bad, error in [
        (dict(every=0), ValueError),
        (dict(unit="batch"), ValueError),
        (dict(start=-1), ValueError),
        (dict(start=5, end=2), ValueError),
        (dict(every=1.5), TypeError),
    ]:
        with pytest.raises(error):
            SwitchEMA(**bad)
