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
