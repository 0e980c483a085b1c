"""Code that runs inside the ranks of the DeepSpeed tests (2 spawned processes, gloo on CPU, DS_ACCELERATOR=cpu).

One launch runs every case, so DeepSpeed is imported and its communication extension loaded once per rank.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported, in the ranks too

import torch
import torch.distributed as dist
from torch import nn

from distributed_workers import DECAY, WORLD, Mlp, collective_recorder, ema_bytes
from reference import ReferenceEMA, expected_tracked, snapshot

STEPS = 6  # optimizer steps
ACCUMULATION = 2  # micro-batches per optimizer step
MICRO_BATCH = 2


def config(stage, precision="bf16", **zero):
    """A small DeepSpeed config for CPU: torch's Adam (no extension to build), no logging."""
    zero_optimization = {"stage": stage, **zero}
    if stage == 3:
        # The biases (<= 10 elements) stay gathered between steps (DeepSpeed's persistent parameters); the
        # weights are partitioned: both kinds must swap and gather.
        zero_optimization.setdefault("stage3_param_persistence_threshold", 10)
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "optimizer": {"type": "Adam", "params": {"lr": 0.05, "torch_adam": True}},
        precision: {"enabled": True, **({"initial_scale_power": 32} if precision == "fp16" else {})},
        "zero_optimization": zero_optimization,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def engine_of(stage, precision="bf16", seed=0, hidden=10, **zero):
    import deepspeed

    torch.manual_seed(seed)
    model = Mlp()
    if hidden != 10:
        model.layers[0], model.layers[2] = nn.Linear(6, hidden), nn.Linear(hidden, 5)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config(stage, precision, **zero)
    )
    return engine


def batches(rank, steps=STEPS, seed=1):
    """Each rank's own micro-batches: `steps` optimizer steps of `ACCUMULATION` micro-batches."""
    generator = torch.Generator().manual_seed(seed + rank)
    return [torch.randn(MICRO_BATCH, 6, generator=generator) for _ in range(steps * ACCUMULATION)]


def gathered(engine):
    """The engine's tracked tensors, full, as float64 CPU copies (a collective under ZeRO-3)."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {name: snapshot(tensor) for name, tensor in expected_tracked(module).items()}


def train(engine, xs, reference=None, on_step=None):
    """Micro-batches through the engine; after each applied optimizer step, the reference EMA moves."""
    for x in xs:
        loss = engine(x.to(next(iter(engine.parameters())).dtype)).float().square().mean()
        engine.backward(loss)
        engine.step()
        if engine.was_step_applied():  # an accumulation boundary, not skipped
            if reference is not None:
                reference.update(gathered(engine), DECAY)
            if on_step is not None:
                on_step()


def partitions(engine):
    """Every partition's bytes, padding included (its bits are whatever memory held: NaNs in a float view)."""
    return [p.ds_tensor.detach().clone().view(torch.uint8) for p in engine.module.parameters()]


def zero3_case(rank, out_dir):
    """Stage 3, bf16 engine, float32 EMA: shard-local updates, gathered state, swap, checkpoints, bad input."""
    from fastema import ModelEMA
    from fastema.deepspeed import consolidate_ema, load_checkpoint, load_ema, save_checkpoint

    engine = engine_of(3)
    ema = ModelEMA(engine, DECAY, ema_dtype=torch.float32)
    handle = ema.attach(engine)
    reference = ReferenceEMA(gathered(engine))
    # an EMA left at the model's weights, updated by hand once: the probe for collectives
    probe = ModelEMA(engine.module, DECAY, ema_dtype=torch.float32)
    xs = batches(rank)
    train(engine, xs[: 3 * ACCUMULATION], reference)
    checkpoint = os.path.join(out_dir, "ckpt")
    engine_save, ema_file = engine.save_checkpoint, f"fastema_ema_rank{rank}.pt"
    ema_before_engine = []  # whether this rank's EMA file was in the tag folder when the engine saved

    def recording_save(save_dir, tag, **kwargs):
        ema_before_engine.append(os.path.isfile(os.path.join(save_dir, tag, ema_file)))
        return engine_save(save_dir, tag, **kwargs)

    engine.save_checkpoint = recording_save
    saved_folder = save_checkpoint(engine, ema, checkpoint)  # after 3 steps
    del engine.save_checkpoint
    at_save = {name: tensor.clone() for name, tensor in ema.state_dict()["tensors"].items()}
    train(engine, xs[3 * ACCUMULATION :], reference)
    recorder = collective_recorder()
    with recorder() as update_collectives:
        probe.update()
    with recorder() as state_collectives:
        full = ema.state_dict()  # a collective: every rank gathers
    result = {
        "sharded": ema.sharded,
        "num_updates": ema.num_updates,
        "full": full["tensors"],
        "reference": reference.state,
        "update_collectives": update_collectives.names,
        "state_collectives": state_collectives.names,
        "bytes": ema_bytes(ema),
        "dtypes": sorted({str(t.dtype) for t in ema._tracker.binding.ema_tensors}),
    }
    # A full EMA of the same model in float32: what each rank would hold without partitioning.
    result["full_bytes"] = sum(t.numel() * (4 if t.is_floating_point() else 8) for t in full["tensors"].values())

    # Evaluation with the EMA: the engine gathers the swapped partitions on forward.
    probe_x = torch.randn(4, 6, generator=torch.Generator().manual_seed(7)).bfloat16()
    engine.eval()
    with torch.no_grad():
        own_before = engine(probe_x)
        before = partitions(engine)
        with ema.use_ema_weights():
            ema_output = engine(probe_x)
        own_after = engine(probe_x)
        after = partitions(engine)
        try:
            with ema.use_ema_weights():
                engine(probe_x)
                raise KeyError("inside the swap")
        except KeyError:
            pass
        after_error = partitions(engine)
    engine.train()
    result.update(
        ema_output=ema_output.float(),
        own_before=own_before.float(),
        own_after=own_after.float(),
        restored=all(torch.equal(a, b) for a, b in zip(before, after)),
        restored_after_error=all(torch.equal(a, b) for a, b in zip(before, after_error)),
    )
    handle.remove()

    # Resume: a fresh engine and EMA load the checkpoint saved after 3 steps and train the same last 3 steps.
    resumed_engine = engine_of(3, seed=5)
    resumed = ModelEMA(resumed_engine, DECAY, ema_dtype=torch.float32)
    load_checkpoint(resumed_engine, resumed, checkpoint)
    loaded = resumed.state_dict()["tensors"]
    result["loaded_equal"] = all(torch.equal(loaded[name], tensor) for name, tensor in at_save.items())
    resumed.attach(resumed_engine)
    train(resumed_engine, xs[3 * ACCUMULATION :])
    result["resumed"] = resumed.state_dict()["tensors"]
    result["resumed_num_updates"] = resumed.num_updates

    # Consolidation (offline, one process) and a whole EMA state that reloads into the partitions.
    if rank == 0:
        consolidate_ema(saved_folder, os.path.join(out_dir, "consolidated.pt"))
        consolidate_ema(saved_folder, os.path.join(out_dir, "consolidated_ema.pt"), ema_state=True)
    dist.barrier()
    reloaded = ModelEMA(resumed_engine, DECAY, ema_dtype=torch.float32)
    reloaded.load(os.path.join(out_dir, "consolidated_ema.pt"))
    result["consolidated_reloaded"] = all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict()["tensors"].values(), at_save.values())
    )
    result["at_save"] = at_save

    # Bad input: each refused on every rank with the fix named, the EMA unchanged.
    refusals = {}
    unchanged = [t.clone() for t in resumed._tracker.binding.ema_tensors]
    if rank == 0:  # another world size: a copy of the checkpoint whose partitions claim 4 ranks
        tampered = os.path.join(out_dir, "tampered")
        os.makedirs(tampered)
        for r in range(WORLD):
            state = torch.load(os.path.join(saved_folder, f"fastema_ema_rank{r}.pt"), weights_only=True)
            state["world_size"] = 4
            torch.save(state, os.path.join(tampered, f"fastema_ema_rank{r}.pt"))
        resized = os.path.join(out_dir, "resized")
        os.makedirs(resized)
        for r in range(WORLD):
            state = torch.load(os.path.join(saved_folder, f"fastema_ema_rank{r}.pt"), weights_only=True)
            state["partition_sizes"]["layers.0.weight"] += 1
            torch.save(state, os.path.join(resized, f"fastema_ema_rank{r}.pt"))
    dist.barrier()
    for case in ("tampered", "resized"):
        try:
            load_ema(resumed, os.path.join(out_dir, case))
        except ValueError as error:
            refusals[case] = str(error)
    wider = ModelEMA(engine_of(3, hidden=12), DECAY, ema_dtype=torch.float32)
    try:
        load_ema(wider, saved_folder)
    except ValueError as error:
        refusals["wider"] = str(error)
    plain = ModelEMA(Mlp(), DECAY, ema_dtype=torch.float32)  # not partitioned: another stage (or none)
    try:
        load_ema(plain, saved_folder)
    except ValueError as error:
        refusals["unpartitioned"] = str(error)
    result["refusals"] = refusals
    result["unchanged"] = all(torch.equal(a, b) for a, b in zip(unchanged, resumed._tracker.binding.ema_tensors))
    result["ema_before_engine"] = ema_before_engine
    result.update(checkpoint_failures(rank, out_dir, resumed_engine, resumed, saved_folder))

    # An EMA built before deepspeed.initialize: its next update refuses (and does not count).
    import deepspeed

    torch.manual_seed(0)
    model = Mlp()
    early = ModelEMA(model, DECAY)
    late_engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(3))
    train(late_engine, xs[:ACCUMULATION])
    try:
        early.update()
        result["early"] = None
    except RuntimeError as error:
        result["early"] = str(error)
    result["early_counts"] = (early.num_updates, early.num_steps)
    return result


def checkpoint_failures(rank, out_dir, engine, ema, saved_folder):
    """Checkpoints that fail on some rank, or in the engine: raised on every rank, the EMA unchanged on each."""
    import shutil

    from fastema.deepspeed import load_checkpoint, load_ema, save_ema

    result = {}
    unchanged = [t.clone() for t in ema._tracker.binding.ema_tensors]
    tag = os.path.basename(saved_folder)
    if rank == 0:
        # Only rank 1's file is bad, with an error of another type than ValueError (a malformed last_decay).
        one_bad = os.path.join(out_dir, "one_bad")
        shutil.copytree(saved_folder, one_bad, ignore=shutil.ignore_patterns("*_states.pt"))
        state = torch.load(os.path.join(one_bad, "fastema_ema_rank1.pt"), weights_only=True)
        state["ema"]["last_decay"] = "0.5"
        torch.save(state, os.path.join(one_bad, "fastema_ema_rank1.pt"))
        # The EMA files of a checkpoint whose engine states are gone: the engine cannot load it.
        shutil.copytree(
            saved_folder, os.path.join(out_dir, "no_engine", tag), ignore=shutil.ignore_patterns("*_states.pt")
        )
        # Rank 1 cannot write its EMA file (a folder in its place): the save fails there only.
        os.makedirs(os.path.join(out_dir, "unwritable", "fastema_ema_rank1.pt"))
    dist.barrier()
    try:
        load_ema(ema, os.path.join(out_dir, "one_bad"))
        result["one_bad"] = None
    except ValueError as error:
        result["one_bad"] = str(error)
    try:
        load_checkpoint(engine, ema, os.path.join(out_dir, "no_engine"), tag=tag)
        result["no_engine"] = None
    except Exception as error:  # what the engine raised, or fastema's error for its (None, None)
        result["no_engine"] = f"{type(error).__name__}: {error}"
    result["failures_unchanged"] = all(torch.equal(a, b) for a, b in zip(unchanged, ema._tracker.binding.ema_tensors))
    try:
        save_ema(ema, os.path.join(out_dir, "unwritable"))
        result["save_failure"] = None
    except RuntimeError as error:
        result["save_failure"] = str(error)
    return result


def moved_partitions_case(rank):
    """DeepSpeed moving the partitions after the EMA was built: followed, or refused; never a silent no-op.

    A model built under `deepspeed.zero.Init` is partitioned before `deepspeed.initialize`, which then moves
    every partition into its flat buffers: an EMA built in between follows them (one address per storage
    watched). One partition moved by hand, not the watched one of its buffer, is caught by the first update's
    read-back; partitions in storages of their own are each watched. NVMe-offloaded parameters are refused.
    """
    import deepspeed

    from fastema import ModelEMA

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config(3)):
        model = Mlp()
    early = ModelEMA(model, DECAY, ema_dtype=torch.float32)  # partitioned already, not yet in flat buffers
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(3))
    early.attach(engine)
    reference = ReferenceEMA(gathered(engine))
    train(engine, batches(rank)[: 3 * ACCUMULATION], reference)
    result = {
        "followed": {name: tensor.clone() for name, tensor in early.state_dict()["tensors"].items()},
        "reference": reference.state,
        "num_updates": early.num_updates,
    }

    # One partition moved by hand, not the watched one of its flat buffer: the first update's read-back refuses it.
    late = ModelEMA(engine, DECAY, ema_dtype=torch.float32)
    moved = engine.module.layers[2].weight  # not the first partition, which is watched at every update
    moved.ds_tensor.data = moved.ds_tensor.data.clone()  # as offloading does (DeepSpeed's next step puts it back)
    try:
        late.update()
        result["read_back"] = None
    except RuntimeError as error:
        result["read_back"] = str(error)

    # Every partition moved after the first update (as loading weights by swapping storages would), with new
    # values: no counter moves, the watched address does, and the EMA reads the new partitions.
    watched = ModelEMA(engine, DECAY, ema_dtype=torch.float32)
    watched.update()
    old = gathered(engine)
    with torch.no_grad():
        for param in engine.module.parameters():
            param.ds_tensor.data = param.ds_tensor.data + 1
    watched.update()
    new = watched.state_dict()["tensors"]
    result["moved_all"] = {
        name: (new[name].double() - old[name]).mean().item() for name, _ in engine.module.named_parameters()
    }

    # Partitions in several storages (each has its own now): one partition of each storage is watched, so a move
    # of layers.2.weight alone is followed, after the first update's read-back too.
    several = ModelEMA(engine, DECAY, ema_dtype=torch.float32)
    several.update()
    old = gathered(engine)
    with torch.no_grad():
        moved.ds_tensor.data = moved.ds_tensor.data + 1
    several.update()
    new = several.state_dict()["tensors"]
    result["moved_one"] = {name: (new[name].double() - old[name]).mean().item() for name in old}

    # Parameters offloaded to NVMe (as DeepSpeed marks them): refused when the EMA is built, naming the fix.
    nvme = engine.module.layers[0].weight.ds_tensor
    nvme.final_location = "nvme"
    try:
        ModelEMA(engine, DECAY)
        result["nvme"] = None
    except ValueError as error:
        result["nvme"] = str(error)
    finally:
        nvme.final_location = None
    return result


def stage_case(stage, skipped=()):
    """A float32 EMA of a bf16 engine, one update per applied step; `skipped`: optimizer steps that overflow.

    DeepSpeed runs no fp16 on CPU: an overflow is what its fp16 optimizers do then, emulated: the step leaves
    the weights alone and sets `overflow`, which the engine reads to skip the step (`was_step_applied()`).
    """
    from fastema import ModelEMA

    engine = engine_of(stage)
    ema = ModelEMA(engine, DECAY, ema_dtype=torch.float32)
    ema.attach(engine)
    reference = ReferenceEMA(gathered(engine))
    optimizer_step, calls = engine.optimizer.step, [0]

    def step_or_overflow(*args, **kwargs):
        calls[0] += 1
        if calls[0] in skipped:
            engine.optimizer.overflow = True
            return None
        engine.optimizer.overflow = False
        return optimizer_step(*args, **kwargs)

    engine.optimizer.step = step_or_overflow
    train(engine, batches(dist.get_rank()), reference)
    return {
        "sharded": ema.sharded,
        "num_updates": ema.num_updates,
        "skipped": engine.skipped_steps,
        "ema": {name: tensor.clone() for name, tensor in ema.state_dict()["tensors"].items()},
        "reference": reference.state,
    }


# ---- Hugging Face Trainer and Accelerate with a DeepSpeed ZeRO-3 config -----------------------------------------


def hf_zero3_config():
    """ZeRO-3 for the HF Trainer (float32, so the evaluation can be checked to the last digits); "auto" values."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 20},
        "steps_per_print": 10**9,
    }


def count_every_process():
    """Accelerate counts one process in a CPU-only DeepSpeed run (its backend detection finds no accelerator
    for DeepSpeed's CPU one), so it would neither shard the data nor gather the evaluation: told here the rank
    and world that torch.distributed (and DeepSpeed) use, as a GPU launch would give it."""
    from accelerate.state import AcceleratorState, PartialState

    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared.update(num_processes=dist.get_world_size(), process_index=dist.get_rank())


def hf_trainer_case(rank, out_dir):
    """The HF Trainer with a ZeRO-3 config: an EMA per optimizer step, evaluation with it, a checkpoint, a resume."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fastema.transformers import EMACallback
    from test_trainers import Tokens, tiny_bert

    class Reference(TrainerCallback):
        """A float64 EMA of the gathered weights after every optimizer step, and each evaluation's loss."""

        def __init__(self):
            self.reference, self.evaluations = None, []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.reference = ReferenceEMA(full_weights(model))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.reference.update(full_weights(model), DECAY)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evaluations.append(metrics["eval_loss"])

    def full_weights(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {name: snapshot(tensor) for name, tensor in expected_tracked(model).items()}

    def trainer(callbacks, steps):
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, "hf"),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=steps,
            learning_rate=0.01,
            report_to=[],
            save_strategy="steps",
            save_steps=2,
            eval_strategy="steps",
            eval_steps=4,
            logging_steps=1000,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            average_tokens_across_devices=False,  # a plain mean loss, as the single-process check computes it
            deepspeed=hf_zero3_config(),
        )
        made = Trainer(
            model=tiny_bert(), args=args, train_dataset=Tokens(), eval_dataset=Tokens(8, seed=1), callbacks=callbacks
        )
        count_every_process()
        return made

    callback, reference = EMACallback(decay=DECAY), Reference()
    first = trainer([callback, reference], 4)
    first.train()
    engine = callback.engine
    result = {
        "sharded": engine.sharded,
        "num_updates": engine.num_updates,
        "ema": {name: tensor.clone() for name, tensor in engine.state_dict()["tensors"].items()},
        "reference": reference.reference.state,
        "evaluations": reference.evaluations,
        "files": sorted(os.listdir(os.path.join(out_dir, "hf", "checkpoint-2"))),
    }
    resumed_callback = EMACallback(decay=DECAY)
    second = trainer([resumed_callback], 4)
    second.train(resume_from_checkpoint=os.path.join(out_dir, "hf", "checkpoint-2"))
    result["resumed"] = {name: t.clone() for name, t in resumed_callback.engine.state_dict()["tensors"].items()}
    result["resumed_num_updates"] = resumed_callback.engine.num_updates
    return result


def accelerate_case(rank):
    """Accelerate with a DeepSpeed plugin: `ModelEMA(model)` and `ema.attach(model)` on what `prepare` returns."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    from fastema import ModelEMA

    AcceleratorState._reset_state(True)  # the Trainer's state, with its own DeepSpeed config, is gone
    settings = {key: value for key, value in config(3).items() if key != "optimizer"}  # the optimizer is the code's
    plugin = DeepSpeedPlugin(hf_ds_config=settings, gradient_accumulation_steps=ACCUMULATION)
    accelerator = Accelerator(deepspeed_plugin=plugin)
    count_every_process()
    torch.manual_seed(0)
    model = Mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEMA(model, DECAY, ema_dtype=torch.float32)
    try:  # the optimizer `prepare` returns steps nothing under DeepSpeed: the engine does
        ema.attach(optimizer)
        wrong_attach = None
    except TypeError as error:
        wrong_attach = str(error)
    ema.attach(model)
    reference = ReferenceEMA(gathered(model))
    for x in batches(rank):
        with accelerator.accumulate(model):
            loss = model(x.bfloat16()).float().square().mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            reference.update(gathered(model), DECAY)
    return {
        "sharded": ema.sharded,
        "num_updates": ema.num_updates,
        "ema": {name: tensor.clone() for name, tensor in ema.state_dict()["tensors"].items()},
        "reference": reference.state,
        "wrong_attach": wrong_attach,
    }


def deepspeed_worker(rank, out_dir):
    """Every case in one launch; each rank's results (and the time each case took) in `rank<R>.pt`."""
    import time

    cases = {
        "zero3": lambda: zero3_case(rank, out_dir),
        "moved": lambda: moved_partitions_case(rank),
        **{f"stage{stage}": (lambda stage=stage: stage_case(stage)) for stage in (0, 1, 2)},
        "overflow": lambda: stage_case(3, skipped=(2, 4)),
        "trainer": lambda: hf_trainer_case(rank, out_dir),
        "accelerate": lambda: accelerate_case(rank),
    }
    results, seconds = {}, {}
    for name, case in cases.items():
        start = time.perf_counter()
        results[name] = case()
        seconds[name] = round(time.perf_counter() - start, 2)
    results["seconds"] = seconds
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
