"""The warning for an EMA whose updates round to nothing in its dtype (a bf16 EMA with decay 0.9999 stalls)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor


class Underflow:
    """Per EMA dtype, the update weight (1 - decay) below which an update mostly rounds to nothing; warns once each.

    Updates below the weight round to nothing when the model is within 10% of the EMA:
    |weight * 0.1 * ema| < half a unit in the last place, so the threshold is 5 eps of the dtype.
    """

    def __init__(self, ema_tensors: Iterable[Tensor]) -> None:
        self.thresholds = {
            tensor.dtype: 5 * torch.finfo(tensor.dtype).eps for tensor in ema_tensors if tensor.is_floating_point()
        }
        self.weight = max(self.thresholds.values(), default=0.0)  # the one comparison on the hot path

    def warn(self, decay: float, weight: float, update_every: int) -> None:
        """Warn that updates of `weight` stall the dtypes whose threshold is above it (each dtype once)."""
        stalled = [dtype for dtype, threshold in self.thresholds.items() if weight < threshold]
        narrow = any(torch.finfo(dtype).bits < 32 for dtype in stalled)
        remedy = "Keep it in float32 with ema_dtype=torch.float32" if narrow else "Use ema_dtype=torch.float64"
        warnings.warn(
            f"EMA updates with decay={decay} (update_every={update_every}) mostly round to nothing in "
            f"{', '.join(sorted(map(str, stalled)))}: the EMA will barely move. {remedy}, or a smaller decay.",
            UserWarning,
            stacklevel=5,  # Underflow.warn <- Counts._update_eagerly <- Counts.update <- ModelEMA.update <- caller
        )
        self.thresholds = {dtype: threshold for dtype, threshold in self.thresholds.items() if weight >= threshold}
        self.weight = max(self.thresholds.values(), default=0.0)
