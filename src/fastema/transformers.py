"""Hugging Face `Trainer`: `fastema.transformers.EMACallback`, an EMA of the model's weights.

    trainer = Trainer(model, args, ..., callbacks=[EMACallback(decay=0.9999)])

Updates after every optimizer step that really happened (gradient accumulation and AMP's
skipped steps respected: it hooks the optimizer's steps), evaluates with the EMA weights
swapped into the model in place during training, saves the EMA's state into each checkpoint
folder (`fastema_ema.pt`, rank 0) and restores it on `trainer.train(resume_from_checkpoint=...)`,
so a resumed run continues the same EMA. Importing `fastema` does not import transformers;
this module does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ._checks import check_flag
from ._trainer import ModelEMAFactory, StepDrivenEMA
from .checkpoint import atomic_save, read_checkpoint
from .engine import ModelEMA
from .schedules import DecayWarmup

__all__ = ["EMA_CHECKPOINT_NAME", "EMACallback"]

EMA_CHECKPOINT_NAME = "fastema_ema.pt"


class EMACallback(TrainerCallback):
    """An exponential moving average of the model's weights (a `ModelEMA`), for the Hugging Face `Trainer`."""

    def __init__(
        self,
        decay: float = 0.9998,  # each update keeps `decay` of the EMA and moves `1 - decay` toward the model
        start: int | float = 0,  # optimizer steps before the EMA starts (int), or a fraction of all steps (float)
        warmup: DecayWarmup | None = None,  # the decay as a function of the update count, e.g. InverseGammaWarmup()
        validate_ema: bool = True,  # evaluate with the EMA weights during training (swapped in place)
        replace_weights: bool = False,  # at the end of training, copy the EMA into the model
        resume_from: str | os.PathLike | None = None,  # the checkpoint folder to resume the EMA from; None: the
        # one `resume_from_checkpoint` names, output_dir/checkpoint-<step>
        **options: Any,  # ModelEMA's: all_parameters, all_buffers, foreach, device, flatten_model, ema_dtype, ...
    ) -> None:
        self.validate_ema = check_flag(validate_ema, "validate_ema")
        self.replace_weights = check_flag(replace_weights, "replace_weights")
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.ema = StepDrivenEMA(ModelEMAFactory(decay, warmup, options), start)

    @property
    def engine(self) -> ModelEMA | None:
        """The `ModelEMA` of the current (or last) training run."""
        return self.ema.engine

    @property
    def module(self) -> torch.nn.Module:
        """The EMA model."""
        if self.ema.engine is None:
            raise RuntimeError("EMACallback.module: no EMA yet; it is built when training begins")
        return self.ema.engine.module

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.ema.begin(model, [optimizer], state.max_steps)
        if state.global_step > 0:  # resuming from a checkpoint: the EMA saved with it
            folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = folder / EMA_CHECKPOINT_NAME
            if not path.is_file():
                warnings.warn(
                    f"Resuming at step {state.global_step} without an EMA checkpoint ({path} does not exist): the EMA "
                    "starts again from the model's weights. Pass EMACallback(resume_from=checkpoint folder).",
                    UserWarning,
                    stacklevel=2,
                )
                return
            saved = read_checkpoint(path)
            if not isinstance(saved, dict) or saved.get("global_step") != state.global_step:
                raise ValueError(
                    f"Invalid EMA checkpoint {path}: written at step "
                    f"{saved.get('global_step') if isinstance(saved, dict) else None}, resuming at {state.global_step}"
                )
            try:
                self.ema.load_state_dict(saved["ema"])
            except ValueError as error:
                raise ValueError(f"Invalid EMA checkpoint {path}: {error}") from error

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate and self.validate_ema:
            self.ema.swap_in()  # the Trainer evaluates right after this event; `on_evaluate` swaps back

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate and self.validate_ema:
            self.ema.swap_in()

    def on_evaluate(self, args, state, control, **kwargs):
        self.ema.swap_out()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.ema.engine is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_save({"global_step": state.global_step, "ema": self.ema.state_dict()}, folder / EMA_CHECKPOINT_NAME)

    def on_train_end(self, args, state, control, **kwargs):
        self.ema.end(self.replace_weights)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """`save_pretrained` of the EMA model (a `PreTrainedModel`'s copy).

        With `flatten_model=True` the EMA's tensors share one buffer, which safetensors refuses;
        they are saved as separate copies then, so the files are the same as without it.
        """
        engine = self.ema.engine
        if engine is None:
            raise RuntimeError("EMACallback.save_pretrained: no EMA yet; train first")
        if engine.flatten_model:
            kwargs.setdefault("state_dict", {k: v.clone() for k, v in engine.module.state_dict().items()})
        engine.module.save_pretrained(save_directory, **kwargs)
