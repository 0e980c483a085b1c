"""BEMA against the float64 reference written from the paper's formulas (tests/reference.py): update_after,
update_every, the floor, skipped steps, resume, bf16 models with a float32 BEMA, swaps, DCP."""

import pytest
import torch

from fastema import BEMA
from helpers import ToyNet, all_tensors, assert_state_matches
from reference import ReferenceBEMA, expected_tracked

SETTINGS = [
    dict(),
    dict(update_after=5),
    dict(update_after=3, update_every=4),
    dict(min_ema_multiplier=0.25, ema_power=0.9, bias_power=0.5, lag=2, multiplier=0.5),
]


def train(model, averager, reference, steps, seed=0, read_every_step=True):
    """SGD steps on `model`; after each, `averager.update()` and the reference's step (and a read of the BEMA)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.5)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 8, generator=generator, dtype=next(model.parameters()).dtype)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averager.update()
        if reference is not None:
            reference.step(expected_tracked(model))
        if read_every_step:  # a read materialises the BEMA weights: a second one must not apply alpha again
            for _ in range(2):
                module = averager.module
            if reference is not None:  # burn-in, the first update, the steps between updates: all as the paper's
                assert_state_matches(all_tensors(module), reference.state, rtol=1e-5, atol=1e-6)
    return optimizer


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "update-after-5", "after-3-every-4", "floor"])
@pytest.mark.parametrize("foreach", [None, False], ids=["fused", "loop"])
def test_bema_matches_the_paper_s_formulas(settings, foreach):
    torch.manual_seed(0)
    model = ToyNet().double()
    bema = BEMA(model, foreach=foreach, **settings)
    reference = ReferenceBEMA(expected_tracked(model), **settings)
    train(model, bema, reference, 17)
    assert bema.num_steps == 17 and bema.num_updates == reference.num_updates > 0
    assert_state_matches(all_tensors(bema.module), reference.state, rtol=1e-12, atol=1e-14)
    assert_state_matches(dict(bema.ema.module.state_dict()), reference.ema, rtol=1e-12, atol=1e-14)
    with bema.use_ema_weights() as swapped:
        assert_state_matches(dict(swapped.state_dict()), reference.state, rtol=1e-12, atol=1e-14)
    assert_state_matches(bema.state_dict()["bema"]["tensors"], reference.state, rtol=1e-12, atol=1e-14)


def test_a_bema_module_kept_across_updates_holds_the_bema_weights_after_each():
    torch.manual_seed(0)
    model = ToyNet().double()
    bema = BEMA(model, update_after=2, update_every=2)
    reference = ReferenceBEMA(expected_tracked(model), update_after=2, update_every=2)
    held = bema.module  # kept, as `ema_model = ema.module` is with a ModelEMA, and never read again through bema
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        model(torch.randn(8, 8, generator=generator, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        bema.update()
        reference.step(expected_tracked(model))
        assert_state_matches(all_tensors(held), reference.state, rtol=1e-12, atol=1e-14)


def test_a_switch_right_after_an_update_puts_the_bema_weights_into_the_model():
    torch.manual_seed(0)
    model = ToyNet().double()
    bema = BEMA(model)
    reference = ReferenceBEMA(expected_tracked(model))
    train(model, bema, reference, 3, read_every_step=False)
    bema.switch()  # no read of the BEMA since the last update
    assert_state_matches(expected_tracked(model), reference.state, rtol=1e-12, atol=1e-14)


def test_bema_flattened_matches_the_reference_and_reads_when_it_likes():
    torch.manual_seed(0)
    model = ToyNet().double()
    bema = BEMA(model, update_after=2, flatten_model=True)
    reference = ReferenceBEMA(expected_tracked(model), update_after=2)
    train(model, bema, reference, 9, read_every_step=False)  # read once, at the end
    assert_state_matches(all_tensors(bema.module), reference.state, rtol=1e-12, atol=1e-14)


def test_bema_counts_only_the_steps_the_optimizer_really_took():
    torch.manual_seed(0)
    model = ToyNet()
    bema = BEMA(model, update_after=2)
    reference = ReferenceBEMA(expected_tracked(model), update_after=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    bema.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        scaler.scale(model(torch.randn(8, 8, generator=generator)).square().mean()).backward()
        skipped = step % 4 == 1
        if skipped:
            model.head.weight.grad[0, 0] = float("inf")  # the scaler skips this step: no optimizer.step, no update
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if not skipped:
            reference.step(expected_tracked(model))
    assert bema.num_steps == reference.steps == 9
    assert_state_matches(all_tensors(bema.module), reference.state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(), dict(update_after=3, update_every=2)], ids=["defaults", "after-every"])
def test_bema_resumed_mid_run_is_bit_identical(tmp_path, settings):
    torch.manual_seed(0)
    straight_model = ToyNet()
    straight = BEMA(straight_model, **settings)
    train(straight_model, straight, None, 12, read_every_step=False)

    torch.manual_seed(0)
    first_model = ToyNet()
    first = BEMA(first_model, **settings)
    optimizer = train(first_model, first, None, 6, read_every_step=False)
    first.save(tmp_path / "bema.pt")
    torch.save({"model": first_model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "train.pt")

    torch.manual_seed(1)  # another initialisation: everything must come from the files
    resumed_model = ToyNet()
    saved = torch.load(tmp_path / "train.pt", weights_only=True)
    resumed_model.load_state_dict(saved["model"])
    resumed = BEMA(resumed_model, **settings)
    resumed.load(tmp_path / "bema.pt")
    for name, tensor in first.module.state_dict().items():  # read before the next update: as saved
        assert torch.equal(resumed.module.state_dict()[name], tensor), name
    optimizer = torch.optim.SGD([p for p in resumed_model.parameters() if p.requires_grad], lr=0.1, momentum=0.5)
    optimizer.load_state_dict(saved["optimizer"])
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        torch.randn(8, 8, generator=generator)  # the first six batches, already seen
    for _ in range(6):
        loss = resumed_model(torch.randn(8, 8, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        resumed.update()
    assert resumed.num_steps == straight.num_steps == 12 and resumed.num_updates == straight.num_updates
    for part in ("bema", "ema", "theta0"):
        expected = straight.state_dict()[part]["tensors"]
        for name, tensor in resumed.state_dict()[part]["tensors"].items():
            assert torch.equal(tensor, expected[name]), (part, name)


def test_bema_of_a_bf16_model_in_float32_follows_the_reference():
    torch.manual_seed(0)
    model = ToyNet().to(torch.bfloat16)
    bema = BEMA(model, update_after=2, ema_dtype=torch.float32)
    reference = ReferenceBEMA(expected_tracked(model), update_after=2)
    train(model, bema, reference, 10)
    module = bema.module
    assert module.head.weight.dtype == torch.float32 and model.head.weight.dtype == torch.bfloat16
    assert_state_matches(all_tensors(module), reference.state, rtol=1e-6, atol=1e-7)


def test_bema_swaps_copies_and_switches_in_place_and_refuses_updates_inside_a_swap():
    torch.manual_seed(0)
    model = ToyNet()
    bema = BEMA(model)
    optimizer = train(model, bema, None, 5)
    own = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    expected = {name: tensor.clone() for name, tensor in bema.module.state_dict().items()}
    with bema.use_ema_weights():
        assert torch.equal(model.head.weight, expected["head.weight"])
        with pytest.raises(RuntimeError, match="inside use_ema_weights"):
            bema.update()
    assert all(torch.equal(model.state_dict()[name], value) for name, value in own.items())
    momentum = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in optimizer.state}
    weight = model.head.weight
    bema.switch()
    assert model.head.weight is weight and torch.equal(weight, expected["head.weight"])
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], momentum[id(p)]) for p in optimizer.state)


def test_bema_refuses_bad_settings_and_states_that_mean_something_else(tmp_path):
    model = ToyNet()
    for bad, error in [
        (dict(lag=0, multiplier=0.5), ValueError),
        (dict(update_after=-1), ValueError),
        (dict(update_every=0), ValueError),
        (dict(ema_power=-1), ValueError),
        (dict(min_ema_multiplier=2.0), ValueError),
        (dict(bias_power="0.2"), TypeError),
        (dict(compile="yes"), TypeError),
    ]:
        with pytest.raises(error):
            BEMA(model, **bad)
    assert {part.compile for part in BEMA(model, compile=False)._parts().values()} == {False}
    from fastema.fastai import BEMACallback as FastaiBEMACallback

    assert FastaiBEMACallback(compile=False).settings["compile"] is False
    with pytest.raises(TypeError, match="compile"):
        FastaiBEMACallback(compile="yes")
    bema = BEMA(model, update_after=2)
    for _ in range(3):
        bema.update()
    state = bema.state_dict()
    other = BEMA(model, update_after=3)
    before = {name: tensor.clone() for name, tensor in other.module.state_dict().items()}
    with pytest.raises(ValueError, match="update_after 2 != 3"):
        other.load_state_dict(state)
    state["theta0"]["tensors"]["head.weight"] = state["theta0"]["tensors"]["head.weight"][:1]
    with pytest.raises(ValueError, match=r"nothing was loaded.*theta0.*head.weight: shape"):
        BEMA(model, update_after=2).load_state_dict(state)
    assert other.num_steps == 0
    assert all(torch.equal(other.module.state_dict()[name], value) for name, value in before.items())


def test_bema_sharded_state_round_trips_through_dcp(tmp_path):
    from fastema.distributed import load_sharded, save_sharded

    torch.manual_seed(0)
    model = ToyNet()
    bema = BEMA(model, update_after=1)
    train(model, bema, None, 4, read_every_step=False)
    save_sharded({"bema": bema.sharded_state("save")}, tmp_path / "ckpt")
    loaded = BEMA(model, update_after=1)
    load_sharded({"bema": loaded.sharded_state("load")}, tmp_path / "ckpt")
    assert (loaded.num_steps, loaded.num_updates, loaded.last_alpha) == (4, 3, bema.last_alpha)
    for name, tensor in bema.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"nothing was loaded.*update_after 1 != 2"):
        load_sharded({"bema": BEMA(model, update_after=2).sharded_state("load")}, tmp_path / "ckpt")


# ---- through the integrations (one fit each) ----------------------------------------------------------


class ReferenceOnRealSteps:
    """The float64 reference BEMA of `model`, stepped after every torch optimizer step in the process."""

    def __init__(self, model, **settings):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.model, self.reference = model, ReferenceBEMA(expected_tracked(model), **settings)
        self.handle = register_optimizer_step_post_hook(lambda *_: self.reference.step(expected_tracked(self.model)))


def test_fastai_bema_callback_matches_the_reference_and_its_checkpoint_resumes_it(tmp_path):
    from fastai.callback.core import Callback

    from fastema.fastai import BEMACallback
    from helpers import make_learner

    class ReferenceSteps(Callback):
        order = BEMACallback.order + 1

        def before_fit(self):
            self.reference = ReferenceBEMA(expected_tracked(self.learn.model), update_after=3, update_every=2)

        def after_step(self):
            self.reference.step(expected_tracked(self.learn.model))

    spy, callback = ReferenceSteps(), BEMACallback(update_after=3, update_every=2)
    learn = make_learner(cbs=[callback, spy], path=tmp_path)
    learn.fit(2)  # 16 optimizer steps
    assert callback.engine.num_steps == 16 and callback.engine.num_updates == 6
    assert_state_matches(dict(learn.model_ema.state_dict()), spy.reference.state, rtol=1e-5, atol=1e-6)
    learn.save("run")
    other = make_learner(cbs=[BEMACallback(update_after=3, update_every=2)], path=tmp_path, seed=1)
    other.load("run")
    for name, tensor in learn.model_ema.state_dict().items():
        assert torch.equal(other.model_ema.state_dict()[name], tensor), name


def test_lightning_bema_callback_matches_the_reference_over_real_steps():
    from fastema.lightning import BEMACallback
    from test_trainers import lightning_data, lightning_module, lightning_trainer

    module = lightning_module()
    callback = BEMACallback(update_after=4, lag=5)
    real = ReferenceOnRealSteps(module, update_after=4, lag=5)
    try:
        lightning_trainer([callback], max_epochs=2).fit(module, lightning_data(), lightning_data(16))
    finally:
        real.handle.remove()
    assert real.reference.steps == 16 and callback.engine.num_updates == 12
    assert_state_matches(dict(callback.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)


def test_hf_bema_callback_matches_the_reference_and_saves_its_own_file(tmp_path):
    from fastema.transformers import BEMA_CHECKPOINT_NAME, BEMACallback
    from test_trainers import hf_trainer, tiny_bert

    model = tiny_bert()
    callback = BEMACallback(update_after=2)
    real = ReferenceOnRealSteps(model, update_after=2)
    try:
        hf_trainer(model, callback, tmp_path, save_strategy="steps", save_steps=4).train()  # 8 optimizer steps
    finally:
        real.handle.remove()
    assert real.reference.steps == 8 and callback.engine.num_updates == 6
    assert_state_matches(dict(callback.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)
    saved = torch.load(tmp_path / "checkpoint-8" / BEMA_CHECKPOINT_NAME, weights_only=True)
    assert saved["ema"]["engine"]["format"] == "fastema.BEMA" and saved["ema"]["engine"]["num_updates"] == 6
