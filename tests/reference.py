"""The oracle: a plain float64 for-loop EMA. It must never import fastema."""

from __future__ import annotations

from torch import Tensor, nn


def snapshot(tensor: Tensor) -> Tensor:
    """A detached CPU copy; floating tensors in float64."""
    tensor = tensor.detach().cpu()
    return tensor.double().clone() if tensor.is_floating_point() else tensor.clone()


def expected_tracked(model: nn.Module, all_parameters: bool = False, all_buffers: bool = False) -> dict[str, Tensor]:
    """Which tensors an EMA should average, decided from the model's own bookkeeping."""
    persistent = set(model.state_dict().keys())
    tensors = {name: p for name, p in model.named_parameters() if all_parameters or p.requires_grad}
    for name, buffer in model.named_buffers():
        if all_buffers or name in persistent:
            tensors[name] = buffer
    return tensors


class ReferenceEMA:
    """ema = decay * ema + (1 - decay) * model in float64, one tensor at a time; counts are copied."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.state = {name: snapshot(tensor) for name, tensor in tensors.items()}
        self.num_updates = 0

    def update(self, tensors: dict[str, Tensor], decay: float) -> None:
        for name, tensor in tensors.items():
            current = snapshot(tensor)
            if current.is_floating_point():
                self.state[name] = decay * self.state[name] + (1.0 - decay) * current
            else:
                self.state[name] = current
        self.num_updates += 1


class ReferenceBEMA:
    """BEMA (Block & Zhang, 2025, arXiv 2508.00180) in float64, one tensor at a time, from the paper's formulas.

    `step(tensors)` after every optimizer step that happened (s = 1, 2, ...). At s = update_after:
    theta_0 = EMA = theta. For t = s - update_after > 0 and a multiple of update_every, with x = lag +
    multiplier * t: beta = max(x ** -ema_power, min_ema_multiplier), EMA = (1 - beta) EMA + beta theta,
    alpha = x ** -bias_power, BEMA = EMA + alpha (theta - theta_0). Before update_after the BEMA weights are
    the model's; integer tensors are the model's at the last update.
    """

    def __init__(self, tensors, ema_power=0.5, bias_power=0.2, lag=10, multiplier=1.0, min_ema_multiplier=0.0,
                 update_after=0, update_every=1):  # fmt: skip
        self.ema_power, self.bias_power, self.lag, self.multiplier = ema_power, bias_power, lag, multiplier
        self.min_ema_multiplier, self.update_after, self.update_every = min_ema_multiplier, update_after, update_every
        self.theta0 = {name: snapshot(tensor) for name, tensor in tensors.items()}
        self.ema = dict(self.theta0)
        self.state = dict(self.theta0)  # the BEMA weights
        self.steps = self.num_updates = 0

    def step(self, tensors: dict[str, Tensor]) -> None:
        self.steps += 1
        theta = {name: snapshot(tensor) for name, tensor in tensors.items()}
        t = self.steps - self.update_after
        if t < 0:
            self.state = theta
        elif t == 0:
            self.theta0, self.ema, self.state = dict(theta), dict(theta), dict(theta)
        elif t % self.update_every == 0:
            x = self.lag + self.multiplier * t
            beta = max(x**-self.ema_power, self.min_ema_multiplier)
            alpha = x**-self.bias_power
            for name, value in theta.items():
                if value.is_floating_point():
                    self.ema[name] = (1.0 - beta) * self.ema[name] + beta * value
                    self.state[name] = self.ema[name] + alpha * (value - self.theta0[name])
                else:
                    self.ema[name] = self.state[name] = value
            self.num_updates += 1
