"""Hugging Face `Trainer`: `fastema.transformers.EMACallback`, an EMA of the model's weights.

    trainer = Trainer(model, args, ..., callbacks=[EMACallback(decay=0.9999)])

Updates after every optimizer step that really happened (gradient accumulation and AMP's
skipped steps respected: it hooks the optimizer's steps, or with DeepSpeed the engine's applied
steps; under ZeRO-3 the EMA keeps this rank's partitions), evaluates with the EMA weights
swapped into the model in place during training, saves the EMA's state into each checkpoint
folder (`fastema_ema.pt`, rank 0) and restores it on `trainer.train(resume_from_checkpoint=...)`,
so a resumed run continues the same EMA. Importing `fastema` does not import transformers;
this module does.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, cast

from ._extras import missing_extra

try:
    from transformers import Trainer, TrainerCallback
except ModuleNotFoundError as error:
    raise missing_extra(error, "transformers", "fastema.transformers") from error

from ._trainer import BEMAFactory, ModelEMAFactory, StepDrivenCallback, StepDrivenEMA
from .core.checkpoint import atomic_save, read_checkpoint
from .core.schedules import DecayWarmup, SwitchEMA

__all__ = ["BEMA_CHECKPOINT_NAME", "EMA_CHECKPOINT_NAME", "BEMACallback", "EMACallback"]

EMA_CHECKPOINT_NAME = "fastema_ema.pt"
BEMA_CHECKPOINT_NAME = "fastema_bema.pt"


def _training_loop() -> tuple[Any, object]:
    """The running `Trainer` and the `resume_from_checkpoint` it was given, from the training loop's frame.

    Callbacks are not given the Trainer; its `_inner_training_loop` is on the stack when it
    calls `on_train_begin`. (None, None) if the frame is not found (another Trainer subclass).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and isinstance(frame.f_locals.get("self"), Trainer):
            return frame.f_locals["self"], frame.f_locals.get("resume_from_checkpoint")
        frame = frame.f_back  # type: ignore[assignment]  # None ends the loop
    return None, None


def _run_folder(trainer: Any, args: Any) -> Path:
    """Where the running trainer puts its `checkpoint-N` folders: under hyperparameter search, the trial's own."""
    output_dir = getattr(trainer, "_get_output_dir", None)
    if callable(output_dir):
        return Path(output_dir(trial=getattr(trainer, "_trial", None)))
    return Path(args.output_dir)


class EMACallback(StepDrivenCallback, TrainerCallback):
    """An exponential moving average of the model's weights (a `ModelEMA`), for the Hugging Face `Trainer`."""

    checkpoint_name = EMA_CHECKPOINT_NAME
    half_life: float | None = None  # an EMA length in samples (the global batch is read when training begins)

    def __init__(
        self,
        decay: float | None = None,  # each update keeps `decay` of the EMA and moves the rest; None: 0.9998
        start: int | float = 0,  # optimizer steps before the EMA starts (int), or a fraction of all steps (float)
        warmup: DecayWarmup | None = None,  # the decay as a function of the update count, e.g. InverseGammaWarmup()
        validate_ema: bool = True,  # evaluate with the EMA weights during training (swapped in place)
        replace_weights: bool = False,  # at the end of training, copy the EMA into the model
        resume_from: str | os.PathLike | None = None,  # the checkpoint folder to resume the EMA from; None: the
        # one `train(resume_from_checkpoint=...)` resumes from
        half_life: float | None = None,  # the EMA's length in samples, instead of decay (see ModelEMA)
        switch_every: int | SwitchEMA | None = None,  # Switch EMA: copy the EMA into the model every N epochs
        **options: Any,  # ModelEMA's: all_parameters, all_buffers, foreach, device, flatten_model, ema_dtype, ...
    ) -> None:
        self._init(validate_ema, replace_weights, resume_from)
        self.half_life = half_life
        self.ema = StepDrivenEMA(ModelEMAFactory(decay, warmup, options, half_life), start, switch=switch_every)

    def _init(self, validate_ema: bool, replace_weights: bool, resume_from: str | os.PathLike | None) -> None:
        self._init_flags(validate_ema, replace_weights)
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(f"Invalid resume_from: {resume_from!r}; expected None or a checkpoint folder path")
        self.resume_from = None if resume_from is None else Path(resume_from)
        self._trainer: Any = None
        self._evaluate: Any = None  # the Trainer's own `_evaluate`, while ours wraps it
        self._run_folder: Path | None = None  # where this run's checkpoint folders go

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer, resume_from_checkpoint = _training_loop()
        self._run_folder = _run_folder(trainer, args)
        batch_size = None
        if self.half_life is not None:  # samples per optimizer step, all ranks together
            # train_batch_size: per device times the GPUs of one DataParallel process
            batch_size = float(args.train_batch_size * args.gradient_accumulation_steps * args.world_size)
        # With DeepSpeed the engine steps the weights (its optimizer is not a torch one): it is hooked itself.
        engine = getattr(trainer, "deepspeed", None)
        self.ema.begin(model, [optimizer if engine is None else engine], state.max_steps, state.global_step, batch_size)
        self._wrap_evaluation(trainer)
        if state.global_step > 0:  # resuming from a checkpoint: the EMA saved with it
            self._resume(args, state, resume_from_checkpoint)

    def _resume(self, args, state, resume_from_checkpoint) -> None:
        if self.resume_from is not None:
            folder = self.resume_from
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            folder = Path(resume_from_checkpoint)
        else:
            folder = self._checkpoint_folder(args, state)
        path = folder / self.checkpoint_name
        if not path.is_file():
            warnings.warn(
                f"Resuming at step {state.global_step} without an EMA checkpoint ({path} does not exist): the EMA "
                "starts again from the model's weights. Pass EMACallback(resume_from=checkpoint folder).",
                UserWarning,
                stacklevel=3,
            )
            return
        saved = read_checkpoint(path)
        if not isinstance(saved, dict) or saved.get("global_step") != state.global_step:
            raise ValueError(
                f"Invalid EMA checkpoint {path}: written at step "
                f"{saved.get('global_step') if isinstance(saved, dict) else None}, resuming at {state.global_step}"
            )
        self.ema.load_state_dict(saved["ema"], source=path)

    def _wrap_evaluation(self, trainer: Any) -> None:
        """Evaluate with the EMA during training: around the Trainer's whole in-training evaluation.

        Wrapping `Trainer._evaluate` (all eval datasets, then the metrics) puts the EMA in for all of
        them and takes it out in a `finally`, so an error in evaluation cannot leave it in the model,
        and the checkpoint saved right after holds the model's own weights.
        """
        self._unwrap_evaluation()
        if trainer is None or not callable(getattr(trainer, "_evaluate", None)):
            return
        original = trainer._evaluate

        def evaluate_with_ema(*args: Any, **kwargs: Any) -> Any:
            if self.validate_ema:
                self.ema.swap_in()
            try:
                return original(*args, **kwargs)
            finally:
                self.ema.swap_out()

        self._trainer, self._evaluate = trainer, original
        trainer._evaluate = evaluate_with_ema

    def _unwrap_evaluation(self) -> None:
        if self._trainer is not None:
            vars(self._trainer).pop("_evaluate", None)  # the class's method again
            self._trainer = self._evaluate = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._trainer is None and control.should_evaluate and self.validate_ema:
            self.ema.swap_in()  # without the Trainer's frame: the evaluation follows; `on_evaluate` swaps back

    def on_epoch_end(self, args, state, control, **kwargs):
        self.ema.end_epoch(round(state.epoch))  # before the epoch's evaluation and checkpoint
        if self._trainer is None and control.should_evaluate and self.validate_ema:
            self.ema.swap_in()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._trainer is None:
            self.ema.swap_out()

    def on_save(self, args, state, control, **kwargs):
        if self.ema.engine is None:
            return
        ema_state = self.ema.state_dict()  # on every rank: for a sharded (FSDP2) EMA it is a collective
        if state.is_world_process_zero:
            folder = self._checkpoint_folder(args, state)
            atomic_save({"global_step": state.global_step, "ema": ema_state}, folder / self.checkpoint_name)

    def _checkpoint_folder(self, args, state) -> Path:
        """The folder of the checkpoint the Trainer saves (or resumes) at this step."""
        return (self._run_folder or Path(args.output_dir)) / f"checkpoint-{state.global_step}"

    def on_train_end(self, args, state, control, **kwargs):
        self._unwrap_evaluation()
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None and self.ema.engine is not None:
            path = Path(best) / self.checkpoint_name
            if path.is_file():
                # The Trainer loaded the best checkpoint's model; the EMA saved with it is the one that scored.
                saved = read_checkpoint(path)
                self.ema.load_state_dict(cast(dict, saved)["ema"], source=path)  # still running: loaded now
            else:
                warnings.warn(
                    f"load_best_model_at_end: the Trainer loaded the best checkpoint {best}, which holds no EMA "
                    f"({self.checkpoint_name}); the EMA is the one of the last step, not the best checkpoint's",
                    UserWarning,
                    stacklevel=2,
                )
        self.ema.warn_if_not_started("EMACallback")
        self.ema.end(self.replace_weights)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """`save_pretrained` of the EMA model (a `PreTrainedModel`'s copy).

        With `flatten_model=True` the EMA's tensors share one buffer, which safetensors refuses;
        they are saved as separate copies then, so the files are the same as without it.
        """
        module: Any = self.ema.ema_module("EMACallback")  # raises before the EMA has started
        engine = self.ema.engine
        if engine.flatten_model:
            kwargs.setdefault("state_dict", {k: v.clone() for k, v in module.state_dict().items()})
        module.save_pretrained(save_directory, **kwargs)


class BEMACallback(EMACallback):
    """BEMA, the bias-corrected EMA (a `fastema.BEMA`), for the Hugging Face `Trainer`: as `EMACallback`, with its
    own checkpoint file (`fastema_bema.pt`). TRL's `BEMACallback` under the same name and hyperparameters, with
    `t` counted from `update_after`, updates every step by default, checkpoints and evaluations with BEMA weights."""

    checkpoint_name = BEMA_CHECKPOINT_NAME

    def __init__(
        self,
        ema_power: float = 0.5,  # kappa: the EMA's weight on the model is (lag + multiplier t) ** -kappa
        bias_power: float = 0.2,  # eta: the bias correction is (lag + multiplier t) ** -eta
        lag: float = 10,  # rho: the schedules' offset
        multiplier: float = 1.0,  # gamma: how fast the schedules age per step
        min_ema_multiplier: float = 0.0,  # a floor under the EMA's weight on the model
        update_after: int = 0,  # theta_0 is taken after this many optimizer steps (after `start`)
        update_every: int = 1,  # update when t is a multiple of this (TRL's update_freq)
        start: int | float = 0,  # optimizer steps before BEMA starts (int), or a fraction of all steps (float)
        validate_ema: bool = True,  # evaluate with the BEMA weights during training (swapped in place)
        replace_weights: bool = False,  # at the end of training, copy the BEMA weights into the model
        resume_from: str | os.PathLike | None = None,  # the checkpoint folder to resume from (see EMACallback)
        switch_every: int | SwitchEMA | None = None,  # Switch EMA with the BEMA weights, every N epochs
        **options: Any,  # BEMA's: all_parameters, all_buffers, foreach, device, flatten_model, ema_dtype
    ) -> None:
        self._init(validate_ema, replace_weights, resume_from)
        settings = dict(
            ema_power=ema_power,
            bias_power=bias_power,
            lag=lag,
            multiplier=multiplier,
            min_ema_multiplier=min_ema_multiplier,
            update_after=update_after,
            update_every=update_every,
        )
        self.ema = StepDrivenEMA(BEMAFactory({**settings, **options}), start, switch=switch_every)
