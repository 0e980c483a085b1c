"""ModelEMA.attach, and the Lightning and Hugging Face Trainer callbacks, on real trainers, against the float64
reference counted on the optimizer steps that really happened (a global step hook of the test's own)."""

import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastema import ModelEMA
from helpers import ToyNet, assert_state_matches
from reference import ReferenceEMA, expected_tracked

TESTS = Path(__file__).parent


class RealSteps:
    """Counts every optimizer step in the process and keeps a float64 reference EMA of `model` over them.

    Built where the EMA is built (before any forward): with start=0 both begin from the weights and
    buffers as they are now; with start=N both begin from those after the N-th step.
    """

    def __init__(self, model, decay, start=0):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.model, self.decay, self.start = model, decay, start
        self.steps = 0
        self.reference = ReferenceEMA(expected_tracked(model)) if start == 0 else None
        self.handles = [register_optimizer_step_post_hook(self.after_step)]

    def after_step(self, optimizer, args, kwargs):
        self.steps += 1
        self.weights = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        if self.reference is not None:
            self.reference.update(expected_tracked(self.model), self.decay)
        elif self.steps == self.start:
            self.reference = ReferenceEMA(expected_tracked(self.model))

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ---- ModelEMA.attach -----------------------------------------------------------------------------------


def test_attach_updates_after_every_real_step_and_not_after_a_skipped_one():
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, 0.8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    real = RealSteps(model, 0.8)
    handle = ema.attach(optimizer)
    with pytest.raises(ValueError, match="already attached"):
        ema.attach(optimizer)  # twice would update twice per step
    try:
        generator = torch.Generator().manual_seed(0)
        for step in range(12):
            loss = model(torch.randn(8, 8, generator=generator)).square().mean()
            scaler.scale(loss).backward()
            if step % 4 == 0:
                model.head.weight.grad[0, 0] = float("inf")  # the scaler skips this step: no optimizer.step
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        assert real.steps == ema.num_updates == 9
        assert_state_matches(dict(ema.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)
        handle.remove()
        model(torch.randn(8, 8)).sum().backward()
        optimizer.step()
        assert ema.num_updates == 9  # detached
        ema.attach(optimizer).remove()  # and free to attach again
    finally:
        real.remove()


@pytest.mark.parametrize("kind", ["ModelEMA", "PostHocEMA"])
def test_attach_refuses_another_model_s_optimizer_and_warns_when_update_is_also_called_by_hand(kind):
    from fastema import PostHocEMA

    generator, discriminator = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 1)
    generator[1].bias.requires_grad_(False)  # frozen: not averaged
    ema = ModelEMA(generator, 0.5) if kind == "ModelEMA" else PostHocEMA(generator)
    with pytest.raises(ValueError, match="none of the parameters"):
        ema.attach(torch.optim.SGD(discriminator.parameters(), lr=0.1))  # a GAN's other optimizer
    with pytest.raises(ValueError, match="none of the parameters"):
        ema.attach(torch.optim.SGD([generator[1].bias], lr=0.1))  # of the model, but of no averaged tensor
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.1)
    assert not optimizer._optimizer_step_post_hooks  # the refusal hooked nothing anywhere
    ema.update()  # by hand, before attaching: fine
    handle = ema.attach(optimizer)
    for step in range(3):
        generator(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        if step == 0:
            with pytest.warns(UserWarning, match="twice per step"):
                ema.update()  # the README's loop line left in beside attach()
        else:
            ema.update()  # warned once, not at every step
    assert ema.num_updates == 1 + 3 + 3
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.update()  # detached: calling it by hand is the only update again
    assert pickle.loads(pickle.dumps(ema._attachments))._attached == []


def test_posthoc_attach_updates_after_real_steps_only():
    from fastema import PostHocEMA

    model = nn.Linear(4, 2)
    ema = PostHocEMA(model, (0.05, 0.10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = ema.attach(optimizer)
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    optimizer.zero_grad()
    assert ema.num_steps == 3
    handle.remove()
    optimizer.step()
    assert ema.num_steps == 3


def test_a_wrapper_that_is_an_optimizer_is_hooked_itself():
    class Lookahead(torch.optim.Optimizer):  # moves the weights after its inner optimizer's step
        def __init__(self, optimizer):
            self.optimizer = optimizer
            super().__init__(optimizer.param_groups, {})

        def step(self, closure=None):
            self.optimizer.step()
            with torch.no_grad():
                for group in self.param_groups:
                    for parameter in group["params"]:
                        parameter.mul_(0.5)

    model = nn.Linear(2, 2)
    ema = ModelEMA(model, 0.0)  # decay 0: the EMA is the weights it last read
    optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    ema.attach(optimizer)
    model(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    assert torch.equal(ema.module.weight, model.weight)  # read after the wrapper's own change


def test_attach_unwraps_accelerate_and_rejects_other_objects():
    from accelerate import Accelerator

    model = nn.Linear(4, 2)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ema = ModelEMA(model, 0.5)
    ema.attach(optimizer)
    accelerator.backward(model(torch.randn(3, 4)).sum())
    optimizer.step()
    assert ema.num_updates == 1
    with pytest.raises(TypeError, match="optimizer"):
        ema.attach(model)


# ---- Lightning -----------------------------------------------------------------------------------------


def lightning_data(n=64):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=8)


def lightning_module(poison_every=None):
    """A small classifier; with `poison_every=n`, every n-th batch's gradients get an inf (AMP skips that step)."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
            self.batches = 0

        def training_step(self, batch, index):
            x, y = batch
            self.batches += 1
            return nn.functional.cross_entropy(self.net(x), y)

        def on_after_backward(self):  # before the scaler unscales and checks the gradients
            if poison_every and self.batches % poison_every == 0:
                self.net[0].weight.grad[0, 0] = float("inf")

        def validation_step(self, batch, index):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

        def test_step(self, batch, index):
            self.validation_step(batch, index)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)

    torch.manual_seed(0)
    return Classifier()


def lightning_trainer(callbacks, **kwargs):
    import lightning as L

    options = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def val_loss(module, data):
    module.eval()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(module(x), y) for x, y in data]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize(
    "kwargs,start,steps,poison_every",
    [
        (dict(), 0, 24, None),
        (dict(accumulate_grad_batches=2), 0, 12, None),
        (dict(max_steps=10), 3, 10, None),
        (dict(precision="bf16-mixed"), 0, 24, None),
        (dict(precision="16-mixed"), 0, 18, 4),  # 6 of 24 steps skipped by the GradScaler
        (dict(accumulate_grad_batches=2), 0.25, 12, None),  # a quarter of 12 optimizer steps: starts after 3
    ],
    ids=["plain", "accumulate-2", "max-steps-start-3", "bf16-mixed", "16-mixed-skipped-steps", "start-fraction"],
)
def test_lightning_ema_matches_the_reference_over_real_steps(kwargs, start, steps, poison_every):
    from fastema.lightning import EMACallback

    if kwargs.get("precision") == "16-mixed":  # on CPU Lightning turns "16-mixed" into bf16: its GPU plugin, by hand
        from lightning.pytorch.plugins import MixedPrecision

        scaler = torch.amp.GradScaler("cpu")
        kwargs = dict(plugins=[MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)])
    module = lightning_module(poison_every)
    callback = EMACallback(decay=0.8, start=start)
    real = RealSteps(module, 0.8, start=round(start * steps) if isinstance(start, float) else start)
    try:
        lightning_trainer([callback], **kwargs).fit(module, lightning_data(), lightning_data(16))
    finally:
        real.remove()
    assert real.steps == steps and callback.engine.num_updates == steps - real.start
    assert_state_matches(dict(callback.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)


def test_lightning_validates_and_tests_with_the_ema_and_checkpoints_monitor_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastema.lightning import EMACallback

    module = lightning_module()
    callback = EMACallback(decay=0.8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    trainer = lightning_trainer([callback, checkpoint], enable_checkpointing=True)
    validation = lightning_data(16)
    trainer.fit(module, lightning_data(), validation)
    own = {name: value.clone() for name, value in module.state_dict().items()}
    ema_loss = val_loss(callback.module.net, validation)
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(ema_loss, rel=1e-5)
    assert val_loss(module.net, validation) != pytest.approx(ema_loss, rel=1e-5)
    assert checkpoint.best_model_score.item() <= ema_loss + 1e-6  # the monitored value is the EMA's
    (result,) = trainer.test(module, validation, verbose=False)
    assert result["val_loss"] == pytest.approx(ema_loss, rel=1e-5)
    for name, value in module.state_dict().items():
        assert torch.equal(value, own[name]), name  # the module's own weights after every evaluation
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    assert any("EMACallback" in key for key in saved["callbacks"])  # the EMA's state rides in the checkpoint


@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")  # each resumed run saves elsewhere
@pytest.mark.parametrize("start", [5, 20], ids=["saved-after-start", "saved-before-start"])
def test_lightning_resume_from_a_checkpoint_is_bit_identical(tmp_path, start):
    from contextlib import nullcontext

    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastema.lightning import EMACallback

    def fit(max_epochs, ckpt_path=None, save_to=None, callback=None):
        module, callback = lightning_module(), callback or EMACallback(decay=0.8, start=start)
        callbacks = [callback] + ([ModelCheckpoint(dirpath=save_to, save_last=True)] if save_to else [])
        trainer = lightning_trainer(callbacks, max_epochs=max_epochs, enable_checkpointing=bool(save_to))
        trainer.fit(module, lightning_data(), lightning_data(16), ckpt_path=ckpt_path)
        return module, callback

    straight_model, straight = fit(4)
    with pytest.warns(UserWarning, match="before start") if start > 16 else nullcontext():
        _, first = fit(2, save_to=tmp_path / "first")  # 16 steps
    for index, callback in enumerate((None, first)):  # a fresh callback, and the one that wrote the checkpoint
        resumed_model, resumed = fit(
            4, ckpt_path=tmp_path / "first" / "last.ckpt", save_to=tmp_path / f"resumed{index}", callback=callback
        )
        assert resumed.engine.num_updates == straight.engine.num_updates == 32 - start
        for name, value in straight.module.state_dict().items():
            assert torch.equal(resumed.module.state_dict()[name], value), name
        for name, value in straight_model.state_dict().items():
            assert torch.equal(resumed_model.state_dict()[name], value), name


@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_lightning_resume_from_a_checkpoint_without_ema_state_warns_and_counts_start_in_global_steps(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastema.lightning import EMACallback

    module = lightning_module()
    trainer = lightning_trainer([ModelCheckpoint(tmp_path, save_last=True)], max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, lightning_data(), lightning_data(16))  # 16 steps, no EMA
    callback = EMACallback(decay=0.8, start=20)
    resumed_module = lightning_module()
    real = RealSteps(resumed_module, 0.8, start=4)  # global step 20 is the 4th step of this fit
    try:
        with pytest.warns(UserWarning, match="holds no fastema.EMACallback state"):
            lightning_trainer(
                [callback, ModelCheckpoint(tmp_path / "again")], max_epochs=4, enable_checkpointing=True
            ).fit(resumed_module, lightning_data(), lightning_data(16), ckpt_path=tmp_path / "last.ckpt")
    finally:
        real.remove()
    assert callback.engine.num_updates == 12 == real.steps - 4
    assert_state_matches(dict(callback.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)


def test_lightning_validate_ema_false_and_an_error_in_validation(tmp_path):
    import pickle

    from fastema.lightning import EMACallback

    module, callback = lightning_module(), EMACallback(decay=0.8, validate_ema=False)
    trainer = lightning_trainer([callback], max_epochs=1)
    trainer.fit(module, lightning_data(), lightning_data(16))
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(val_loss(module.net, lightning_data(16)))
    shipped = pickle.loads(pickle.dumps(callback.__getstate__()["ema"]))  # what ddp_spawn would send
    assert shipped.engine is None and callback.engine is not None  # without the EMA and its hooks

    class Failing(type(lightning_module())):
        def validation_step(self, batch, index):
            if self.global_step >= 8:
                raise RuntimeError("validation failed")
            return super().validation_step(batch, index)

    torch.manual_seed(0)
    module, callback = Failing(), EMACallback(decay=0.8)
    real = RealSteps(module, 0.8)
    try:
        trainer = lightning_trainer([callback], max_epochs=2)
        with pytest.raises(RuntimeError, match="validation failed"):
            trainer.fit(module, lightning_data(), lightning_data(16))
    finally:
        real.remove()
    for name, value in module.state_dict().items():  # its own weights back, and no hook left behind
        assert torch.equal(value, real.weights[name]), name
    (optimizer,) = trainer.optimizers
    updates = callback.engine.num_updates
    optimizer.step()
    callback.ema.end_batch(trainer.global_step + 1)
    assert callback.engine.num_updates == updates


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")  # validate() needs no saver
def test_lightning_a_checkpoint_s_ema_serves_validate_and_stays_out_of_a_later_fit(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastema.lightning import EMACallback

    module, callback = lightning_module(), EMACallback(decay=0.8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    lightning_trainer([callback, checkpoint], max_epochs=2, enable_checkpointing=True).fit(
        module, lightning_data(), lightning_data(16)
    )
    ema_loss = val_loss(callback.module.net, lightning_data(16))
    fresh_module, fresh = lightning_module(), EMACallback(decay=0.8)  # another process, say
    (result,) = lightning_trainer([fresh]).validate(fresh_module, lightning_data(16), ckpt_path=tmp_path / "last.ckpt")
    assert result["val_loss"] == pytest.approx(ema_loss, rel=1e-5)  # the checkpoint's EMA, not its raw weights
    (key,) = [key for key in torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"] if "EMA" in key]
    fresh.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][key])  # say, predict
    real = RealSteps(fresh_module, 0.8)  # a fit without ckpt_path: a new EMA from this model's weights
    try:
        lightning_trainer([fresh], max_epochs=1).fit(fresh_module, lightning_data(), lightning_data(16))
    finally:
        real.remove()
    assert fresh.engine.num_updates == real.steps == 8
    assert_state_matches(dict(fresh.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)


def test_lightning_a_second_fit_on_the_same_trainer_continues_the_ema():
    from fastema.lightning import EMACallback

    module, callback = lightning_module(), EMACallback(decay=0.8, start=12)
    real = RealSteps(module, 0.8, start=12)
    try:
        trainer = lightning_trainer([callback], max_epochs=1)
        with pytest.warns(UserWarning, match="before start"):
            trainer.fit(module, lightning_data(), lightning_data(16))  # 8 steps: not started yet
        trainer.fit_loop.max_epochs = 3
        trainer.fit(module, lightning_data(), lightning_data(16))  # 16 more: started at global step 12
    finally:
        real.remove()
    assert real.steps == 24 and callback.engine.num_updates == 12
    assert_state_matches(dict(callback.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)


def assert_same_state(module, expected):
    for name, value in expected.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


def two_optimizer_module():
    """Manual optimization stepping two optimizers per batch; its reference EMA moves once per batch."""
    import lightning as L

    from reference import ReferenceEMA

    class TwoOptimizers(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 3)
            self.reference, self.start, self.batches = ReferenceEMA(expected_tracked(self)), 0, 0

        def training_step(self, batch, index):
            x, y = batch
            for optimizer in self.optimizers():
                optimizer.zero_grad()
                self.manual_backward(nn.functional.cross_entropy(self.second(self.first(x)), y))
                optimizer.step()

        def on_train_batch_end(self, outputs, batch, index):  # the reference: once per batch, after both steps
            self.batches += 1
            if self.trainer.global_step == self.start:
                self.reference = ReferenceEMA(expected_tracked(self))  # starts at global step `start`
            elif self.trainer.global_step > self.start:
                self.reference.update(expected_tracked(self), 0.8)

        def configure_optimizers(self):
            return [torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.1)]

    torch.manual_seed(0)
    return TwoOptimizers()


@pytest.mark.parametrize("start", [0, 6])
def test_lightning_two_optimizers_a_second_fit_continues_and_start_counts_global_steps(start):
    from fastema.lightning import EMACallback

    module, callback = two_optimizer_module(), EMACallback(decay=0.8, start=start)
    module.start = start
    trainer = lightning_trainer([callback], max_epochs=1)
    trainer.fit(module, lightning_data())  # 8 batches, global step 16
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, lightning_data())  # the same EMA goes on: 8 more batches
    assert trainer.global_step == 32 and module.batches == 16
    assert callback.engine.num_updates == 16 - start // 2  # starts at global step `start`: batch start / 2
    assert_state_matches(dict(callback.module.state_dict()), module.reference.state, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")  # resumed without a saver
def test_lightning_resume_with_a_callback_spelled_differently_finds_its_ema_and_checks_what_it_means(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastema.lightning import EMACallback

    def fit(max_epochs, callback, ckpt_path=None, save_to=None):
        module = lightning_module()
        callbacks = [callback] + ([ModelCheckpoint(dirpath=save_to, save_last=True)] if save_to else [])
        trainer = lightning_trainer(callbacks, max_epochs=max_epochs, enable_checkpointing=bool(save_to))
        trainer.fit(module, lightning_data(), lightning_data(16), ckpt_path=ckpt_path)
        return callback

    straight = fit(2, EMACallback(decay=0.8))
    fit(1, EMACallback(decay=0.8), save_to=tmp_path)  # 8 steps
    checkpoint = tmp_path / "last.ckpt"
    spellings = [dict(flatten_model=True), dict(foreach=False), dict(update_every=1, all_buffers=False)]
    for index, options in enumerate(spellings):
        resumed = fit(2, EMACallback(decay=0.8, **options), ckpt_path=checkpoint, save_to=tmp_path / f"again{index}")
        assert resumed.engine.num_updates == straight.engine.num_updates == 16, options
        assert_same_state(resumed.module, straight.module)
    with pytest.raises(ValueError, match=r"last\.ckpt.*update_every 1 != 2"):  # naming the checkpoint
        fit(2, EMACallback(decay=0.8, update_every=2), ckpt_path=checkpoint)
    # A checkpoint of fastema 0.1, whose key was built from the options, still resumes.
    saved = torch.load(checkpoint, weights_only=True)
    saved["callbacks"]["EMACallback{'decay': 0.8, 'start': 0}"] = saved["callbacks"].pop("fastema.EMACallback")
    torch.save(saved, tmp_path / "legacy.ckpt")
    resumed = fit(2, EMACallback(decay=0.8), ckpt_path=tmp_path / "legacy.ckpt")
    assert resumed.engine.num_updates == 16
    assert_same_state(resumed.module, straight.module)


def test_lightning_never_started_warns_and_reading_the_ema_raises():
    from fastema.lightning import EMACallback

    callback = EMACallback(decay=0.8, start=100, replace_weights=True)
    with pytest.warns(UserWarning, match="before start"):
        lightning_trainer([callback], max_epochs=1).fit(lightning_module(), lightning_data(), lightning_data(16))
    with pytest.raises(RuntimeError, match="has not started"):
        _ = callback.module
    with pytest.raises(ValueError, match="start"):  # a fraction of unbounded training
        lightning_trainer([EMACallback(start=0.5)], max_epochs=-1, max_time="00:00:00:05").fit(
            lightning_module(), lightning_data(), lightning_data(16)
        )


def test_lightning_two_ema_callbacks_with_different_decays_live_side_by_side(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastema.lightning import EMACallback

    module = lightning_module()
    with pytest.raises(ValueError, match="validate_ema"):  # both would swap their EMA into the one module
        lightning_trainer([EMACallback(decay=0.5, name="fast"), EMACallback(decay=0.9, name="slow")]).fit(
            module, lightning_data(), lightning_data(16)
        )
    with pytest.raises(RuntimeError, match="state_key"):  # Lightning refuses two callbacks with one state key
        lightning_trainer([EMACallback(decay=0.5), EMACallback(decay=0.9, validate_ema=False)])
    fast, slow = EMACallback(decay=0.5, name="fast"), EMACallback(decay=0.9, validate_ema=False, name="slow")
    real_fast, real_slow = RealSteps(module, 0.5), RealSteps(module, 0.9)
    try:
        trainer = lightning_trainer(
            [fast, slow, ModelCheckpoint(tmp_path, save_last=True)], max_epochs=1, enable_checkpointing=True
        )
        trainer.fit(module, lightning_data(), lightning_data(16))
    finally:
        real_fast.remove()
        real_slow.remove()
    assert_state_matches(dict(fast.module.state_dict()), real_fast.reference.state, rtol=1e-5, atol=1e-6)
    assert_state_matches(dict(slow.module.state_dict()), real_slow.reference.state, rtol=1e-5, atol=1e-6)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert {key for key in saved["callbacks"] if "EMACallback" in key} == {
        "fastema.EMACallback[fast]",
        "fastema.EMACallback[slow]",
    }
    unnamed = EMACallback(decay=0.5)  # resuming one of them without its name: told which names there are
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")  # Lightning warns too, about the callbacks missing from this trainer
        lightning_trainer([unnamed], max_epochs=2).fit(
            lightning_module(), lightning_data(), lightning_data(16), ckpt_path=tmp_path / "last.ckpt"
        )
    hint = "holds ['fastema.EMACallback[fast]', 'fastema.EMACallback[slow]']: give this callback the name="
    assert any(hint in str(warning.message) for warning in warned), [str(w.message) for w in warned]


def test_lightning_replace_weights_and_bad_arguments():
    from fastema.lightning import EMACallback

    module = lightning_module()
    callback = EMACallback(decay=0.8, replace_weights=True)
    real = RealSteps(module, 0.8)
    try:
        lightning_trainer([callback], max_epochs=1).fit(module, lightning_data(), lightning_data(16))
    finally:
        real.remove()
    assert_state_matches(dict(module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)
    for kwargs, error, name in [
        (dict(decay=2.0), ValueError, "decay"),
        (dict(start=1.5), ValueError, "start"),
        (dict(start=-1), ValueError, "start"),
        (dict(validate_ema="yes"), TypeError, "validate_ema"),
        (dict(flatten_model="yes"), TypeError, "flatten_model"),
        (dict(nonsense=1), TypeError, "nonsense"),
        (dict(tensor_names="net.0.weight"), TypeError, "tensor_names"),
    ]:
        with pytest.raises(error, match=name):
            EMACallback(**kwargs)


LIGHTNING_DDP = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import lightning as L
    sys.path.insert(0, {tests!r})
    from fastema.lightning import EMACallback
    from test_trainers import lightning_data, lightning_trainer

    class Classifier(L.LightningModule):  # at module level: ddp_spawn pickles it
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)

    class Keep(L.Callback):
        def on_fit_end(self, trainer, pl_module):
            (ema,) = [callback for callback in trainer.callbacks if isinstance(callback, EMACallback)]
            state = {{"ema": dict(ema.module.state_dict()), "updates": ema.engine.num_updates,
                      "model": dict(pl_module.state_dict())}}
            torch.save(state, {out!r} + f"/rank{{trainer.global_rank}}.pt")

    if __name__ == "__main__":
        torch.set_num_threads(1)
        torch.manual_seed(0)
        trainer = lightning_trainer([EMACallback(decay=0.8), Keep()], strategy="ddp_spawn", devices=2, max_epochs=2)
        trainer.fit(Classifier(), lightning_data())
    """
)


@pytest.mark.distributed
def test_lightning_ddp_spawn_keeps_the_ema_identical_on_both_ranks(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(LIGHTNING_DDP.format(tests=str(TESTS), out=str(tmp_path)))
    subprocess.run([sys.executable, str(script)], check=True, timeout=180, capture_output=True, cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 8  # 2 epochs of 4 batches per rank
    for name, value in ranks[0]["ema"].items():
        if "running" not in name and "num_batches" not in name:  # BatchNorm statistics are each rank's own
            assert torch.equal(ranks[1]["ema"][name], value), name
    assert not torch.equal(ranks[0]["ema"]["net.0.weight"], ranks[0]["model"]["net.0.weight"])


# ---- Hugging Face Trainer ------------------------------------------------------------------------------


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (n, 12), generator=generator)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def hf_trainer(model, callback, output_dir, **kwargs):
    from transformers import Trainer, TrainingArguments

    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    options.update(kwargs)
    return Trainer(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=Tokens(),
        eval_dataset=Tokens(8, seed=1),
        callbacks=[callback],
    )


def test_hf_trainer_ema_matches_the_reference_once_per_optimizer_step(tmp_path):
    from fastema.transformers import EMACallback

    model = tiny_bert()
    callback = EMACallback(decay=0.8, start=2)
    real = RealSteps(model, 0.8, start=2)
    try:
        hf_trainer(model, callback, tmp_path).train()  # 8 optimizer steps of 2 accumulated batches
    finally:
        real.remove()
    assert real.steps == 8 and callback.engine.num_updates == 6
    assert_state_matches(dict(callback.module.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)


def test_hf_trainer_evaluates_with_the_ema_and_saves_it_with_each_checkpoint(tmp_path):
    from fastema.transformers import EMA_CHECKPOINT_NAME, EMACallback

    model = tiny_bert()
    callback = EMACallback(decay=0.8)
    trainer = hf_trainer(
        model, callback, tmp_path, eval_strategy="steps", eval_steps=8, save_strategy="steps", save_steps=4
    )
    trainer.train()
    during = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    separate = hf_trainer(callback.module, EMACallback(), tmp_path / "separate").evaluate()["eval_loss"]
    assert during == [pytest.approx(separate, rel=1e-6)]  # the evaluation in training was the EMA's
    assert trainer.evaluate()["eval_loss"] != pytest.approx(separate, rel=1e-6)  # afterwards: the model's own
    for step in (4, 8):
        saved = torch.load(tmp_path / f"checkpoint-{step}" / EMA_CHECKPOINT_NAME, weights_only=True)
        assert saved["global_step"] == step and saved["ema"]["engine"]["num_updates"] == step


def test_hf_trainer_resume_from_checkpoint_is_bit_identical(tmp_path):
    from fastema.transformers import EMACallback

    straight = EMACallback(decay=0.8)
    hf_trainer(tiny_bert(), straight, tmp_path / "straight").train()
    first = EMACallback(decay=0.8)
    interrupted = hf_trainer(tiny_bert(), first, tmp_path / "run", save_strategy="steps", save_steps=4)
    interrupted.train()
    resumed = EMACallback(decay=0.8)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    hf_trainer(tiny_bert(), resumed, tmp_path / "run").train(resume_from_checkpoint=str(checkpoint))
    assert resumed.engine.num_updates == straight.engine.num_updates == 8
    for name, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name


def test_hf_trainer_evaluates_every_eval_dataset_with_the_ema_and_restores_after_an_error(tmp_path):
    from fastema.transformers import EMACallback

    model = tiny_bert()
    callback = EMACallback(decay=0.8)
    trainer = hf_trainer(model, callback, tmp_path, eval_strategy="steps", eval_steps=8)
    trainer.eval_dataset = {"a": Tokens(8, seed=1), "b": Tokens(8, seed=2)}
    trainer.train()
    logged = {key: value for entry in trainer.state.log_history for key, value in entry.items() if "_loss" in key}
    separate = hf_trainer(callback.module, EMACallback(), tmp_path / "separate")
    for name, seed in (("a", 1), ("b", 2)):
        expected = separate.evaluate(Tokens(8, seed=seed))["eval_loss"]
        assert logged[f"eval_{name}_loss"] == pytest.approx(expected, rel=1e-6), name

    def failing_metrics(prediction):
        raise RuntimeError("metrics failed")

    model, failing = tiny_bert(), EMACallback(decay=0.8)
    trainer = hf_trainer(model, failing, tmp_path / "failing", eval_strategy="steps", eval_steps=4)
    trainer.compute_metrics = failing_metrics
    real = RealSteps(model, 0.8)
    try:
        with pytest.raises(RuntimeError, match="metrics failed"):
            trainer.train()
    finally:
        real.remove()
    for name, value in model.state_dict().items():  # its own weights after the last step, not the EMA's
        assert torch.equal(value, real.weights[name]), name
    assert real.steps == 4 and not failing.engine.ema_weights_in_use


def test_hf_trainer_resumes_the_ema_from_the_folder_it_is_given(tmp_path):
    from fastema.transformers import EMACallback

    straight = EMACallback(decay=0.8)
    hf_trainer(tiny_bert(), straight, tmp_path / "straight").train()
    hf_trainer(tiny_bert(), EMACallback(decay=0.8), tmp_path / "elsewhere", save_strategy="steps", save_steps=4).train()
    # The new output_dir holds an unrelated checkpoint-4; the one resumed from is elsewhere.
    hf_trainer(
        tiny_bert(), EMACallback(decay=0.5), tmp_path / "new", max_steps=4, save_strategy="steps", save_steps=4
    ).train()
    resumed = EMACallback(decay=0.8)
    hf_trainer(tiny_bert(), resumed, tmp_path / "new").train(
        resume_from_checkpoint=str(tmp_path / "elsewhere" / "checkpoint-4")
    )
    for name, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name


def test_hf_resume_without_an_ema_file_warns_and_a_file_of_another_step_raises(tmp_path):
    import shutil

    from fastema.transformers import EMA_CHECKPOINT_NAME, EMACallback

    hf_trainer(tiny_bert(), EMACallback(decay=0.8), tmp_path, save_strategy="steps", save_steps=4).train()
    (tmp_path / "checkpoint-4" / EMA_CHECKPOINT_NAME).unlink()
    with pytest.warns(UserWarning, match="without an EMA checkpoint"):
        hf_trainer(tiny_bert(), EMACallback(decay=0.8), tmp_path).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-4")
        )
    shutil.copy(tmp_path / "checkpoint-8" / EMA_CHECKPOINT_NAME, tmp_path / "checkpoint-4" / EMA_CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="written at step 8, resuming at 4"):
        hf_trainer(tiny_bert(), EMACallback(decay=0.8), tmp_path).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-4")
        )


def test_hf_resume_refuses_an_ema_saved_with_another_update_every_and_changes_nothing(tmp_path):
    from fastema.transformers import EMACallback

    hf_trainer(
        tiny_bert(), EMACallback(decay=0.8, update_every=2), tmp_path, save_strategy="steps", save_steps=4
    ).train()
    model = tiny_bert()
    callback = EMACallback(decay=0.8)  # update_every=1: the saved counts would mean something else
    with pytest.raises(ValueError, match=r"update_every 2 != 1"):
        hf_trainer(model, callback, tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert callback.engine is None or callback.engine.num_updates == 0


def test_hf_replace_weights_puts_the_ema_into_the_model(tmp_path):
    from fastema.transformers import EMACallback

    model = tiny_bert()
    callback = EMACallback(decay=0.8, replace_weights=True)
    real = RealSteps(model, 0.8)
    try:
        hf_trainer(model, callback, tmp_path).train()
    finally:
        real.remove()
    assert_state_matches(dict(model.state_dict()), real.reference.state, rtol=1e-5, atol=1e-6)


def test_hf_validate_ema_false_evaluates_the_model_s_own_weights(tmp_path):
    from fastema.transformers import EMACallback

    trainer = hf_trainer(
        tiny_bert(), EMACallback(decay=0.8, validate_ema=False), tmp_path, eval_strategy="steps", eval_steps=8
    )
    trainer.train()
    (during,) = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert during == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)


def test_hf_load_best_model_at_end_gives_the_ema_saved_with_the_best_checkpoint(tmp_path):
    from fastema.transformers import EMA_CHECKPOINT_NAME, EMACallback

    callback = EMACallback(decay=0.8)
    trainer = hf_trainer(
        tiny_bert(),
        callback,
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst, on purpose
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-8"  # not the last: the EMA must come from there
    saved = torch.load(best / EMA_CHECKPOINT_NAME, weights_only=True)["ema"]["engine"]
    for name, value in saved["tensors"].items():
        assert torch.equal(callback.module.state_dict()[name], value), name

    (best / EMA_CHECKPOINT_NAME).unlink()  # a best checkpoint written without the EMA (by another run, say)
    trainer.remove_callback(callback)
    callback = EMACallback(decay=0.8)
    trainer.add_callback(callback)
    with pytest.warns(UserWarning, match="holds no EMA"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def test_hf_hyperparameter_search_keeps_each_trial_s_ema_in_the_trial_s_checkpoints(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fastema.transformers import EMA_CHECKPOINT_NAME, EMACallback

    class KeepEachTrialsEMA(TrainerCallback):
        def __init__(self):
            self.emas = []

        def on_train_end(self, args, state, control, **kwargs):
            self.emas.append({name: t.clone() for name, t in ema.module.state_dict().items()})

    ema, keep = EMACallback(decay=0.8), KeepEachTrialsEMA()
    trainer = Trainer(
        model_init=tiny_bert,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=4,
            save_strategy="steps",
            save_steps=4,
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            seed=0,
            eval_strategy="no",
        ),
        train_dataset=Tokens(),
        eval_dataset=Tokens(8, seed=1),  # each trial ends with an evaluation
        callbacks=[ema, keep],
    )
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        compute_objective=lambda metrics: 0.0,
        n_trials=2,
        direction="minimize",
        backend="optuna",
    )
    assert not (tmp_path / "checkpoint-4").exists()  # nothing written outside the trials' folders
    for trial, expected in enumerate(keep.emas):
        saved = torch.load(tmp_path / f"run-{trial}" / "checkpoint-4" / EMA_CHECKPOINT_NAME, weights_only=True)
        for name, value in saved["ema"]["engine"]["tensors"].items():
            assert torch.equal(value, expected[name]), (trial, name)
    assert not torch.equal(keep.emas[0]["bert.pooler.dense.weight"], keep.emas[1]["bert.pooler.dense.weight"])


def test_hf_never_started_warns_and_save_pretrained_raises(tmp_path):
    from fastema.transformers import EMACallback

    callback = EMACallback(decay=0.8, start=100, tensor_names=["classifier.weight", "classifier.bias"])
    with pytest.warns(UserWarning, match="before start"):
        hf_trainer(tiny_bert(), callback, tmp_path).train()
    with pytest.raises(RuntimeError, match="has not started"):
        callback.save_pretrained(tmp_path / "never")
    assert callback.engine.tensor_names == ["classifier.weight", "classifier.bias"]
    with pytest.raises(TypeError, match="resume_from"):
        EMACallback(resume_from=123)


def test_hf_save_pretrained_writes_the_ema_model_also_when_flattened(tmp_path):
    from transformers import BertForSequenceClassification

    from fastema.transformers import EMACallback

    for flatten in (False, True):
        callback = EMACallback(decay=0.8, flatten_model=flatten)
        hf_trainer(tiny_bert(), callback, tmp_path / f"run{flatten}").train()
        callback.save_pretrained(tmp_path / f"ema{flatten}")
        loaded = BertForSequenceClassification.from_pretrained(tmp_path / f"ema{flatten}")
        for name, value in callback.module.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name


HF_DDP = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from fastema import transformers as integration
    from fastema.transformers import EMACallback
    from test_trainers import hf_trainer, tiny_bert

    writes = []
    atomic_save = integration.atomic_save
    integration.atomic_save = lambda obj, path: writes.append(str(path)) or atomic_save(obj, path)
    torch.set_num_threads(1)
    callback = EMACallback(decay=0.8)
    trainer = hf_trainer(tiny_bert(), callback, {out!r}, ddp_backend="gloo", save_strategy="steps", save_steps=4,
                         max_steps=4)
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save({{"ema": dict(callback.module.state_dict()), "updates": callback.engine.num_updates, "writes": writes}},
               {out!r} + f"/rank{{rank}}.pt")
    """
)


@pytest.mark.distributed
def test_hf_trainer_under_torchrun_keeps_the_ema_identical_and_rank0_writes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(HF_DDP.format(tests=str(TESTS), out=str(tmp_path)))
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    subprocess.run(command, check=True, timeout=180, capture_output=True, cwd=tmp_path, env=environment)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 4
    for name, value in ranks[0]["ema"].items():
        assert torch.equal(ranks[1]["ema"][name], value), name
    assert [p.name for p in (tmp_path / "checkpoint-4").glob("fastema_ema.pt")] == ["fastema_ema.pt"]
    assert len(ranks[0]["writes"]) == 1 and ranks[1]["writes"] == []  # rank 0 wrote it
