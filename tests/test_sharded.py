"""Sharded EMA checkpoints with torch.distributed.checkpoint: real gloo processes, resharding 2 ranks -> 3 ranks
and -> one process, against the single-process float64 reference; refusals that change nothing; memory."""

import os
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import distributed_workers as workers
from fastema import ModelEMA
from fastema.distributed import consolidate_ema, load_sharded, save_sharded
from helpers import assert_state_matches, kill_while_writing
from test_distributed import single_process_reference


@pytest.fixture(scope="module")
def saved_by_two_ranks(tmp_path_factory):
    """A 2-rank FSDP2 run saved with dcp.save (model and EMA), and a checkpoint of a wider model's EMA."""
    out = tmp_path_factory.mktemp("dcp")
    workers.launch(workers.dcp_save_worker, out)
    return out


def plain_ema():
    torch.manual_seed(0)
    return ModelEMA(workers.Mlp().double(), workers.DECAY)


def test_a_two_rank_checkpoint_loads_into_three_ranks_equal_to_the_reference(saved_by_two_ranks):
    out = saved_by_two_ranks
    workers.launch(workers.dcp_load_worker, out, world=3)
    saved = torch.load(out / "saved0.pt", weights_only=True)["full"]  # rank 0's full EMA when it saved
    _, reference = single_process_reference()
    for rank in range(3):
        result = torch.load(out / f"loaded{rank}.pt", weights_only=True)
        assert "Size mismatch" in result["refused"] and "layers.0.weight" in result["refused"]
        assert result["unchanged"]  # the refused load left this rank's shards as they were
        assert result["num_updates"] == workers.STEPS
        assert_state_matches(result["ema"], reference.state, rtol=1e-10, atol=1e-12)
        for name, tensor in saved.items():
            assert torch.equal(result["ema"][name], tensor), name  # resharded bit for bit


def test_a_two_rank_checkpoint_loads_into_one_process_and_consolidates(saved_by_two_ranks, tmp_path):
    out = saved_by_two_ranks
    _, reference = single_process_reference()
    ema = plain_ema()
    load_sharded({"ema": ema.sharded_state()}, out / "ckpt")
    assert ema.num_updates == workers.STEPS
    assert_state_matches(dict(ema.module.state_dict()), reference.state, rtol=1e-10, atol=1e-12)

    path = consolidate_ema(out / "ckpt", tmp_path / "ema.pt")
    consolidated = torch.load(path, weights_only=True)
    assert sorted(consolidated) == sorted(reference.state)
    model = workers.Mlp().double()
    model.load_state_dict(consolidated)
    for name, value in ema.module.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match=r"no \.metadata"):
        consolidate_ema(out / "nowhere", tmp_path / "never.pt")
    with pytest.raises(ValueError, match="no fastema EMA under 'model'"):
        consolidate_ema(out / "ckpt", tmp_path / "never.pt", key="model")
    assert not (tmp_path / "never.pt").exists()


def test_mismatched_checkpoints_are_refused_and_change_nothing(saved_by_two_ranks, tmp_path):
    ema = plain_ema()
    ema.update()
    before = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}

    def unchanged():
        return ema.num_updates == 1 and all(torch.equal(ema.module.state_dict()[n], t) for n, t in before.items())

    with pytest.raises(ValueError, match=r"Size mismatch .*layers\.0\.weight"):  # another model's shapes
        load_sharded({"ema": ema.sharded_state()}, saved_by_two_ranks / "wider")
    assert unchanged()
    torch.manual_seed(0)
    model = workers.Mlp().double()
    model.register_buffer("extra", torch.ones(3))
    save_sharded({"ema": ModelEMA(model, workers.DECAY).sharded_state()}, tmp_path / "extra")
    with pytest.raises(ValueError, match="names"):  # a checkpoint with a tensor this EMA does not have
        load_sharded({"ema": ema.sharded_state()}, tmp_path / "extra")
    assert unchanged()
    save_sharded({"ema": ModelEMA(workers.Mlp().double(), update_every=2).sharded_state()}, tmp_path / "every2")
    with pytest.raises(ValueError, match="update_every 2 != 1"):
        load_sharded({"ema": ema.sharded_state()}, tmp_path / "every2")
    assert unchanged()
    with pytest.raises(FileNotFoundError, match=r"no \.metadata"):
        load_sharded({"ema": ema.sharded_state()}, tmp_path / "nowhere")


def test_the_checks_of_a_load_each_refuse_and_change_nothing():
    ema = plain_ema()
    ema.update()
    before = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}
    good = ema.sharded_state().state_dict()  # copies (not called by DCP)
    renamed = [name.replace("layers.4", "layers.9") for name in ema.tensor_names]
    cases = {
        "names differ": dict(good, names=torch.tensor(list("\n".join(renamed).encode()), dtype=torch.uint8)),
        "dtypes differ": dict(good, dtypes=torch.tensor(list("\n".join(["torch.float32"] * 7).encode()))),
        "read no EMA": dict(good, header=torch.tensor([-1, 0, 0, 1, 0, 0])),
        "version 7": dict(good, header=torch.tensor([7, 0, 0, 1, 0, 0])),
        "expected tensors": dict(good, header=[1, 0, 0, 1, 0, 0]),
    }
    for match, state in cases.items():
        with pytest.raises(ValueError, match=match):
            ema.sharded_state().load_state_dict(state)
        assert ema.num_updates == 1, match
        for name, value in ema.module.state_dict().items():
            assert torch.equal(value, before[name]), (match, name)
    with ema.use_ema_weights(), pytest.raises(RuntimeError, match="inside use_ema_weights"):
        ema.sharded_state()
    reordered = plain_ema()  # the same tensors, listed in another order: DCP loads by name
    names = bytes(good["names"].tolist()).decode().split("\n")[::-1]
    dtypes = bytes(good["dtypes"].tolist()).decode().split("\n")[::-1]
    encode = lambda strings: torch.tensor(list("\n".join(strings).encode()), dtype=torch.uint8)  # noqa: E731
    reordered.sharded_state().load_state_dict(dict(good, names=encode(names), dtypes=encode(dtypes)))
    assert reordered.num_updates == 1


def test_a_state_said_to_be_for_saving_or_loading_needs_no_look_at_its_caller():
    ema = plain_ema()
    ema.update()
    own = ema._tracker.binding.ema_tensors
    for purpose, shares_storage, version in (("save", True, 1), ("load", False, -1), (None, False, 1)):
        state = ema.sharded_state(purpose).state_dict()  # called from here, not from DCP
        tensors = [state["tensors"][name] for name in ema.tensor_names]
        assert all((t.data_ptr() == e.data_ptr()) is shares_storage for t, e in zip(tensors, own)), purpose
        assert state["header"][0].item() == version, purpose  # load: fresh buffers, marked as not read yet
    with pytest.raises(ValueError, match="purpose"):
        ema.sharded_state("restore")


def test_a_state_for_loading_is_never_saved_and_a_state_for_saving_is_never_loaded(tmp_path):
    import torch.distributed.checkpoint as dcp

    ema = plain_ema()

    def train_and_update():
        with torch.no_grad():
            for parameter in ema.model.parameters():
                parameter.add_(1.0)
        ema.update()

    train_and_update()
    save_sharded({"ema": ema.sharded_state("save")}, tmp_path / "good")
    saved = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}
    with pytest.raises(ValueError, match=r"state_dict\['ema'\].*sharded_state\('load'\).*nothing was written"):
        save_sharded({"ema": ema.sharded_state("load")}, tmp_path / "good")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP's "single process" notice
        with pytest.raises(ValueError, match=r"sharded_state\('load'\) was handed to dcp.save"):
            dcp.save({"ema": ema.sharded_state("load")}, checkpoint_id=str(tmp_path / "raw"))
        train_and_update()  # the EMA moves on; a load into it must not happen behind the checks
        moved = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}
        with pytest.raises(ValueError, match=r"sharded_state\('save'\) was handed to dcp.load"):
            dcp.load({"ema": ema.sharded_state("save")}, checkpoint_id=str(tmp_path / "good"))
    for name, value in ema.module.state_dict().items():
        assert torch.equal(value, moved[name]), name
    fresh = plain_ema()
    load_sharded({"ema": fresh.sharded_state("load")}, tmp_path / "good")  # the good checkpoint is intact
    assert fresh.num_updates == 1
    for name, value in fresh.module.state_dict().items():
        assert torch.equal(value, saved[name]), name
        assert not value.is_floating_point() or not torch.equal(value, moved[name]), name


def test_a_state_dict_taken_outside_dcp_is_a_copy_and_a_wrapper_stateful_works(saved_by_two_ranks):
    import torch.distributed.checkpoint as dcp

    _, reference = single_process_reference()
    ema = plain_ema()
    initial = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load({"ema": ema.sharded_state().state_dict()}, checkpoint_id=str(saved_by_two_ranks / "ckpt"))
    assert ema.num_updates == 0  # a plain dict: DCP read into copies, the EMA is untouched
    for name, value in ema.module.state_dict().items():
        assert torch.equal(value, initial[name]), name

    class AppState:  # the wrapper pattern of DCP's tutorial
        def state_dict(self):
            return {"ema": ema.sharded_state().state_dict()}

        def load_state_dict(self, state):
            ema.sharded_state().load_state_dict(state["ema"])

    with pytest.warns(UserWarning, match="single process"):
        dcp.load({"app": AppState()}, checkpoint_id=str(saved_by_two_ranks / "wrapped"))
    assert ema.num_updates == workers.STEPS
    assert_state_matches(dict(ema.module.state_dict()), reference.state, rtol=1e-10, atol=1e-12)


def test_partial_loads_dtype_changes_and_non_tensor_entries_are_refused(saved_by_two_ranks, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    ema = plain_ema()
    ema.update()
    snapshot = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}

    def unchanged():
        return ema.num_updates == 1 and all(torch.equal(ema.module.state_dict()[n], t) for n, t in snapshot.items())

    model_only = {"model": workers.Mlp().double().state_dict()}
    with pytest.raises(ValueError, match="read no EMA"), pytest.warns(UserWarning, match="single process"):
        dcp.load(
            {**model_only, "ema": ema.sharded_state()},
            checkpoint_id=str(saved_by_two_ranks / "ckpt-model"),
            planner=DefaultLoadPlanner(allow_partial_load=True),
        )
    assert unchanged()
    torch.manual_seed(0)
    float32 = ModelEMA(workers.Mlp().double(), workers.DECAY, ema_dtype=torch.float32)
    save_sharded({"ema": float32.sharded_state()}, tmp_path / "float32")
    with pytest.raises(ValueError, match="dtypes differ"):
        load_sharded({"ema": ema.sharded_state()}, tmp_path / "float32")
    assert unchanged()
    save_sharded({"ema": {"header": 1, "tensors": {}}}, tmp_path / "pickled")  # a non-tensor entry
    with pytest.raises(ValueError, match="not tensors"):
        load_sharded({"ema": ema.sharded_state()}, tmp_path / "pickled")
    with pytest.raises(ValueError, match="not tensors"):
        consolidate_ema(tmp_path / "pickled", tmp_path / "never.pt")
    assert unchanged() and not (tmp_path / "never.pt").exists()


def test_save_sharded_refuses_what_is_not_a_checkpoint_and_recovers_a_save_killed_between_renames(tmp_path):
    ema = plain_ema()
    ema.update()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "important.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a DCP checkpoint"):
        save_sharded({"ema": ema.sharded_state()}, tmp_path / "notes")
    assert (tmp_path / "notes" / "important.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="checkpoint_id"):
        save_sharded({"ema": ema.sharded_state()}, "/")
    save_sharded({"ema": ema.sharded_state()}, tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.previous-0123")  # killed after the first rename
    loaded = plain_ema()
    with pytest.warns(UserWarning, match="interrupted between its two renames"):
        load_sharded({"ema": loaded.sharded_state()}, tmp_path / "ckpt")
    assert loaded.num_updates == 1
    save_sharded({"ema": ema.sharded_state()}, tmp_path / "ckpt")  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]


def test_a_sharded_load_recovers_an_ema_whose_update_failed(tmp_path):
    ema = plain_ema()
    ema.update()
    save_sharded({"ema": ema.sharded_state()}, tmp_path / "ckpt")
    ema._tracker.latch.error = RuntimeError("a background update failed")  # what a failed offloaded update leaves
    load_sharded({"ema": ema.sharded_state()}, tmp_path / "ckpt")
    assert ema._tracker.latch.error is None and ema.num_updates == 1


def test_save_sharded_replaces_a_checkpoint_and_one_process_round_trips(tmp_path):
    ema = plain_ema()
    ema.update()
    save_sharded({"ema": ema.sharded_state()}, tmp_path / "ckpt")
    with torch.no_grad():
        for parameter in ema.model.parameters():
            parameter.add_(1.0)
    ema.update(0.5)
    save_sharded({"ema": ema.sharded_state()}, tmp_path / "ckpt")  # over the first one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    loaded = plain_ema()
    load_sharded({"ema": loaded.sharded_state()}, tmp_path / "ckpt")
    assert loaded.num_updates == 2 and loaded.last_decay == 0.5
    for name, value in ema.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], value), name


def test_recovery_loads_the_newest_set_aside_copy_whatever_their_names(tmp_path):
    ema = plain_ema()
    for name, age_s in ((".ckpt.previous-ffff", 100), (".ckpt.previous-0000", 0)):
        ema.update()
        save_sharded({"ema": ema.sharded_state()}, tmp_path / "scratch")
        (tmp_path / "scratch").rename(tmp_path / name)  # as if two saves of ckpt were killed between their renames
        written = time.time() - age_s
        os.utime(tmp_path / name / ".metadata", (written, written))
    loaded = plain_ema()
    with pytest.warns(UserWarning, match=r"previous checkpoint .*previous-0000"):
        load_sharded({"ema": loaded.sharded_state()}, tmp_path / "ckpt")
    assert loaded.num_updates == 2  # the newer copy, though its random name sorts first


def test_checkpoint_names_with_glob_characters_clean_up_their_own_leftovers_only(tmp_path):
    from fastema.fastai.sharded import remove_sharded_checkpoint

    ema = plain_ema()
    ema.update()
    for other in (".run1.dcp.previous-aaaa", ".run1.dcp.saving-bbbb"):  # another checkpoint's recovery copies
        save_sharded({"ema": ema.sharded_state()}, tmp_path / "scratch")
        (tmp_path / "scratch").rename(tmp_path / other)
    for own in (".run[12].dcp.saving-cccc", ".run[12].dcp.previous-dddd"):  # what killed saves of run[12] left
        (tmp_path / own).mkdir()
    save_sharded({"ema": ema.sharded_state()}, tmp_path / "run[12].dcp")
    others = [".run1.dcp.previous-aaaa", ".run1.dcp.saving-bbbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*others, "run[12].dcp"]
    for own in (".run[12].dcp.saving-eeee", ".run[12].dcp.previous-ffff"):
        (tmp_path / own).mkdir()
    remove_sharded_checkpoint(tmp_path / "run[12].pth")  # what a single-file learn.save("run[12]") does
    assert sorted(p.name for p in tmp_path.iterdir()) == others


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from torch.distributed.checkpoint import filesystem
    import distributed_workers as workers
    from fastema import ModelEMA
    from fastema.distributed import save_sharded

    torch.manual_seed(0)
    ema = ModelEMA(workers.Mlp().double(), workers.DECAY)
    ema.update()
    save_sharded({{"ema": ema.sharded_state()}}, {path!r})          # the previous checkpoint, complete
    torch.save(ema.state_dict(), {path!r} + ".expected.pt")
    with torch.no_grad():
        for parameter in ema.model.parameters():
            parameter.add_(1.0)
    ema.update()
    write_item = filesystem._write_item

    def slow_write(*args, **kwargs):                            # write one item, then hang: we get killed
        result = write_item(*args, **kwargs)
        print("writing", flush=True)
        time.sleep(60)
        return result

    filesystem._write_item = slow_write
    save_sharded({{"ema": ema.sharded_state()}}, {path!r})
    """
)


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "ckpt"
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), path=str(target))
    kill_while_writing(script)
    (interrupted,) = tmp_path.glob(".ckpt.saving-*")
    ema = plain_ema()
    with pytest.raises(FileNotFoundError, match=r"no \.metadata"):  # the half-written directory is refused
        load_sharded({"ema": ema.sharded_state()}, interrupted)
    assert ema.num_updates == 0
    load_sharded({"ema": ema.sharded_state()}, target)  # the previous checkpoint, intact
    expected = torch.load(tmp_path / "ckpt.expected.pt", weights_only=True)
    assert ema.num_updates == 1
    for name, value in expected["tensors"].items():
        assert torch.equal(ema.module.state_dict()[name], value), name


def test_sharded_save_and_load_use_shard_sized_memory_where_gathering_uses_the_model_s(tmp_path):
    workers.launch(workers.sharded_memory_worker, tmp_path)
    for rank in range(workers.WORLD):
        memory = torch.load(tmp_path / f"memory{rank}.pt", weights_only=True)
        full = memory["full_bytes"]
        assert memory["gather_save"] > 0.8 * full  # the control: gathering materialises the whole EMA
        assert memory["dcp_save"] < 0.5 * full  # less than this rank's shard (views are written)
        assert memory["dcp_load"] < 0.75 * full  # this rank's shard in fresh buffers, plus reading


# ---- fastai: learn.save / learn.load with a sharded model --------------------------------------------


def assert_equal_nested(actual, expected, where=""):
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), where
        for key in expected:
            assert_equal_nested(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    else:
        assert actual == expected, where


def user_warnings(action) -> list[str]:
    """The UserWarnings `action()` raises (fastai's own DeprecationWarnings while loading are not ours)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(warning.message) for warning in caught if warning.category is UserWarning]


@pytest.fixture(scope="module")
def fastai_sharded_run(tmp_path_factory):
    """2 ranks, FSDP2 model in a fastai Learner, both optimizer kinds: see `workers.fastai_sharded_worker`."""
    out = tmp_path_factory.mktemp("fastai-dcp")
    workers.launch(workers.fastai_sharded_worker, out, timeout_s=240)
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(workers.WORLD)]


@pytest.mark.parametrize("optimizer", ["fastai", "torch"])
def test_fastai_saves_a_sharded_model_as_dcp_and_a_fresh_learner_resumes_it_bit_for_bit(fastai_sharded_run, optimizer):
    _, ranks = fastai_sharded_run
    for result in ranks:
        run = result[optimizer]
        # SaveModelCallback(every_epoch) on every rank: one DCP directory per save, no rank-0 .pth or .ema.pth
        assert run["files"] == ["epoch_0.dcp", "epoch_1.dcp", "epoch_2.dcp", "plain.pth"]
        whole = run["whole"]
        assert whole["num_updates"] == 6  # 3 epochs of 2 batches per rank
        assert whole["model_ema"] is None  # a sharded EMA has no module to hand out
        assert_state_matches(whole["ema"], run["reference"], rtol=1e-10, atol=1e-12)
        # A Learner built from another seed loads exactly what was saved after epoch 1: model, optimizer, EMA...
        assert_equal_nested(run["loaded"], dict(run["epochs"][1], model_ema=None))
        # ...and fit(3, start_epoch=2) from there ends where the uninterrupted fit did, bit for bit.
        for part in ("model", "ema", "optimizer", "num_updates", "decay"):
            assert_equal_nested(run["resumed"][part], whole[part], part)
        # A wider model and a single-file checkpoint are refused on every rank, changing nothing.
        assert "layers.0.weight: shape (10, 6) in the checkpoint, (12, 6) in the model" in run["refused"]["epoch_2"]
        assert "single-file checkpoint" in run["refused"]["plain"]
        assert run["unchanged"]
        # A later fit with resume=True continues that EMA with the final decay...
        assert run["continuation"]["decays"] == workers.DECAY
        assert_state_matches(run["continuation"]["ema"], run["continuation"]["reference"], rtol=1e-10, atol=1e-12)
        # ...and so do fits that freeze a layer, then unfreeze it (by name).
        frozen, unfrozen = run["continuation"]["names"]
        assert "layers.0.weight" not in frozen and "layers.0.weight" in unfrozen


def test_a_two_rank_fastai_checkpoint_loads_into_three_ranks(fastai_sharded_run):
    out, ranks = fastai_sharded_run
    workers.launch(workers.fastai_sharded_load_worker, out, timeout_s=120, world=3)
    saved = ranks[0]["fastai"]["epochs"][2]
    for rank in range(3):
        loaded = torch.load(out / f"three{rank}.pt", weights_only=True)
        assert_equal_nested({part: loaded[part] for part in saved}, saved)
        assert loaded["num_updates"] == 6


def test_a_model_sharded_at_the_root_only_saves_sharded_after_validation_and_savemodelcallback_reloads_the_best(
    fastai_sharded_run,
):
    _, ranks = fastai_sharded_run
    for result in ranks:
        run = result["root_only"]
        # After validation the root's parameters are plain tensors: still a sharded save (no rank-0-only .pth, no
        # hang gathering an EMA that did not validate), and SaveModelCallback's load of the best at the end works.
        assert run["files"] == ["best.dcp", "plain.dcp", "plain.pth"]
        for part in ("model", "ema", "optimizer"):
            assert_equal_nested(run["final"][part], run["epochs"][0][part], part)  # epoch 0 was "best"
        assert not torch.equal(
            run["epochs"][2]["model"]["layers.0.weight"], run["epochs"][0]["model"]["layers.0.weight"]
        )
        assert_equal_nested(run["fresh"], run["plain"])  # a Learner without EMA: saved and loaded sharded
        assert "lr_find does not support a sharded" in run["lr_find_error"]
        assert_equal_nested(run["after_lr_find"], run["plain"])  # refused before any step
        assert "newer than" in run["newer_file_error"] and "sharded (FSDP2)" in run["newer_file_error"]


def test_a_two_rank_fastai_checkpoint_loads_into_one_unsharded_learner_and_formats_replace_each_other(
    fastai_sharded_run, tmp_path
):
    import shutil

    from fastema import EMASchedule

    out, ranks = fastai_sharded_run
    epochs = ranks[0]["fastai"]["epochs"]
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(out / "fastai" / "models" / "epoch_1.dcp", models / "run.dcp")
    # An EMA that does not fit (update_every differs) fails inside dcp.load, after the model was read: into
    # fresh buffers, so the model is as it was, in its own storage (flatten_model packs only a checked EMA).
    other = workers.mlp_learner([EMASchedule(update_every=2, flatten_model=True)], tmp_path, "fastai", seed=1)
    before = {name: tensor.clone() for name, tensor in other.model.state_dict().items()}
    storage = [p.data_ptr() for p in other.model.parameters()]
    with pytest.raises(ValueError, match="update_every 1 != 2"):
        other.load("run")
    assert_equal_nested(dict(other.model.state_dict()), before)
    assert [p.data_ptr() for p in other.model.parameters()] == storage
    assert other.ema_schedule.engine is None

    learn = workers.mlp_learner([EMASchedule(start_decay=0.5, final_decay=workers.DECAY)], tmp_path, "fastai", seed=1)
    learn.load("run")  # saved by 2 ranks, read by one process into an unsharded model

    def assert_holds(epoch):
        assert_equal_nested(dict(learn.model.state_dict()), epoch["model"])
        assert_equal_nested(workers.optimizer_state(learn), epoch["optimizer"])
        assert_equal_nested({n: learn.model_ema.state_dict()[n] for n in epoch["ema"]}, epoch["ema"])

    assert_holds(epochs[1])
    assert learn.ema_schedule.engine.num_updates == 4
    learn.save("run")  # unsharded: fastai's file and the EMA beside it replace the sharded checkpoint
    assert sorted(path.name for path in models.iterdir()) == ["run.ema.pth", "run.pth"]
    # Both formats present (a save interrupted before deleting the other one): the newer wins, with a warning.
    shutil.copytree(out / "fastai" / "models" / "epoch_2.dcp", models / "run.dcp")
    now = time.time()
    os.utime(models / "run.dcp" / ".metadata", (now + 10, now + 10))
    assert any("Both" in message for message in user_warnings(lambda: learn.load("run")))
    assert_holds(epochs[2])
    os.utime(models / "run.pth", (now + 20, now + 20))
    assert any("Both" in message for message in user_warnings(lambda: learn.load("run")))
    assert_holds(epochs[1])

    # A checkpoint of the other optimizer kind: model and EMA load, the optimizer is skipped with a warning (as fastai).
    shutil.rmtree(models / "run.dcp")
    shutil.copytree(out / "torch" / "models" / "epoch_2.dcp", models / "torch.dcp")
    with pytest.warns(UserWarning, match="Could not load the optimizer state .* saved from a torch optimizer"):
        learn.load("torch")
    assert_equal_nested(dict(learn.model.state_dict()), ranks[0]["torch"]["epochs"][2]["model"])


def sharded_save(learn, name, with_opt=True):
    """`learn.save`'s sharded path, taken by an unsharded Learner in one process (DCP needs no process group)."""
    from fastema.fastai import sharded as learner_sharded
    from fastema.fastai.checkpoint import _ema_callback

    return learner_sharded.save(learn, learn.path / learn.model_dir / f"{name}.pth", with_opt, _ema_callback(learn))


def learner_state(learn):
    ema = learn.ema_schedule.engine
    return {
        "model": {name: tensor.clone() for name, tensor in learn.model.state_dict().items()},
        "optimizer": workers.full_state(workers.optimizer_state(learn)),
        "ema": None if ema is None else workers.full_state(ema.state_dict()["tensors"]),
        "hypers": [dict(hypers) for hypers in learn.opt.hypers],
    }


def test_sharded_checkpoints_that_do_not_fit_are_refused_or_their_optimizer_skipped_changing_nothing(tmp_path):
    from fastai.optimizer import ranger

    from fastema import EMASchedule

    def learner(optimizer="fastai", seed=0, **kwargs):
        schedule = EMASchedule(start_decay=0.5, final_decay=workers.DECAY)
        return workers.mlp_learner([schedule], tmp_path, optimizer, seed=seed, **kwargs)

    target = learner(seed=1)
    target.fit(1, lr=0.003)
    before = learner_state(target)

    # One that fits, loaded without the optimizer, then with it (the hyperparameters too: lr 0.01, not 0.003).
    good = learner()
    good.fit(1)
    sharded_save(good, "good")
    target.load("good", with_opt=False)
    assert_equal_nested(learner_state(target)["optimizer"], before["optimizer"])
    assert_equal_nested(learner_state(target)["model"], learner_state(good)["model"])
    target.load("good")
    assert_equal_nested(learner_state(target), learner_state(good))
    target = learner(seed=1)
    target.fit(1, lr=0.003)
    before = learner_state(target)

    # EMA entries that are not tensors: refused before DCP would unpickle them.
    import torch.distributed.checkpoint as dcp

    from fastema.core.sharded_state import encode_strings

    junk = {"names": encode_strings(["layers.0.weight"]), "payload": {"not": "a tensor"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: no process group, one process assumed
        dcp.save({"model": good.model.state_dict(), "ema": junk}, checkpoint_id=str(tmp_path / "models" / "junk.dcp"))
    with pytest.raises(ValueError, match="are not tensors"):
        target.load("junk")
    assert_equal_nested(learner_state(target), before)

    # A decay out of [0, 1] where the callback stood: refused before anything is written.
    bad = learner()
    bad.fit(1)
    bad.ema_schedule.decay = 2.0
    sharded_save(bad, "bad")
    with pytest.raises(ValueError, match=r"bad\.dcp .*Invalid decay: 2\.0"):
        target.load("bad")
    assert_equal_nested(learner_state(target), before)

    # Saved with the first layer frozen (the optimizer holds 4 parameters, not 6): the model and the EMA load,
    # the optimizer state is skipped with a warning and left as it was (fastai would assign it to other parameters).
    frozen = learner()
    frozen.model.layers[0].requires_grad_(False)
    frozen.fit(1)
    sharded_save(frozen, "frozen")
    warned = user_warnings(lambda: target.load("frozen"))
    assert any("Could not load the optimizer state" in message for message in warned), warned
    assert_equal_nested(dict(target.model.state_dict()), dict(frozen.model.state_dict()))
    assert_equal_nested(learner_state(target)["optimizer"], before["optimizer"])
    assert_equal_nested(learner_state(target)["hypers"], before["hypers"])
    assert "layers.0.weight" not in target.ema_schedule.engine.tensor_names  # the checkpoint's EMA, as it was

    def assert_optimizer_skipped(optimizer, saved_frozen, loading_frozen, why):
        """Saved with layer `saved_frozen` frozen (None: none), loaded with `loading_frozen` frozen: skipped."""
        saver, loader = learner(optimizer), learner(optimizer, seed=1)
        for learn, frozen_layer in ((saver, saved_frozen), (loader, loading_frozen)):
            if frozen_layer is not None:
                learn.model.layers[frozen_layer].requires_grad_(False)
            learn.fit(1)
        sharded_save(saver, f"{optimizer}_{saved_frozen}")
        kept = learner_state(loader)
        warned = user_warnings(lambda: loader.load(f"{optimizer}_{saved_frozen}"))
        assert any(why in message for message in warned), warned
        assert_equal_nested(learner_state(loader)["optimizer"], kept["optimizer"])

    # As many parameters, but others: skipped too (the names say which parameter each state belongs to).
    assert_optimizer_skipped("fastai", 4, 0, "or other parameters")
    # A torch optimizer over other parameters: read, compared with the optimizer's groups, skipped.
    assert_optimizer_skipped("torch", None, 0, "parameter groups hold other parameters")

    # A Lookahead Learner loading a checkpoint of fastai's Adam: the optimizer part is skipped, untouched.
    lookahead = workers.mlp_learner(None, tmp_path, "fastai", opt_func=ranger)
    lookahead.fit(1)
    hypers = lookahead.opt.hypers
    warned = user_warnings(lambda: lookahead.load("good"))
    assert any("Lookahead, which keeps state" in message for message in warned), warned
    assert lookahead.opt.hypers is hypers and "hypers" not in vars(lookahead.opt)

    # A torch optimizer that never stepped: saving does not initialise it (DCP would, with a step).
    unstepped = learner("torch")
    unstepped.create_opt()
    sharded_save(unstepped, "unstepped")
    assert not unstepped.opt.opt.state
    fresh = learner("torch", seed=1)
    warned = user_warnings(lambda: fresh.load("unstepped"))
    assert any("holds no optimizer state" in message for message in warned), warned
    assert not fresh.opt.opt.state

    # fastai's Lookahead keeps state of its own that a sharded checkpoint does not hold: refused, unless with_opt=False.
    with pytest.raises(ValueError, match="Invalid with_opt: True, but the optimizer is a Lookahead"):
        sharded_save(lookahead, "lookahead")
    sharded_save(lookahead, "lookahead", with_opt=False)
    assert (tmp_path / "models" / "lookahead.dcp" / ".metadata").is_file()


def test_a_failed_optimizer_load_is_undone_and_non_tensors_are_read_weights_only(tmp_path, monkeypatch):
    from fractions import Fraction

    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as dcp_state_dict
    from fastai.optimizer import Optimizer

    from fastema import EMASchedule

    def learner(optimizer="fastai", seed=0):
        schedule = EMASchedule(start_decay=0.5, final_decay=workers.DECAY)
        return workers.mlp_learner([schedule], tmp_path, optimizer, seed=seed)

    # The optimizer's load writes, then fails: the optimizer is put back as it was, with a warning.
    for optimizer, owner, name in [
        ("fastai", Optimizer, "load_state_dict"),
        ("torch", dcp_state_dict, "set_optimizer_state_dict"),
    ]:
        source = learner(optimizer)
        source.fit(1)
        sharded_save(source, optimizer)
        target = learner(optimizer, seed=1)
        target.fit(1, lr=0.003)
        before = learner_state(target)
        original = getattr(owner, name)

        def write_then_fail(*args, original=original, **kwargs):
            original(*args, **kwargs)
            raise RuntimeError("disk on fire")

        with monkeypatch.context() as patch:
            patch.setattr(owner, name, write_then_fail)
            warned = user_warnings(lambda target=target, optimizer=optimizer: target.load(optimizer))
        assert any("disk on fire" in message for message in warned), warned
        after = learner_state(target)
        assert_equal_nested(after["optimizer"], before["optimizer"])
        assert_equal_nested(after["hypers"], before["hypers"])
        assert_equal_nested(after["model"], learner_state(source)["model"])  # the model did load, as in fastai

    # A hyperparameter that weights_only=True does not unpickle: refused, unless the caller allows it.
    odd = learner()
    odd.fit(1)
    odd.opt.hypers[0]["note"] = Fraction(1, 3)
    sharded_save(odd, "odd")
    target = learner(seed=1)
    with pytest.raises(ValueError, match=r"odd\.dcp"):
        target.load("odd")
    target.load("odd", weights_only=False)
    assert target.opt.hypers[0]["note"] == Fraction(1, 3)

    # The callback's decay is checked before anything is written on the single-file path too.
    bad = learner()
    bad.fit(1)
    bad.ema_schedule.decay = 2.0
    bad.save("bad_decay")
    before = learner_state(target)
    with pytest.raises(ValueError, match=r"Invalid decay: 2\.0"):
        target.load("bad_decay")
    assert_equal_nested(learner_state(target), before)

    # Damaged entries: a model tensor stored as something else, EMA names that are not a uint8 tensor.
    model_state = dict(odd.model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: no process group, one process assumed
        dcp.save(
            {"model": dict(model_state, **{"layers.0.bias": "text"})}, checkpoint_id=str(tmp_path / "models" / "m.dcp")
        )
        dcp.save(
            {"model": model_state, "ema": {"names": torch.zeros(3)}}, checkpoint_id=str(tmp_path / "models" / "n.dcp")
        )
        names = torch.tensor([0xFF, 0xFE], dtype=torch.uint8)
        dcp.save({"model": model_state, "ema": {"names": names}}, checkpoint_id=str(tmp_path / "models" / "u.dcp"))
    with pytest.raises(ValueError, match=r"layers\.0\.bias: not a tensor in the checkpoint"):
        target.load("m")
    with pytest.raises(ValueError, match=r"ema\.names is not a uint8 tensor"):
        target.load("n")
    with pytest.raises(ValueError, match="names that are not text"):
        target.load("u")
    (tmp_path / "models" / "half.dcp").mkdir()  # what an interrupted dcp.save leaves, with no .pth beside it
    with pytest.raises(FileNotFoundError, match=r"half\.dcp is not a complete DCP checkpoint"):
        target.load("half")
    assert_equal_nested(learner_state(target), before)


def test_a_sharded_checkpoint_saved_before_the_ema_started_resumes_bit_for_bit(tmp_path):
    from fastai.callback.core import Callback

    from fastema import EMASchedule

    class SaveFirstEpoch(Callback):
        def after_epoch(self):
            if self.epoch == 0:
                sharded_save(self.learn, "epoch_0")

    def learner(seed=0, cbs=()):
        schedule = EMASchedule(start_decay=0.5, final_decay=workers.DECAY, start=1, finish=2)
        return workers.mlp_learner([schedule, *cbs], tmp_path, "fastai", seed=seed)

    whole = learner(cbs=[SaveFirstEpoch()])
    whole.fit(3)
    resumed = learner(seed=1)
    resumed.load("epoch_0")  # the EMA had not started: the checkpoint says so
    assert resumed.ema_schedule.engine.num_updates == 0
    resumed.fit(3, start_epoch=1)
    assert_equal_nested(learner_state(resumed), learner_state(whole))
    assert resumed.ema_schedule.engine.num_updates == whole.ema_schedule.engine.num_updates == 8
    assert resumed.ema_schedule.decay == whole.ema_schedule.decay
