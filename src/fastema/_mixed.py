"""The mixed-precision step: an EMA kept in a wider dtype than the model (float32 EMA of a bfloat16 model).

`lerp_` needs both sides in one dtype, and converting the whole model every step would allocate
a model-sized tensor. Instead, a fixed staging buffer in the EMA's dtype, allocated once, takes
the model's elements a chunk at a time: per chunk, one conversion copy into the staging buffer
and one `lerp_` into the EMA. With chunks that stay in cache the step costs about what one
`lerp_` over the EMA costs; nothing is allocated per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._foreach import Kernel, copy_fused, copy_loop, is_averaged, is_dense, lerp_fused, lerp_loop

# Elements per staging buffer: 4 MiB of float32 stays in a CPU core's L2/L3; a GPU gets 16 MiB (its L2).
STAGING_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_STAGING_ELEMENTS = 1 << 22


def flat_view(tensor: Tensor) -> Tensor | None:
    """`tensor`'s elements as one 1-D view in memory order, or None if they are not one gap-free block."""
    if tensor.numel() == 0 or not is_dense(tensor):
        return None
    return tensor.detach().as_strided((tensor.numel(),), (1,), tensor.storage_offset())


class StagedGroup:
    """EMA and model tensors on one device in different floating dtypes, updated through a staging buffer."""

    def __init__(self, ema_tensors: Sequence[Tensor], model_tensors: Sequence[Tensor], fused: bool) -> None:
        device, dtype = ema_tensors[0].device, ema_tensors[0].dtype
        if not (is_averaged(ema_tensors[0]) and is_averaged(model_tensors[0])):
            raise TypeError(f"StagedGroup averages floating tensors, got {dtype} and {model_tensors[0].dtype}")
        self.copy: Kernel = copy_fused if fused else copy_loop
        self.lerp: Kernel = lerp_fused if fused else lerp_loop
        chunk = STAGING_ELEMENTS.get(device.type, DEFAULT_STAGING_ELEMENTS)
        # Pieces: (EMA, model) 1-D views of at most `chunk` elements, in the same memory order on both sides.
        pieces: list[tuple[Tensor, Tensor]] = []
        self.unstaged: list[tuple[Tensor, Tensor]] = []  # pairs without a shared flat layout (rare)
        for ema_tensor, model_tensor in zip(ema_tensors, model_tensors, strict=True):
            ema_flat, model_flat = flat_view(ema_tensor), flat_view(model_tensor)
            if ema_flat is None or model_flat is None or ema_tensor.stride() != model_tensor.stride():
                self.unstaged.append((ema_tensor, model_tensor))
                continue
            for begin in range(0, ema_flat.numel(), chunk):
                pieces.append((ema_flat[begin : begin + chunk], model_flat[begin : begin + chunk]))
        total = sum(ema_piece.numel() for ema_piece, _ in pieces)
        self.staging = torch.empty(min(total, chunk), device=device, dtype=dtype)
        # Batches: consecutive pieces that fit the staging buffer together (one copy + one lerp launch each).
        self.batches: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []
        used = chunk
        for ema_piece, model_piece in pieces:
            if used + ema_piece.numel() > chunk:
                self.batches.append(([], [], []))
                used = 0
            ema_batch, model_batch, staging_batch = self.batches[-1]
            ema_batch.append(ema_piece)
            model_batch.append(model_piece)
            staging_batch.append(self.staging[used : used + ema_piece.numel()])
            used += ema_piece.numel()

    def step(self, weight: float) -> None:
        """Move every EMA tensor of the group toward the model by `weight` (= 1 - decay)."""
        for ema_batch, model_batch, staging_batch in self.batches:
            self.copy(staging_batch, model_batch, weight)  # converts to the EMA's dtype
            self.lerp(ema_batch, staging_batch, weight)
        for ema_tensor, model_tensor in self.unstaged:
            ema_tensor.lerp_(model_tensor.to(ema_tensor.dtype), weight)  # allocates one tensor, never the model
