"""DeepSpeed (ZeRO stages 0-3, the HF Trainer, Accelerate) with 2 real ranks: gloo on CPU, DS_ACCELERATOR=cpu.

Every case runs in one launch (`deepspeed_workers.deepspeed_worker`): DeepSpeed's import and its communication
extension cost most of the time. Each test reads the ranks' results and compares them with the float64 oracle.
"""

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("deepspeed") is None:  # looked up, not imported: collection stays fast
    pytest.skip("needs DeepSpeed (pip install 'fastema[deepspeed]')", allow_module_level=True)

import deepspeed_workers as ds
import distributed_workers as workers
from helpers import assert_state_matches

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# A float32 EMA of values the oracle averages in float64: float32 rounding at each of a few updates.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("deepspeed")
    workers.launch(ds.deepspeed_worker, out_dir, 600)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(workers.WORLD)]
    return results, out_dir


def test_zero3_ema_keeps_this_ranks_partitions_updates_without_communication_and_gathers_to_the_reference(ranks):
    results, _ = ranks
    for result in (r["zero3"] for r in results):
        assert result["sharded"] and result["num_updates"] == ds.STEPS  # attach(engine): one update per step
        assert result["dtypes"] == ["torch.float32", "torch.int64"]  # a float32 EMA of a bf16 engine
        assert result["update_collectives"] == []  # the update: local partitions only
        assert result["state_collectives"]  # while the same probe sees state_dict()'s gathers
        assert_state_matches(result["full"], result["reference"], rtol=RTOL, atol=ATOL)
        assert result["bytes"] <= 0.6 * result["full_bytes"]  # about half of the full EMA on each of 2 ranks
    # The partitions tile the parameters exactly (no padding kept): the int buffer is every rank's own.
    assert sum(r["zero3"]["bytes"] for r in results) == results[0]["zero3"]["full_bytes"] + 8


def test_zero3_evaluation_runs_with_the_ema_and_the_partitions_come_back_bit_for_bit(ranks):
    results, _ = ranks
    expected = ema_model_output(results[0]["zero3"]["full"])
    for result in (r["zero3"] for r in results):
        # The engine's forward gathers the swapped partitions, the persistent (never released) biases included.
        torch.testing.assert_close(result["ema_output"], expected, rtol=0, atol=0)
        assert not torch.equal(result["own_before"], result["ema_output"])  # the EMA differs from the model
        assert torch.equal(result["own_after"], result["own_before"])
        assert result["restored"] and result["restored_after_error"]


def ema_model_output(full_ema):
    """The Mlp with the EMA's weights in bf16 (as the swap puts them into the bf16 partitions), on the probe."""
    model = workers.Mlp()
    model.load_state_dict({name: tensor.to(tensor.dtype) for name, tensor in full_ema.items()})
    probe = torch.randn(4, 6, generator=torch.Generator().manual_seed(7)).bfloat16()
    with torch.no_grad():
        return model.bfloat16().eval()(probe).float()


def test_zero3_checkpoint_per_rank_resumes_bit_exact_and_consolidates(ranks):
    results, out_dir = ranks
    for result in (r["zero3"] for r in results):
        assert result["loaded_equal"]  # each rank's partitions back, bit for bit
        assert result["resumed_num_updates"] == ds.STEPS
        for name, tensor in result["full"].items():  # the same last steps from the checkpoint: the same EMA
            assert torch.equal(result["resumed"][name], tensor), name
        assert result["consolidated_reloaded"]  # the consolidated EMA state reloads into the partitions
    consolidated = torch.load(out_dir / "consolidated.pt", weights_only=True)
    at_save = results[0]["zero3"]["at_save"]
    assert list(consolidated) == list(at_save)
    for name, tensor in at_save.items():
        assert torch.equal(consolidated[name], tensor), name
    workers.Mlp().load_state_dict(consolidated)  # a model.state_dict()-style file
    assert not [name for name in os.listdir(out_dir) if "staging" in name or name.endswith(".tmp")]


def test_consolidating_an_ema_state_keeps_its_length_in_samples(ranks, tmp_path):
    from fastema.deepspeed import consolidate_ema

    _, out_dir = ranks
    for r in range(workers.WORLD):  # partitions of an EMA made with half_life and batch_size
        state = torch.load(out_dir / "ckpt" / "global_step3" / f"fastema_ema_rank{r}.pt", weights_only=True)
        state["ema"].update(half_life=1000.0, batch_size=8.0)
        torch.save(state, tmp_path / f"fastema_ema_rank{r}.pt")
    consolidated = torch.load(consolidate_ema(tmp_path, tmp_path / "ema.pt", ema_state=True), weights_only=True)
    assert (consolidated["half_life"], consolidated["batch_size"]) == (1000.0, 8.0)
    assert "half_life" not in torch.load(out_dir / "consolidated_ema.pt", weights_only=True)  # a plain decay: none


def test_zero3_checkpoints_that_do_not_fit_are_refused_on_every_rank_naming_the_fix(ranks):
    results, _ = ranks
    for result in (r["zero3"] for r in results):
        refusals = result["refusals"]
        assert set(refusals) == {"tampered", "resized", "wider", "unpartitioned"}
        assert "saved by rank 0 of 4" in refusals["tampered"] and "rank 1 of 4" in refusals["tampered"]
        assert "partition sizes differ (layers.0.weight: 31 != 30)" in refusals["resized"]
        assert "full shapes differ (layers.0.weight: [10, 6] != [12, 6]" in refusals["wider"]
        assert "this EMA is not partitioned" in refusals["unpartitioned"]
        for message in refusals.values():
            assert "nothing was loaded" in message and "consolidate_ema" in message and "ema.load" in message
        assert result["unchanged"]


def test_checkpoints_failing_on_one_rank_or_in_the_engine_raise_on_every_rank_and_change_no_ema(ranks):
    results, _ = ranks
    for result in (r["zero3"] for r in results):
        # The EMA files are written before the engine's checkpoint (and its `latest`).
        assert result["ema_before_engine"] == [True]
        # Rank 1's file is malformed (a TypeError there): every rank refuses, rank 0 included, none waits.
        assert "rank 1: TypeError: Invalid last_decay" in result["one_bad"] and "rank 0" not in result["one_bad"]
        # The engine's states are gone: it loads nothing, and the EMA is not written either.
        assert result["no_engine"] is not None
        assert result["failures_unchanged"]
        # Rank 1 cannot write its EMA file: every rank raises (none waits in a barrier for it).
        assert "rank 1:" in result["save_failure"] and "rank 0:" not in result["save_failure"]


def test_an_ema_built_before_deepspeed_initialize_refuses_its_next_update(ranks):
    results, _ = ranks
    for result in (r["zero3"] for r in results):
        assert "Build the ModelEMA after fully_shard(model) or deepspeed.initialize" in result["early"]
        assert result["early_counts"] == (0, 0)  # refused: not even counted


def test_partitions_deepspeed_moves_are_followed_or_refused_never_averaged_stale(ranks):
    results, _ = ranks
    for result in (r["moved"] for r in results):
        # zero.Init: partitioned before initialize, which moves them into flat buffers; the EMA follows.
        assert result["num_updates"] == 3
        assert_state_matches(result["followed"], result["reference"], rtol=RTOL, atol=ATOL)
        # Every partition moved to new storage holding the weights + 1: the EMA moves 1 - decay toward them.
        assert result["moved_all"] == pytest.approx(dict.fromkeys(result["moved_all"], 1 - ds.DECAY), abs=0.01)
        # A partition moved by hand, not the watched one: the first update's read-back refuses it.
        assert "did not follow its ZeRO-3 partition" in result["read_back"] and "layers.2.weight" in result["read_back"]
        # A partition in a storage of its own, moved after the first update: watched too, so followed.
        expected = {name: (1 - ds.DECAY if name == "layers.2.weight" else 0.0) for name in result["moved_one"]}
        assert result["moved_one"] == pytest.approx(expected, abs=0.01)


def test_parameters_offloaded_to_nvme_are_refused_naming_the_fix(ranks):
    results, _ = ranks
    for result in (r["moved"] for r in results):
        assert "layers.0.weight" in result["nvme"] and "offloaded to NVMe" in result["nvme"]
        assert 'Offload parameters to "cpu"' in result["nvme"]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stages_0_to_2_keep_a_whole_ema_like_ddp(ranks, stage):
    results, _ = ranks
    for result in (r[f"stage{stage}"] for r in results):
        assert not result["sharded"] and result["num_updates"] == ds.STEPS and result["skipped"] == 0
        assert_state_matches(result["ema"], result["reference"], rtol=RTOL, atol=ATOL)


def test_steps_the_engine_skips_do_not_move_the_ema(ranks):
    results, _ = ranks
    for result in (r["overflow"] for r in results):
        assert result["skipped"] == 2 and result["num_updates"] == ds.STEPS - 2
        assert_state_matches(result["ema"], result["reference"], rtol=RTOL, atol=ATOL)


def test_hf_trainer_with_a_zero3_config_averages_evaluates_with_the_ema_and_resumes(ranks):
    from test_trainers import Tokens, tiny_bert

    results, _ = ranks
    for result in (r["trainer"] for r in results):
        assert result["sharded"] and result["num_updates"] == 4
        assert_state_matches(result["ema"], result["reference"], rtol=RTOL, atol=ATOL)
        assert "fastema_ema.pt" in result["files"] and "global_step2" in result["files"]
        assert result["resumed_num_updates"] == 4
        for name, tensor in result["ema"].items():  # resumed from checkpoint-2: the same EMA, bit for bit
            assert torch.equal(result["resumed"][name], tensor), name
    # The evaluation at the last step ran with the EMA: the loss of a plain model holding it.
    model = tiny_bert().eval()
    model.load_state_dict(results[0]["trainer"]["ema"], strict=False)
    data = Tokens(8, seed=1)
    with torch.no_grad():
        loss = model(input_ids=data.ids, labels=data.labels).loss.item()
    assert results[0]["trainer"]["evaluations"] == pytest.approx([loss], rel=1e-5)


def test_accelerate_with_a_deepspeed_plugin_attaches_to_the_prepared_engine(ranks):
    results, _ = ranks
    for result in (r["accelerate"] for r in results):
        assert "attach the DeepSpeed engine instead" in result["wrong_attach"]
        assert result["sharded"] and result["num_updates"] == ds.STEPS
        assert_state_matches(result["ema"], result["reference"], rtol=RTOL, atol=ATOL)


def fake_engine(model, loaded):
    """A stand-in for a DeepSpeed engine (no launch): `load_checkpoint` returns `loaded`, `save_checkpoint` records."""
    engine_class = type("DeepSpeedEngine", (torch.nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    engine = engine_class()
    engine.module, engine.global_steps, engine.saves = model, 3, []

    def save_checkpoint(save_dir, tag, **kwargs):
        engine.saves.append(sorted(os.listdir(os.path.join(save_dir, tag))))
        with open(os.path.join(save_dir, "latest"), "w") as latest:
            latest.write(tag)

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = lambda load_dir, tag, **kwargs: loaded
    return engine


def test_an_engine_that_loads_nothing_leaves_the_ema_unchanged_and_raises(tmp_path):
    from fastema import ModelEMA
    from fastema.deepspeed import load_checkpoint, save_checkpoint

    model = workers.Mlp()
    ema = ModelEMA(model, ds.DECAY)
    engine = fake_engine(model, (None, None))  # DeepSpeed's answer, after a warning, when it finds no checkpoint
    save_checkpoint(engine, ema, tmp_path)
    assert engine.saves == [["fastema_ema.pt"]]  # the EMA was in the tag folder before the engine saved
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1)
    ema.update()
    before = {name: tensor.clone() for name, tensor in ema.state_dict()["tensors"].items()}
    with pytest.raises(FileNotFoundError, match="DeepSpeed loaded no checkpoint"):
        load_checkpoint(engine, ema, tmp_path)
    assert ema.num_updates == 1
    for name, tensor in ema.state_dict()["tensors"].items():
        assert torch.equal(tensor, before[name]), name


def test_pipeline_engines_and_modules_are_refused_naming_what_is_supported():
    from fastema import ModelEMA

    module_class = type("PipelineModule", (torch.nn.Module,), {"__module__": "deepspeed.runtime.pipe.module"})
    pipe_module = module_class()
    pipe_module.layer = torch.nn.Linear(2, 2)
    engine = fake_engine(pipe_module, None)
    engine.__class__ = type("PipelineEngine", (type(engine),), {"__module__": "deepspeed.runtime.pipe.engine"})
    for model in (engine, pipe_module):
        with pytest.raises(TypeError, match=r"pipeline parallelism.*Supported: the DeepSpeedEngine"):
            ModelEMA(model)
    ema = ModelEMA(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="DeepSpeed PipelineEngine"):  # train_batch() never calls engine.step()
        ema.attach(engine)
