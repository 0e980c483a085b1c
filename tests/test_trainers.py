"""ModelEMA.attach, and the Lightning and Hugging Face Trainer callbacks, on real trainers, against the float64
reference counted on the optimizer steps that really happened (a global step hook of the test's own)."""

import os
import subprocess
import sys
import textwrap
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
    finally:
        real.remove()


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
    ],
    ids=["plain", "accumulate-2", "max-steps-start-3", "bf16-mixed", "16-mixed-skipped-steps"],
)
def test_lightning_ema_matches_the_reference_over_real_steps(kwargs, start, steps, poison_every):
    from fastema.lightning import EMACallback

    if kwargs.get("precision") == "16-mixed":  # on CPU Lightning turns "16-mixed" into bf16: its GPU plugin, by hand
        from lightning.pytorch.plugins import MixedPrecision

        scaler = torch.amp.GradScaler("cpu")
        kwargs = dict(plugins=[MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)])
    module = lightning_module(poison_every)
    callback = EMACallback(decay=0.8, start=start)
    real = RealSteps(module, 0.8, start=start)
    try:
        lightning_trainer([callback], **kwargs).fit(module, lightning_data(), lightning_data(16))
    finally:
        real.remove()
    assert real.steps == steps and callback.engine.num_updates == steps - start
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


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")  # resuming in place
def test_lightning_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastema.lightning import EMACallback

    def fit(max_epochs, ckpt_path=None, save_to=None):
        module, callback = lightning_module(), EMACallback(decay=0.8, start=5)
        callbacks = [callback] + ([ModelCheckpoint(dirpath=save_to, save_last=True)] if save_to else [])
        trainer = lightning_trainer(callbacks, max_epochs=max_epochs, enable_checkpointing=bool(save_to))
        trainer.fit(module, lightning_data(), lightning_data(16), ckpt_path=ckpt_path)
        return module, callback

    straight_model, straight = fit(4)
    fit(2, save_to=tmp_path / "first")
    resumed_model, resumed = fit(4, ckpt_path=tmp_path / "first" / "last.ckpt", save_to=tmp_path / "first")
    assert resumed.engine.num_updates == straight.engine.num_updates == 27
    for name, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name
    for name, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


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
    from fastema.transformers import EMACallback
    from test_trainers import hf_trainer, tiny_bert

    torch.set_num_threads(1)
    callback = EMACallback(decay=0.8)
    trainer = hf_trainer(tiny_bert(), callback, {out!r}, ddp_backend="gloo", save_strategy="steps", save_steps=4,
                         max_steps=4)
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save({{"ema": dict(callback.module.state_dict()), "updates": callback.engine.num_updates}},
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
