"""DDP and FSDP2 with real torch.distributed processes (2 ranks, gloo on CPU) against the single-process reference."""

import signal

import torch

import distributed_workers as workers
from helpers import assert_state_matches
from reference import ReferenceEMA, expected_tracked


def single_process_reference():
    """The same model, global batches and optimizer in one process: the EMA every rank must hold."""
    torch.manual_seed(0)
    model = workers.Mlp().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    tracked = expected_tracked(model)
    reference = ReferenceEMA(tracked)
    for x in workers.global_batches():
        # Each rank's loss is the mean over its half; DDP/FSDP average the two gradients.
        halves = x.split(workers.GLOBAL_BATCH // workers.WORLD)
        loss = sum(workers.loss_of(model, half) for half in halves) / workers.WORLD
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.update(tracked, workers.DECAY)
    model.calls.fill_(workers.STEPS)  # each rank's model ran forward once per step
    reference.update({"calls": model.calls}, 1.0)  # the count is copied, never averaged
    return model, reference


def test_ddp_ema_is_identical_on_every_rank_and_equals_the_single_process_reference(tmp_path):
    workers.launch(workers.ddp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(workers.WORLD)]
    _, reference = single_process_reference()
    assert not any(name.startswith("module.") for name in ranks[0]["names"])  # the unwrapped module's names
    assert len(ranks[0]["writes"]) == 1 and ranks[1]["writes"] == []  # every rank called save; rank 0 wrote
    for result in ranks:
        assert result["num_updates"] == workers.STEPS
        assert_state_matches(result["ema"], reference.state, rtol=1e-10, atol=1e-12)
        for name, tensor in result["ema"].items():
            assert torch.equal(tensor, ranks[0]["ema"][name]), name  # bit-identical across ranks
            assert torch.equal(result["loaded"][name], tensor), name  # every rank loads rank 0's file


def test_flattened_emas_leave_ddp_training_bit_identical_in_every_construction_order(tmp_path):
    workers.launch(workers.ddp_flatten_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(workers.WORLD)]
    for result in ranks:
        for run in ("ema_after_ddp", "ema_before_ddp", "two_emas"):
            for name, tensor in result[run].items():
                assert torch.equal(tensor, ranks[0]["plain"][name]), (run, name)  # and so, identical across ranks


def test_fsdp2_ema_is_shard_local_and_gathers_to_the_reference(tmp_path):
    workers.launch(workers.fsdp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(workers.WORLD)]
    _model, reference = single_process_reference()
    for result in ranks:
        assert result["sharded"] and result["num_updates"] == workers.STEPS
        assert result["collectives_in_update"] == []  # no all-gather (or any collective) in the step
        assert result["collectives_in_state_dict"]  # while gathering the full EMA shows up in the same probe
        assert_state_matches(result["full"], reference.state, rtol=1e-10, atol=1e-12)  # the gathered full EMA
        assert result["restored"] and result["reloaded_equal"]
        # Per-rank EMA memory: about half of the full EMA on each of 2 ranks (DDP keeps all of it).
        assert result["bytes"] <= 0.6 * result["full_bytes"]
    extra_copies = (workers.WORLD - 1) * ranks[0]["replicated_bytes"]
    assert sum(result["bytes"] for result in ranks) == ranks[0]["full_bytes"] + extra_copies
    # Validation with the EMA weights: the sharded model computes what the reference EMA model computes.
    ema_model = workers.Mlp().double()
    ema_model.load_state_dict(dict(reference.state.items()), strict=True)
    with torch.no_grad():
        expected = ema_model.eval()(workers.global_batches()[0])
    for result in ranks:
        torch.testing.assert_close(result["ema_output"], expected, rtol=1e-10, atol=1e-12)
        # After the swap the model computes with its own weights, root-owned parameters included.
        torch.testing.assert_close(result["model_output"], result["own_output"], rtol=1e-12, atol=1e-12)


def test_fastai_distrib_ctx_ema_on_every_rank_and_rank0_writes(tmp_path):
    workers.launch(workers.fastai_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(workers.WORLD)]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"  # the callback saw the model wrapped by Accelerate
    assert len(ranks[0]["writes"]) == 2 and ranks[1]["writes"] == []  # model + EMA file, by rank 0 only
    for result in ranks:
        for name, tensor in result["model"].items():  # the flattened EMA left DDP training exactly as it was
            assert torch.equal(tensor, result["plain"][name]), name
        assert result["num_updates"] == result["steps"] == 8  # 2 epochs of 4 batches: each rank has half the data
        assert_state_matches(result["ema"], result["reference"], rtol=1e-5, atol=1e-6)  # float32 model
        for name in result["parameters"]:  # DDP keeps the weights, hence their EMA, identical
            assert torch.equal(result["ema"][name], ranks[0]["ema"][name]), name
        for name, tensor in result["loaded"].items():  # every rank loads rank 0's file
            assert torch.equal(tensor, ranks[0]["ema"][name]), name
    # BatchNorm statistics are each rank's own under DDP without SyncBatchNorm (fastai's sync_bn=True on GPUs
    # makes them global), so their EMA is too; rank 0's is the one saved.
    assert not torch.equal(ranks[0]["ema"]["body.1.running_mean"], ranks[1]["ema"]["body.1.running_mean"])


def test_the_fsdp2_gather_is_bit_identical_to_full_tensor_and_resharding_takes_each_rank_part(tmp_path):
    workers.launch(workers.gather_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(workers.WORLD)]
    assert [ranks[r]["rank 1 empty"]["local_rows"] for r in range(2)] == [1, 0]
    assert [ranks[r]["uneven columns"]["local_rows"] for r in range(2)] == [3, 2]
    for result in ranks:
        for forward in (True, False):
            late = result.pop(f"sharded after the EMA, forward {forward}")
            assert "after this ModelEMA was built" in late["refused"] and "fully_shard" in late["refused"], forward
            assert late["num_updates"] == late["num_steps"] == 0, forward  # refused: not even counted as a step
        for name, case in result.items():
            gathered, expected = case["gathered"], case["expected"]
            assert gathered.dtype == expected.dtype and gathered.shape == expected.shape, name
            assert torch.equal(gathered, expected) and case["contiguous"], name
            assert case["part"].shape == case["own_part"].shape and torch.equal(case["part"], case["own_part"]), name
            assert case["reshard_collectives"] == [], name  # every rank holds the full tensor: nothing to send
            if name != "replicated":  # FSDP2's layout: a plain c10d all-gather, no functional collective
                ops = case["gather_collectives"]
                assert ops and not any("_c10d_functional" in op for op in ops), name


def test_the_launcher_tolerates_only_the_gloo_exit_abort():
    abort = f"...\n{workers.GLOO_EXIT_ABORT}\n"
    assert workers._tolerated(-signal.SIGABRT, True, abort)
    assert not workers._tolerated(-signal.SIGABRT, False, abort)  # before the final barrier: a real crash
    assert not workers._tolerated(-signal.SIGABRT, True, "free(): invalid pointer\n")  # another abort
    assert not workers._tolerated(-signal.SIGSEGV, True, abort)
    assert not workers._tolerated(1, True, abort)
