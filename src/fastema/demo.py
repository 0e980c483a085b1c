"""The demo behind `fastema demo` / `make demo`: raw vs EMA accuracy on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ._extras import require

DEMO_MODULES = ("matplotlib", "sklearn", "fastai")  # what `pip install "fastema[demo]"` brings


def _digits_dataloaders(batch_size: int, seed: int):
    from fastai.data.core import DataLoaders
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_valid = len(images) // 5
    valid, train = order[:n_valid], order[n_valid:]
    return DataLoaders.from_dsets(
        TensorDataset(images[train], labels[train]),
        TensorDataset(images[valid], labels[valid]),
        bs=batch_size,
        device=torch.device("cpu"),
    )


def _small_cnn() -> nn.Module:
    def block(n_in, n_out, stride):
        return nn.Sequential(nn.Conv2d(n_in, n_out, 3, stride, 1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU())

    return nn.Sequential(
        block(1, 32, 1),
        block(32, 64, 2),
        block(64, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _accuracy(model: nn.Module, dataloader) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in dataloader:
            correct += (model(images).argmax(dim=1) == labels).sum().item()
            total += len(labels)
    model.train(was_training)
    return correct / total


def run_demo(
    epochs: int = 12, lr: float = 0.03, output: Path | str = "demo_output/fastema-demo.png", seed: int = 0
) -> list[dict]:
    """Train with `EMASchedule`, print raw vs EMA validation accuracy per epoch, save a plot."""
    require("demo", "fastema demo", *DEMO_MODULES)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fastai.callback.core import Callback
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import Adam
    from fastai.torch_core import set_seed

    from .fastai.callbacks import EMASchedule

    class RawAndEMAAccuracy(Callback):
        order = EMASchedule.order + 1  # after the EMA has put the model's own weights back

        def before_fit(self):
            self.rows, self.decays = [], []

        def after_batch(self):
            if self.training:
                self.decays.append(self.learn.ema_schedule.decay)

        def after_epoch(self):
            engine = self.learn.ema_schedule.engine
            raw_weights = torch.cat([p.detach().flatten() for p in self.learn.model.parameters()])
            ema_weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
            self.rows.append(
                dict(
                    epoch=self.epoch,
                    raw=_accuracy(self.learn.model, self.dls.valid),
                    ema=_accuracy(engine.module, self.dls.valid),
                    gap=(ema_weights - raw_weights).abs().mean().item(),  # how far the EMA trails the weights
                )
            )

    set_seed(seed)  # Python's `random` too: fastai's DataLoader shuffles with it
    dls = _digits_dataloaders(batch_size=64, seed=seed)
    tracker = RawAndEMAAccuracy()
    ema = EMASchedule(start_decay=0.9, final_decay=0.99, start=0, finish=0.3)
    learn = Learner(
        dls, _small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=Adam, cbs=[ema, tracker]
    )
    print(
        f"Training a small CNN on scikit-learn digits for {epochs} epochs with {ema!r} "
        "(the 'accuracy' column is measured with the EMA weights)"
    )
    learn.fit(epochs, lr)  # a constant, rather high learning rate: the raw weights stay noisy

    print("\nepoch | raw accuracy | EMA accuracy | mean |EMA - raw| weight")
    for row in tracker.rows:
        print(f"{row['epoch']:5d} | {row['raw']:12.4f} | {row['ema']:12.4f} | {row['gap']:.5f}")
    tail = tracker.rows[-max(2, epochs // 2) :]
    if len(tail) >= 2:
        raw_std = torch.tensor([row["raw"] for row in tail]).std().item()
        ema_std = torch.tensor([row["ema"] for row in tail]).std().item()
        print(f"spread (std) of accuracy over the last {len(tail)} epochs: raw {raw_std:.4f}, EMA {ema_std:.4f}")

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure, (accuracy_axes, decay_axes) = plt.subplots(1, 2, figsize=(11, 4))
    epochs_axis = [row["epoch"] + 1 for row in tracker.rows]
    accuracy_axes.plot(epochs_axis, [row["raw"] for row in tracker.rows], "o-", label="raw model")
    accuracy_axes.plot(epochs_axis, [row["ema"] for row in tracker.rows], "s-", label="EMA")
    accuracy_axes.set(xlabel="epoch", ylabel="validation accuracy", title="Raw vs EMA weights (digits)")
    accuracy_axes.legend()
    decay_axes.plot(range(1, len(tracker.decays) + 1), tracker.decays)
    decay_axes.set(xlabel="training step", ylabel="ema_decay", title="EMASchedule warm-up (SchedCos)")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    print(f"plot written to {output.resolve()}")
    return tracker.rows


SWEEP = (0.01, 0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20, 0.25)


def run_posthoc_demo(
    epochs: int = 12, lr: float = 0.03, output: Path | str = "demo_output/fastema-demo.png", seed: int = 0
) -> list[dict[str, float]]:
    """Train once with `PostHocEMACallback`, then synthesize and validate EMAs of every length in `SWEEP`."""
    require("demo", "fastema demo --posthoc", *DEMO_MODULES)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import Adam
    from fastai.torch_core import set_seed

    from .fastai.posthoc import PostHocEMACallback

    set_seed(seed)
    output = Path(output)
    plot = output.with_name(output.stem + "-posthoc" + output.suffix)
    snapshots = output.parent / "posthoc-snapshots"
    for old in snapshots.glob("posthoc-step*-ema*.pt"):  # the demo's own directory: a rerun starts it afresh
        old.unlink()
    dls = _digits_dataloaders(batch_size=64, seed=seed)
    callback = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_dir=snapshots.resolve())
    learn = Learner(dls, _small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=Adam, cbs=callback)
    print(
        f"Training a small CNN on scikit-learn digits for {epochs} epochs, tracking power-function EMAs with "
        f"sigma_rel 0.05 and 0.10; a snapshot of each after every epoch in {snapshots}"
    )
    learn.fit(epochs, lr)
    raw_loss, raw_accuracy = learn.validate()
    rows = learn.posthoc_sweep(SWEEP, plot=plot)
    print("\nsigma_rel | valid_loss | accuracy   (the EMA of that length, synthesized after training)")
    for row in rows:
        print(f"{row['sigma_rel']:9.2f} | {row['valid_loss']:10.4f} | {row['accuracy']:8.4f}")
    best = min(rows, key=lambda row: row["valid_loss"])
    print(
        f"raw weights: valid_loss {raw_loss:.4f}, accuracy {raw_accuracy:.4f}; best EMA length: sigma_rel "
        f"{best['sigma_rel']:.2f} (valid_loss {best['valid_loss']:.4f}, accuracy {best['accuracy']:.4f})"
    )
    print(f"plot written to {plot.resolve()}")
    return rows
