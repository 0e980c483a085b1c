"""The EMA's length in samples: `half_life` and `batch_size` give the decay `0.5 ** (B / H)` per step, the same
EMA per sample at any batch size (the EMA scaling rule), and a resume at another batch size follows the rule."""

import logging

import pytest
import torch
from torch import nn

from fastema import ModelEMA
from helpers import ToyNet, assert_matches_reference
from reference import ReferenceEMA, expected_tracked


class Weights(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, dtype=torch.float64))


def weights_after(samples: int) -> torch.Tensor:
    """The model's weights after `samples` samples: constant over each block of 32 samples, then a jump."""
    block = samples // 32
    return torch.tensor([block % 5, (block * 7) % 3, block / 10], dtype=torch.float64)


def ema_after(total_samples: int, batch_size: int, **options) -> torch.Tensor:
    model = Weights()
    ema = ModelEMA(model, batch_size=batch_size, **options)
    for step in range(1, total_samples // batch_size + 1):
        with torch.no_grad():
            model.weight.copy_(weights_after(step * batch_size - 1))  # what the step's last sample left
        ema.update()
    return ema.module.weight.detach()


def test_half_life_gives_the_same_ema_per_sample_at_batch_8_and_batch_32():
    by_samples = dict(half_life=200.0)
    at_8, at_32 = ema_after(2048, 8, **by_samples), ema_after(2048, 32, **by_samples)
    # The model holds still within each 32-sample block: four updates of 0.5 ** (8 / H) are one of 0.5 ** (32 / H).
    torch.testing.assert_close(at_8, at_32, rtol=1e-12, atol=1e-12)
    assert ModelEMA(Weights(), half_life=200, batch_size=32).decay == pytest.approx(0.5 ** (32 / 200), rel=1e-15)
    # A decay fixed per step instead averages four times as many samples at batch 32: far from the same EMA.
    model = Weights()
    decay = 0.5 ** (8 / 200)
    fixed = [ModelEMA(model, decay), ModelEMA(model, decay)]
    for samples, (ema, batch) in ((2048, (fixed[0], 8)), (2048, (fixed[1], 32))):
        for step in range(1, samples // batch + 1):
            with torch.no_grad():
                model.weight.copy_(weights_after(step * batch - 1))
            ema.update()
    assert (fixed[0].module.weight - fixed[1].module.weight).abs().max() > 0.1


@pytest.mark.parametrize("update_every", [1, 3])
def test_half_life_decay_matches_the_reference_and_update_every_covers_its_steps(update_every):
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, half_life=64, batch_size=8, update_every=update_every)
    reference = ReferenceEMA(expected_tracked(model))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 10):
        model(torch.randn(8, 8, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        if step % update_every == 0:
            reference.update(expected_tracked(model), 0.5 ** (8 * update_every / 64))
    assert_matches_reference(ema, reference, rtol=1e-5, atol=1e-7)


def test_a_resume_that_doubles_the_batch_follows_decay_squared_and_says_so(tmp_path, caplog):
    torch.manual_seed(0)
    model = ToyNet()
    ema = ModelEMA(model, half_life=100, batch_size=8)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ema.update()
    ema.save(tmp_path / "ema.pt")
    resumed = ModelEMA(model, half_life=100, batch_size=16)
    with caplog.at_level(logging.WARNING, logger="fastema"):
        resumed.load(tmp_path / "ema.pt")
    assert resumed.decay == pytest.approx(ema.decay**2, rel=1e-14)
    assert "batch size 16 (saved with 8)" in caplog.text and "decay ** 2" in caplog.text
    reference = ReferenceEMA(dict(resumed.module.state_dict()))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    resumed.update()
    reference.update(expected_tracked(model), ema.decay**2)
    assert_matches_reference(resumed, reference, rtol=1e-6, atol=1e-8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastema"):
        ModelEMA(model, half_life=100, batch_size=8).load(tmp_path / "ema.pt")  # the same batch: nothing to say
    assert not caplog.text


def test_half_life_and_decay_are_exclusive_and_checked():
    model = Weights()
    with pytest.raises(ValueError, match=r"Invalid decay: 0\.99 together with half_life"):
        ModelEMA(model, 0.99, half_life=100, batch_size=8)
    with pytest.raises(ValueError, match="Invalid batch_size: None"):
        ModelEMA(model, half_life=100)
    with pytest.raises(ValueError, match="used only with half_life"):
        ModelEMA(model, batch_size=8)
    with pytest.raises(ValueError, match="Invalid half_life"):
        ModelEMA(model, half_life=0, batch_size=8)
    with pytest.raises(TypeError, match="Invalid batch_size"):
        ModelEMA(model, half_life=10, batch_size="8")
    assert ModelEMA(model).decay == 0.9998  # no decay, no half-life: the default
    state = ModelEMA(model, half_life=10, batch_size=2).state_dict()
    assert (state["half_life"], state["batch_size"]) == (10.0, 2.0)


# ---- through the integrations: the global batch each one knows --------------------------------------------


def test_fastai_derives_the_global_batch_with_gradient_accumulation_and_resumes_at_another(tmp_path, caplog):
    from fastai.callback.training import GradientAccumulation

    from fastema import EMACallback
    from helpers import make_learner

    callback = EMACallback(half_life=64)
    learn = make_learner(cbs=[callback, GradientAccumulation(n_acc=16)], path=tmp_path)  # bs 8, two batches a step
    learn.fit(1)
    assert callback.engine.length.batch_size == 16 and callback.engine.decay == pytest.approx(0.5 ** (16 / 64))
    assert callback.engine.num_updates == 4
    learn.save("run")
    bigger = make_learner(cbs=[EMACallback(half_life=64), GradientAccumulation(n_acc=32)], path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastema"):
        bigger.load("run")
    assert "batch size 32 (saved with 16)" in caplog.text
    with pytest.raises(ValueError, match="together with half_life"):
        EMACallback(0.99, half_life=64)


def test_lightning_derives_the_global_batch():
    from fastema.lightning import EMACallback
    from test_trainers import lightning_data, lightning_module, lightning_trainer

    callback = EMACallback(half_life=64)
    trainer = lightning_trainer([callback], max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(lightning_module(), lightning_data(), lightning_data(16))
    assert callback.engine.length.batch_size == 16 and callback.engine.decay == pytest.approx(0.5 ** (16 / 64))
    assert callback.engine.num_updates == 4


def test_hf_trainer_derives_the_global_batch(tmp_path):
    from fastema.transformers import EMACallback
    from test_trainers import hf_trainer, tiny_bert

    callback = EMACallback(half_life=64)
    hf_trainer(tiny_bert(), callback, tmp_path, max_steps=2).train()  # 4 per device x 2 accumulated x 1 process
    assert callback.engine.length.batch_size == 8 and callback.engine.decay == pytest.approx(0.5 ** (8 / 64))
    tokens = EMACallback(half_life=4096, batch_size=96)  # a length in tokens: the batch given in tokens
    hf_trainer(tiny_bert(), tokens, tmp_path / "tokens", max_steps=1).train()
    assert tokens.engine.decay == pytest.approx(0.5 ** (96 / 4096))
