"""use_ema_weights(): each read of the EMA inside the swap gives the EMA or raises; the model comes back exactly."""

import pytest
import torch

from fastema import ModelEMA
from helpers import ConvNet, all_tensors
from reference import snapshot

LAYOUTS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(flatten_model=True), id="flat"),
    pytest.param(dict(ema_dtype=torch.float64), id="wider-ema"),
]


def moved_apart(options):
    """A model and an EMA that differ in every tracked tensor."""
    torch.manual_seed(0)
    model = ConvNet()
    ema = ModelEMA(model, 0.5, **options)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.train()(torch.randn(4, 3, 5, 5))
    ema.update()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.train()(torch.randn(4, 3, 5, 5))
    return model, ema


def model_state(model):
    return {name: snapshot(t) for name, t in all_tensors(model).items()}


def ema_state(ema):
    return {name: snapshot(t) for name, t in ema.state_dict()["tensors"].items()}


@pytest.mark.parametrize("options", LAYOUTS)
def test_state_dict_save_and_copy_to_inside_the_swap_give_the_ema(tmp_path, options):
    model, ema = moved_apart(options)
    expected, own_weights = ema_state(ema), model_state(model)
    other = ConvNet()
    with ema.use_ema_weights():
        inside = ema_state(ema)
        ema.save(tmp_path / "best.pt")  # "save the best EMA during validation"
        ema.copy_to(other)
    for name, value in expected.items():
        assert torch.equal(inside[name], value), name
    saved = ModelEMA(ConvNet(), 0.5, **options)
    saved.load(tmp_path / "best.pt")
    for name, value in ema_state(saved).items():
        assert torch.equal(value, expected[name]), name
    other_tensors = all_tensors(other)
    for name, value in expected.items():
        assert torch.equal(snapshot(other_tensors[name]), snapshot(value.to(other_tensors[name].dtype))), name
    assert model_state(model).keys() == own_weights.keys()
    for name, value in model_state(model).items():
        assert torch.equal(value, own_weights[name]), name


MUTATIONS = {
    "module": lambda ema, tmp_path: ema.module,
    "update": lambda ema, tmp_path: ema.update(),
    "reset": lambda ema, tmp_path: ema.reset(),
    "copy_from": lambda ema, tmp_path: ema.copy_from(ConvNet()),
    "load_state_dict": lambda ema, tmp_path: ema.load_state_dict(ema.state_dict()),
    "load": lambda ema, tmp_path: ema.load(tmp_path / "ema.pt"),
    "copy_to": lambda ema, tmp_path: ema.copy_to(),
    "refresh": lambda ema, tmp_path: ema.refresh(),
    "nested": lambda ema, tmp_path: ema.use_ema_weights().__enter__(),
}


@pytest.mark.parametrize("call", list(MUTATIONS))
@pytest.mark.parametrize("options", LAYOUTS)
def test_calls_that_would_read_or_write_the_wrong_weights_raise_and_change_nothing(tmp_path, call, options):
    model, ema = moved_apart(options)
    ema.save(tmp_path / "ema.pt")
    expected, own_weights = ema_state(ema), model_state(model)
    with ema.use_ema_weights(), pytest.raises(RuntimeError, match="inside use_ema_weights"):
        MUTATIONS[call](ema, tmp_path)
    for name, value in model_state(model).items():
        assert torch.equal(value, own_weights[name]), name
    for name, value in ema_state(ema).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("options", LAYOUTS)
def test_writes_to_parameters_inside_the_swap_go_into_the_ema_with_a_warning(options):
    model, ema = moved_apart(options)
    expected, own_weights = ema_state(ema), model_state(model)
    with pytest.warns(UserWarning, match=r"\['head.bias'\] were written in place"), ema.use_ema_weights():
        with torch.no_grad():
            model.head.bias.add_(10.0)
        model.train()(torch.randn(4, 3, 5, 5))  # BatchNorm statistics: discarded, no warning
    after = ema_state(ema)
    torch.testing.assert_close(after["head.bias"], expected["head.bias"] + 10.0)
    for name, value in after.items():
        if name != "head.bias":
            assert torch.equal(value, expected[name]), name
    for name, value in model_state(model).items():
        assert torch.equal(value, own_weights[name]), name


@pytest.mark.parametrize("change", ["model.double()", "p.data = ..."])
def test_model_changed_inside_the_swap_gets_its_own_weights_back_and_the_ema_keeps_its_own(change):
    model, ema = moved_apart({})
    expected, own_weights = ema_state(ema), model_state(model)
    with ema.use_ema_weights():
        if change == "model.double()":
            model.double()  # parameters converted in place, buffers replaced by new objects
        else:
            model.head.weight.data = torch.zeros(4, 6)  # the model lets go of the storage the EMA was put in
    for name, value in model_state(model).items():
        assert torch.equal(value, own_weights[name]), name  # converted exactly (float32 -> float64)
    for name, value in ema_state(ema).items():
        assert torch.equal(value, expected[name]), name
    ema.update()  # and the EMA follows the model from there
    assert ema.num_updates == 2


def test_an_exception_inside_the_swap_restores_the_model_and_propagates():
    model, ema = moved_apart({})
    own_weights = model_state(model)
    with pytest.raises(KeyError), ema.use_ema_weights():
        raise KeyError("interrupted validation")
    for name, value in model_state(model).items():
        assert torch.equal(value, own_weights[name]), name
    assert not ema.ema_weights_in_use


def test_a_model_that_loses_a_tracked_tensor_inside_the_swap_raises_and_the_ema_is_free_again():
    model, ema = moved_apart({})
    own_weights = model_state(model)
    held = model.head.weight  # the tensor the swap wrote the EMA into
    with pytest.raises(KeyError), ema.use_ema_weights():
        del model.head.weight  # finding where the model keeps it now fails
    assert not ema.ema_weights_in_use  # released: the next calls are not refused as "inside use_ema_weights()"
    assert torch.equal(held, own_weights["head.weight"])  # the model's own values went back where the swap wrote
    for name, value in model_state(model).items():
        assert torch.equal(value, own_weights[name]), name
    with pytest.raises(RuntimeError, match="no longer has the tensors"):  # not "called inside use_ema_weights()"
        ema.refresh()


@pytest.mark.parametrize("options", LAYOUTS)
@pytest.mark.parametrize("failing_copy", [1, 2, 4, 7])
def test_a_swap_that_fails_part_way_through_entering_puts_everything_back(options, failing_copy, monkeypatch):
    model, ema = moved_apart(options)
    own_weights, ema_weights = model_state(model), ema_state(ema)
    copies, real_copy = [0], torch.Tensor.copy_

    def copy_failing_once(self, *args, **kwargs):
        copies[0] += 1
        if copies[0] == failing_copy:  # e.g. the second copy of an exchange: the pair is half done
            raise RuntimeError("out of memory")
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_failing_once)
    with pytest.raises(RuntimeError, match="out of memory"), ema.use_ema_weights():
        pass
    monkeypatch.undo()
    assert copies[0] > failing_copy  # it failed inside, and the restore then copied
    for name, value in model_state(model).items():
        assert torch.equal(value, own_weights[name]), name
    for name, value in ema_state(ema).items():
        assert torch.equal(value, ema_weights[name]), name
    assert not ema.ema_weights_in_use
    with ema.use_ema_weights():  # and the next swap works
        pass


def test_the_state_dict_keeps_the_key_order_of_fastema_0_1():
    _, ema = moved_apart({})
    assert list(ema.state_dict()) == [
        "format",
        "version",
        "tensors",
        "num_updates",
        "num_steps",
        "update_every",
        "decay",
        "last_decay",
        "all_parameters",
        "all_buffers",
    ]


def test_copy_from_another_ema_with_no_tensor_in_common_raises_and_changes_nothing():
    _, ema = moved_apart({})
    before = ema_state(ema)
    with pytest.raises(ValueError, match="no name in common"):
        ema.copy_from(ModelEMA(torch.nn.Linear(2, 2)))
    for name, value in ema_state(ema).items():
        assert torch.equal(value, before[name]), name
