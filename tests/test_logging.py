"""`ema_decay` read back from real TensorBoard event files and an offline W&B run."""

import json
import math
import struct

import pytest
from fastai.callback.core import Callback

from fastema import EMACallback, EMASchedule
from helpers import make_learner


class DecaySpy(Callback):
    order = EMACallback.order + 1

    def before_fit(self):
        self.decays = []

    def after_step(self):
        self.decays.append(self.learn.ema_schedule.decay)


def test_tensorboard_event_file_holds_ema_decay(tmp_path):
    from fastai.callback.tensorboard import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spy = DecaySpy()
    learn = make_learner(cbs=[EMASchedule(0.5, 0.99, finish=0.5), spy])
    learn.fit(2, cbs=[TensorBoardCallback(log_dir=tmp_path, trace_model=False, log_preds=False)])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("ema_decay")
    assert [s.step for s in scalars] == list(range(1, 17))  # fastai's train_iter after each batch
    assert [s.value for s in scalars] == pytest.approx(spy.decays, rel=1e-6)
    assert spy.decays[0] == pytest.approx(0.5) and spy.decays[-1] == pytest.approx(0.99)
    # The half-life in samples that each decay amounts to at this Learner's batch of 8, logged beside it.
    half_lives = [s.value for s in events.Scalars("ema_half_life")]
    assert half_lives == pytest.approx([8 * math.log(0.5) / math.log(decay) for decay in spy.decays], rel=1e-5)


def read_wandb_history(path):
    """History rows of an offline `.wandb` file: a LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block_size, position, pending, rows = 32768, 7, b"", []
    while position + 7 <= len(data):
        left_in_block = block_size - position % block_size
        if left_in_block < 7:  # block trailer padding
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_run_history_holds_ema_decay(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import fastai.callback.wandb as fastai_wandb
    from fastai.callback.wandb import WandbCallback

    # fastai 2.8.12's config formatter calls vars() on plain ints and strings ("batch size",
    # "device") and crashes WandbCallback.before_fit with or without fastema; let it skip those.
    original_init_args = fastai_wandb.init_args
    monkeypatch.setattr(fastai_wandb, "init_args", lambda o: original_init_args(o) if hasattr(o, "__dict__") else {})
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="fastema-test", dir=str(tmp_path), mode="offline")
    try:
        spy = DecaySpy()
        learn = make_learner(cbs=[EMASchedule(0.5, 0.99, finish=0.5), spy])
        learn.fit(2, cbs=[WandbCallback(log=None, log_preds=False, log_model=False)])
    finally:
        wandb.finish()
        wandb.teardown()  # waits for W&B's service process to write everything out, and ends it
    run_file = next(tmp_path.glob(f"wandb/offline-run-*{run.id}/run-{run.id}.wandb"))
    rows = read_wandb_history(run_file)
    logged = {row["_step"]: row["ema_decay"] for row in rows if "ema_decay" in row}
    train_loss_steps = sorted(row["_step"] for row in rows if "train_loss" in row)
    assert sorted(logged) == train_loss_steps  # on the same steps as fastai's own logging
    assert [logged[step] for step in sorted(logged)] == pytest.approx(spy.decays, rel=1e-9)
