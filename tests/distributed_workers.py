"""Code that runs inside the ranks of the distributed tests (spawned processes, gloo on CPU)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 12
GLOBAL_BATCH = 8
DECAY = 0.8


class Mlp(nn.Module):
    """No BatchNorm (DDP would average per-rank statistics differently); an int buffer that is copied."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 3))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.layers(x)


def global_batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 6, generator=generator, dtype=torch.float64) for _ in range(STEPS)]


def loss_of(model, x):
    return model(x).square().mean()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# PyTorch's known gloo teardown abort (docs/multi-gpu.md): a gloo worker thread still owns the last
# collective's work object and drops a Python tensor while the interpreter finalizes.
GLOO_EXIT_ABORT = "terminate called without an active exception"
tolerated_aborts: list[str] = []  # one line per tolerated abort, reported by conftest's terminal summary


def _tolerated(returncode: int | None, passed_barrier: bool, stderr: str) -> bool:
    """Whether a rank's exit is the known gloo teardown abort: SIGABRT, after the final barrier, with its message."""
    return returncode == -signal.SIGABRT and passed_barrier and GLOO_EXIT_ABORT in stderr


def launch(worker, out_dir, timeout_s=120.0, *args, world=WORLD):
    """Run `worker(rank, out_dir, *args)` on `world` processes (torch.multiprocessing, spawn); fail past the timeout."""
    for rank in range(world):  # files of an earlier launch into the same folder
        for path in (_done_marker(out_dir, rank), _stderr_file(out_dir, rank)):
            if os.path.exists(path):
                os.remove(path)
    port = free_port()
    context = mp.start_processes(
        _entry, args=(worker, port, str(out_dir), world, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        try:
            # The grace period lets the other ranks exit by themselves after one fails: their exits are judged too.
            while not context.join(timeout=1.0, grace_period=5.0):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    raise TimeoutError(f"{worker.__name__} did not finish within {timeout_s} s")
        finally:
            stderrs = [_read(_stderr_file(out_dir, rank)) for rank in range(world)]
            for rank, text in enumerate(stderrs):  # what the ranks wrote, where pytest shows it
                if text:
                    sys.stderr.write(f"--- rank {rank} stderr ---\n{text}")
    except mp.ProcessExitedException:
        # Only the known gloo teardown abort is tolerated (every rank's results are written by then);
        # any other signal or exit code, or an abort before a rank's final barrier, fails the test.
        finished = [os.path.exists(_done_marker(out_dir, rank)) for rank in range(world)]
        codes = [process.exitcode for process in context.processes]
        if not all(finished) or not all(
            code == 0 or _tolerated(code, passed, text) for code, passed, text in zip(codes, finished, stderrs)
        ):
            raise
        for rank, code in enumerate(codes):
            if code != 0:
                line = f"{worker.__name__}: rank {rank} aborted at exit after its final barrier (gloo teardown)"
                tolerated_aborts.append(line)
                print(f"tolerated: {line}", file=sys.stderr)
    finally:
        for rank in range(world):
            for path in (_done_marker(out_dir, rank), _stderr_file(out_dir, rank)):
                if os.path.exists(path):
                    os.remove(path)


def _done_marker(out_dir, rank) -> str:
    return os.path.join(str(out_dir), f".rank{rank}.done")


def _stderr_file(out_dir, rank) -> str:
    return os.path.join(str(out_dir), f".rank{rank}.stderr")


def _read(path) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as file:
        return file.read()


def _entry(rank, worker, port, out_dir, world, *args):
    # The rank's stderr (file descriptor 2: C++'s messages too, as the abort's) into a file the launcher reads.
    with open(_stderr_file(out_dir, rank), "w") as file:
        os.dup2(file.fileno(), 2)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, out_dir, *args)
        dist.barrier()  # no rank tears gloo down while another still talks to it
        with open(_done_marker(out_dir, rank), "w"):
            pass
    finally:
        dist.destroy_process_group()


def ema_bytes(ema) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in ema._tracker.binding.ema_tensors)


def record_writes(module, delay_s=0.0):
    """Replace `module.atomic_save` by a wrapper that records the paths it writes (this process only).

    `delay_s`: wait that long before each write, as a slow file system would.
    """
    writes = []
    original = module.atomic_save

    def recording_save(obj, path, **kwargs):
        writes.append(str(path))
        time.sleep(delay_s)
        return original(obj, path, **kwargs)

    module.atomic_save = recording_save
    return writes


def ddp_worker(rank, out_dir):
    from fastema import ModelEMA
    from fastema.core import checkpoint

    writes = record_writes(checkpoint)  # where ModelEMA.save writes from

    torch.manual_seed(0)
    model = Mlp().double()
    ddp = nn.parallel.DistributedDataParallel(model)
    ema = ModelEMA(ddp, DECAY)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    share = GLOBAL_BATCH // WORLD
    for x in global_batches():
        loss = loss_of(ddp, x[rank * share : (rank + 1) * share])  # DDP averages the gradients: the global mean
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    ema.save(os.path.join(out_dir, "ema.pth"))  # every rank calls it; rank 0 writes
    dist.barrier()
    loaded = ModelEMA(Mlp().double(), DECAY)
    loaded.load(os.path.join(out_dir, "ema.pth"))
    torch.save(
        {
            "ema": dict(ema.module.state_dict()),
            "loaded": dict(loaded.module.state_dict()),
            "names": ema.tensor_names,
            "bytes": ema_bytes(ema),
            "num_updates": ema.num_updates,
            "writes": writes,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def ddp_flatten_worker(rank, out_dir):
    """DDP training with flattened EMAs built in every order must be bit-identical to plain DDP training."""
    from fastema import ModelEMA

    def train(setup):
        torch.manual_seed(0)
        model = Mlp().double()
        ddp, emas = setup(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
        share = GLOBAL_BATCH // WORLD
        for step, x in enumerate(global_batches()):
            # Rank-dependent data: without DDP's all-reduce each rank would train on its own gradients.
            loss_of(ddp, x[rank * share : (rank + 1) * share] * (rank + 1)).backward()
            optimizer.step()
            optimizer.zero_grad()
            for ema in emas:
                ema.update()
            if step == 2:
                for ema in emas:
                    ema.module.float()  # the EMA re-plans, packing the model again, now under DDP
        return {name: t.detach().clone() for name, t in model.state_dict().items()}

    def ddp(model):
        return nn.parallel.DistributedDataParallel(model)

    def ema_after_ddp(model):
        wrapped = ddp(model)
        return wrapped, [ModelEMA(wrapped, DECAY, flatten_model=True)]

    def ema_before_ddp(model):
        ema = ModelEMA(model, DECAY, flatten_model=True)
        return ddp(model), [ema]

    def two_emas(model):
        wrapped = ddp(model)
        return wrapped, [ModelEMA(wrapped, DECAY, flatten_model=True), ModelEMA(wrapped, 0.5, flatten_model=True)]

    runs = {
        "plain": train(lambda model: (ddp(model), [])),
        "ema_after_ddp": train(ema_after_ddp),
        "ema_before_ddp": train(ema_before_ddp),
        "two_emas": train(two_emas),
    }
    torch.save(runs, os.path.join(out_dir, f"rank{rank}.pt"))


def fsdp_worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastema import ModelEMA

    torch.manual_seed(0)
    model = Mlp().double()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in list(model.layers)[:-1]:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the last Linear's parameters belong to the root group
    ema = ModelEMA(model, DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    share = GLOBAL_BATCH // WORLD

    Collectives = collective_recorder()
    collectives_in_update = []

    for step, x in enumerate(global_batches()):
        loss = loss_of(model, x[rank * share : (rank + 1) * share])  # FSDP averages the gradients too
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 3:
            with Collectives() as recorder:
                ema.update()
            collectives_in_update = recorder.names
        else:
            ema.update()
    with Collectives() as recorder:
        full = ema.state_dict()  # collective: every rank gathers
    collectives_in_state_dict = recorder.names  # the control: the same probe does see the gather
    # Validation: the EMA's shards swapped into the sharded model, restored exactly after.
    probe = global_batches()[0]
    before = {name: p.full_tensor().clone() for name, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        model(probe)  # an eval forward first: the root's parameters stay unsharded after it
        with ema.use_ema_weights():
            ema_output = model(probe)
        model_output = model(probe)  # the first forward after the swap: the model's own weights again
    model.train()
    model.reshard()  # the eval forward left the root's parameters unsharded
    after = {name: p.full_tensor() for name, p in model.named_parameters()}
    restored = all(torch.equal(before[name], after[name]) for name in before)
    own_model = Mlp().double().eval()
    own_model.load_state_dict({**before, "calls": model.calls}, strict=True)
    with torch.no_grad():
        own_output = own_model(probe)
    ema.save(os.path.join(out_dir, "ema.pth"))
    dist.barrier()
    fresh = ModelEMA(model, DECAY)  # starts from the model's weights...
    fresh.load(os.path.join(out_dir, "ema.pth"))  # ...and reshards the full EMA
    reloaded_equal = all(
        torch.equal(a, b) for a, b in zip(fresh._tracker.binding.ema_tensors, ema._tracker.binding.ema_tensors)
    )
    full_model_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + 8  # + the int buffer
    replicated_bytes = 8  # buffers are not sharded by FSDP: every rank keeps the count
    torch.save(
        {
            "full": dict(full["tensors"].items()),
            "ema_output": ema_output,
            "model_output": model_output,
            "own_output": own_output,
            "restored": restored,
            "reloaded_equal": reloaded_equal,
            "bytes": ema_bytes(ema),
            "full_bytes": full_model_bytes,
            "replicated_bytes": replicated_bytes,
            "collectives_in_update": collectives_in_update,
            "collectives_in_state_dict": collectives_in_state_dict,
            "sharded": ema.sharded,
            "num_updates": ema.num_updates,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def fastai_worker(rank, out_dir):
    """fastai's DistributedTrainer (Accelerate, DDP): EMA per rank, checkpoint written by rank 0 only."""
    from fastai.callback.core import Callback
    from fastai.distributed import DistributedDL
    from fastai.torch_core import defaults

    if not torch.cuda.is_available():
        # fastai's DistributedDL broadcasts its shuffled indices with `.cuda()` (written for nccl);
        # on CPU only that broadcast is replaced by the same one over gloo.
        def broadcast_over_gloo(self, values, source_rank):
            tensor = torch.tensor(values, dtype=torch.long)
            dist.broadcast(tensor, source_rank)
            return tensor.tolist()

        DistributedDL._broadcast = broadcast_over_gloo

    from fastema import EMACallback
    from fastema.fastai import checkpoint as learner_checkpoint
    from helpers import make_learner
    from reference import ReferenceEMA, expected_tracked

    class Reference(Callback):
        """A float64 reference EMA of this rank's model, updated from the weights after every optimizer step."""

        order = EMACallback.order + 1

        def before_fit(self):
            self.reference, self.wrapped, self.steps = None, type(self.learn.model).__name__, 0

        def after_step(self):
            self.steps += 1
            tracked = expected_tracked(self.learn.model.module)
            if self.reference is None:  # the EMA starts from the weights before the first step
                self.reference = ReferenceEMA(self.start)
            self.reference.update(tracked, DECAY)

        def before_batch(self):
            if self.training and self.reference is None:
                self.start = {n: t.detach().clone() for n, t in expected_tracked(self.learn.model.module).items()}

    defaults.cpus = 0  # no DataLoader worker processes inside the ranks
    plain = make_learner(path=out_dir)  # the same training without an EMA
    with plain.distrib_ctx(sync_bn=False, cpu=True):
        plain.fit(2)
    writes = record_writes(learner_checkpoint, delay_s=1.0 if rank == 0 else 0.0)
    reference = Reference()
    # flatten_model: the callback builds its engine after distrib_ctx has wrapped the model in DDP.
    learn = make_learner(cbs=[EMACallback(decay=DECAY, flatten_model=True), reference], path=out_dir)
    with learn.distrib_ctx(sync_bn=False, cpu=True):  # multi-CPU (gloo); SyncBatchNorm needs GPUs
        learn.fit(2)
    own_ema = {name: tensor.clone() for name, tensor in learn.model_ema.state_dict().items()}
    learn.save("run")  # fastai: only rank 0 writes (slowly here), the other ranks return at once...
    learn.load("run")  # ...and load straight away: learn.load must wait for rank 0's files itself
    torch.save(
        {
            "ema": own_ema,
            "loaded": dict(learn.model_ema.state_dict()),
            "reference": reference.reference.state,
            "parameters": [name for name, _ in learn.model.named_parameters()],
            "wrapped": reference.wrapped,
            "writes": writes,
            "num_updates": learn.ema.engine.num_updates,
            "steps": reference.steps,
            "model": dict(learn.model.state_dict()),
            "plain": dict(plain.model.state_dict()),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def memory_worker(rank, out_dir, model_name="xresnet50"):
    """Per-rank EMA bytes for one model under DDP and under FSDP2 (each block sharded), for the docs."""
    from fastai.vision.models import xresnet
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastema import ModelEMA

    torch.manual_seed(0)
    ddp_ema = ModelEMA(nn.parallel.DistributedDataParallel(getattr(xresnet, model_name)()))
    model = getattr(xresnet, model_name)()
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fsdp_ema = ModelEMA(model)
    with open(os.path.join(out_dir, f"memory{rank}.txt"), "w") as out:
        out.write(f"{model_name} rank {rank}: DDP EMA {ema_bytes(ddp_ema) / 2**20:.1f} MiB, ")
        out.write(f"FSDP2 EMA {ema_bytes(fsdp_ema) / 2**20:.1f} MiB\n")


# ---- sharded (DCP) checkpoints ------------------------------------------------------------------------


def sharded_mlp(world, hidden=10):
    """The Mlp under FSDP2 on a `world`-rank CPU mesh (each Linear its own group; the root owns the last)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Mlp().double()
    if hidden != 10:
        model.layers[0], model.layers[2] = nn.Linear(6, hidden).double(), nn.Linear(hidden, 5).double()
    mesh = init_device_mesh("cpu", (world,))
    for layer in list(model.layers)[:-1]:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def dcp_save_worker(rank, out_dir):
    """Train the FSDP2 Mlp with an EMA and save model and EMA with DCP (every rank its shard); also a wider model."""
    import torch.distributed.checkpoint as dcp

    from fastema import ModelEMA

    model = sharded_mlp(WORLD)
    ema = ModelEMA(model, DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    share = GLOBAL_BATCH // WORLD
    for x in global_batches():
        loss = loss_of(model, x[rank * share : (rank + 1) * share])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    dcp.save({"model": model.state_dict(), "ema": ema.sharded_state()}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    dcp.save({"model": model.state_dict()}, checkpoint_id=os.path.join(out_dir, "ckpt-model"))

    class AppState:  # the wrapper pattern of DCP's tutorial: state_dict() not called by DCP for the EMA itself
        def state_dict(self):
            return {"ema": ema.sharded_state().state_dict()}

        def load_state_dict(self, state):
            ema.sharded_state().load_state_dict(state["ema"])

    dcp.save({"app": AppState()}, checkpoint_id=os.path.join(out_dir, "wrapped"))
    wider = ModelEMA(sharded_mlp(WORLD, hidden=12), DECAY)
    dcp.save({"ema": wider.sharded_state()}, checkpoint_id=os.path.join(out_dir, "wider"))
    torch.save({"full": ema.state_dict()["tensors"]}, os.path.join(out_dir, f"saved{rank}.pt"))


def dcp_load_worker(rank, out_dir):
    """Load the 2-rank checkpoint into a 3-rank FSDP2 EMA; a mismatched one is refused and changes nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from fastema import ModelEMA

    world = dist.get_world_size()
    ema = ModelEMA(sharded_mlp(world), DECAY)
    before = [tensor.clone() for tensor in ema._tracker.binding.ema_tensors]
    try:
        dcp.load({"ema": ema.sharded_state()}, checkpoint_id=os.path.join(out_dir, "wider"))
        refused = ""
    except CheckpointException as error:  # on every rank (a BaseException: DCP's choice)
        refused = str(error)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, ema._tracker.binding.ema_tensors))
    dcp.load({"ema": ema.sharded_state()}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    full = ema.state_dict()
    result = {"refused": refused, "unchanged": unchanged, "ema": full["tensors"], "num_updates": full["num_updates"]}
    torch.save(result, os.path.join(out_dir, f"loaded{rank}.pt"))


class PeakRSS:
    """The peak resident memory above the level at entry, sampled from /proc every 0.2 ms in a thread."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = self.current()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def current(self):
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def sample(self):
        while not self.done.wait(0.0002):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.current())
        self.delta = self.peak - self.baseline


def sharded_memory_worker(rank, out_dir):
    """Per-rank peak memory of saving and loading a 2-rank FSDP2 EMA: DCP shards vs gather-to-rank-0."""
    import ctypes
    import gc

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastema import ModelEMA
    from fastema.distributed import load_sharded, save_sharded

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(6)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ema = ModelEMA(model, DECAY)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {"full_bytes": full_bytes}
    for name, action in [
        ("dcp_save", lambda: save_sharded({"ema": ema.sharded_state()}, os.path.join(out_dir, "memory-dcp"))),
        ("dcp_load", lambda: load_sharded({"ema": ema.sharded_state()}, os.path.join(out_dir, "memory-dcp"))),
        ("gather_save", lambda: ema.save(os.path.join(out_dir, "memory-gather.pt"))),
    ]:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: each peak starts from the same floor
        dist.barrier()
        with PeakRSS() as memory:
            action()
        results[name] = memory.delta
    torch.save(results, os.path.join(out_dir, f"memory{rank}.pt"))


# ---- fastai learn.save / learn.load with a sharded model ---------------------------------------------


def _gloo_distributed_dl():
    """fastai's DistributedDL broadcasts its indices with `.cuda()` (written for nccl); on CPU, over gloo."""
    from fastai.distributed import DistributedDL

    def broadcast_over_gloo(self, values, source_rank):
        tensor = torch.tensor(values, dtype=torch.long)
        dist.broadcast(tensor, source_rank)
        return tensor.tolist()

    DistributedDL._broadcast = broadcast_over_gloo


def mlp_learner(cbs, path, optimizer, world=None, hidden=10, seed=0, root_only=False, opt_func=None):
    """A fastai Learner on the Mlp (float64); with `world`, the model is FSDP2-sharded (each Linear, or with
    `root_only` the root alone) and the data split."""
    from functools import partial

    from fastai.data.core import DataLoaders
    from fastai.distributed import DistributedDL
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import Adam, OptimWrapper

    from helpers import TensorPairs

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(48, 6, generator=generator, dtype=torch.float64)
    y = x[:, :3].argmax(dim=1)
    dls = DataLoaders.from_dsets(TensorPairs(x[:32], y[:32]), TensorPairs(x[32:], y[32:]), bs=8, shuffle=False)
    torch.manual_seed(seed)
    model = Mlp().double()
    if hidden != 10:
        model.layers[0], model.layers[2] = nn.Linear(6, hidden).double(), nn.Linear(hidden, 5).double()
    if world is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in [] if root_only else list(model.layers)[:-1]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        dls.loaders = [DistributedDL(dl) for dl in dls.loaders]
    if opt_func is None:
        opt_func = Adam if optimizer == "fastai" else partial(OptimWrapper, opt=torch.optim.AdamW)
    from fastai.learner import Learner
    from fastcore.basics import noop

    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func, lr=0.01, cbs=cbs, path=path)
    learn.remove_cb(learn.progress)  # quiet logs: no progress bars, no result table
    learn.logger = noop
    return learn


def full_state(state):
    """A state dict (nested) with every DTensor gathered (a collective) and everything on CPU."""
    from fastema.core.parallel import is_sharded

    if isinstance(state, dict):
        return {key: full_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [full_state(value) for value in state]
    if isinstance(state, torch.Tensor):
        return (state.full_tensor() if is_sharded(state) else state).detach().clone()
    return state


def optimizer_state(learn):
    """The Learner's optimizer state, full tensors, by parameter name (either optimizer kind)."""
    names = {id(p): n for n, p in learn.model.named_parameters()}
    if hasattr(learn.opt, "opt"):  # OptimWrapper: torch's state, keyed by the index in the groups
        params = [p for group in learn.opt.opt.param_groups for p in group["params"]]
        return {names[id(params[i])]: full_state(s) for i, s in learn.opt.opt.state_dict()["state"].items()}
    return {names[id(p)]: full_state(dict(learn.opt.state[p])) for p, *_ in learn.opt.all_params()}


def fastai_sharded_worker(rank, out_dir):
    """fastai Learners with an FSDP2 model: SaveModelCallback saves every epoch (DCP), a fresh Learner loads epoch 1
    and continues; a mismatched or single-file checkpoint is refused on every rank and changes nothing."""
    from fastai.callback.core import Callback
    from fastai.callback.tracker import SaveModelCallback
    from fastai.torch_core import defaults

    from fastema import EMASchedule
    from reference import ReferenceEMA, expected_tracked

    class FullReference(Callback):
        """A float64 reference EMA of the full (gathered) weights, with the decay the callback used."""

        order = EMASchedule.order + 1

        def __init__(self, start=None, ema="ema_schedule"):
            self.initial = start  # the EMA to continue (resume=True); None: start from the weights
            self.ema_name = ema

        @property
        def ema_callback(self):
            return getattr(self.learn, self.ema_name)

        def before_fit(self):
            self.reference, self.epochs = None, []

        def before_batch(self):
            if self.training and self.reference is None:
                self.start = self.initial or full_state(dict(expected_tracked(self.learn.model)))

        def after_epoch(self):  # what SaveModelCallback saved at the end of this epoch
            self.epochs.append(
                {
                    "model": full_state(dict(self.learn.model.state_dict())),
                    "ema": full_state(self.ema_callback.engine.state_dict()["tensors"]),
                    "optimizer": optimizer_state(self.learn),
                }
            )

        def after_step(self):
            if self.reference is None:
                self.reference = ReferenceEMA(self.start)
            self.reference.update(full_state(dict(expected_tracked(self.learn.model))), self.ema_callback.decay)

    _gloo_distributed_dl()
    defaults.cpus = 0
    results = {}
    for optimizer in ("fastai", "torch"):
        path = os.path.join(out_dir, optimizer)

        def schedule():
            return EMASchedule(start_decay=0.5, final_decay=DECAY, finish=0.5)

        saves = SaveModelCallback(every_epoch=True, fname="epoch", with_opt=True)  # learn.save on every rank
        whole = mlp_learner([schedule(), FullReference(), saves], path, optimizer, world=WORLD)
        if rank == 0:  # an older single-file checkpoint of the same name: the sharded save replaces it
            os.makedirs(os.path.join(path, "models"))
            for stale in ("epoch_0.pth", "epoch_0.ema.pth"):
                torch.save({}, os.path.join(path, "models", stale))
        dist.barrier()
        whole.fit(3)
        resumed = mlp_learner([schedule()], path, optimizer, world=WORLD, seed=1)
        resumed.load("epoch_1")
        loaded = {
            "model": full_state(dict(resumed.model.state_dict())),
            "ema": full_state(resumed.ema_schedule.engine.state_dict()["tensors"]),
            "optimizer": optimizer_state(resumed),
            "model_ema": resumed.model_ema,
        }
        resumed.fit(3, start_epoch=2)
        after_resume = {
            "model": full_state(dict(resumed.model.state_dict())),
            "ema": full_state(resumed.ema_schedule.engine.state_dict()["tensors"]),
            "optimizer": optimizer_state(resumed),
            "num_updates": resumed.ema_schedule.engine.num_updates,
            "decay": resumed.ema_schedule.decay,
        }
        # resume=True continues the EMA of the previous fit (a sharded one: from the callback, shard by shard).
        previous = full_state(resumed.ema_schedule.engine.state_dict()["tensors"])
        continued = FullReference(start=previous)
        resumed.ema_schedule.resume = True
        resumed.add_cb(continued)
        resumed.fit(1)
        continuation = {
            "ema": full_state(resumed.ema_schedule.engine.state_dict()["tensors"]),
            "reference": continued.reference.state,
            "decays": resumed.ema_schedule.decay,
        }
        # fine_tune's pattern: a fit with the first layer frozen, then one with it trainable, each resuming.
        resumed.remove_cb(continued)
        resumed.model.layers[0].requires_grad_(False)
        resumed.fit(1)
        frozen_names = list(resumed.ema_schedule.engine.tensor_names)
        resumed.model.layers[0].requires_grad_(True)
        resumed.fit(1)
        continuation["names"] = [frozen_names, list(resumed.ema_schedule.engine.tensor_names)]
        refused = {}
        wider = mlp_learner([schedule()], path, optimizer, world=WORLD, hidden=12)
        wider.fit(1)
        before = (
            full_state(dict(wider.model.state_dict())),
            full_state(wider.ema_schedule.engine.state_dict()["tensors"]),
        )
        for name in ("epoch_2", "plain"):
            if rank == 0 and name == "plain":
                torch.save(whole.model.state_dict(), os.path.join(path, "models", "plain.pth"))
            dist.barrier()
            try:
                wider.load(name)
            except ValueError as error:
                refused[name] = str(error)
        after = (
            full_state(dict(wider.model.state_dict())),
            full_state(wider.ema_schedule.engine.state_dict()["tensors"]),
        )
        results[optimizer] = {
            "files": sorted(os.listdir(os.path.join(path, "models"))),
            "whole": {
                "model": full_state(dict(whole.model.state_dict())),
                "ema": full_state(whole.ema_schedule.engine.state_dict()["tensors"]),
                "optimizer": optimizer_state(whole),
                "num_updates": whole.ema_schedule.engine.num_updates,
                "model_ema": whole.model_ema,
                "decay": whole.ema_schedule.decay,
            },
            "reference": whole.cbs.filter(lambda cb: isinstance(cb, FullReference))[0].reference.state,
            "epochs": whole.cbs.filter(lambda cb: isinstance(cb, FullReference))[0].epochs,
            "loaded": loaded,
            "resumed": after_resume,
            "refused": refused,
            "continuation": continuation,
            "unchanged": all(torch.equal(a, b) for x, y in zip(before, after) for a, b in zip(x.values(), y.values())),
        }
    results["root_only"] = root_only_cases(rank, os.path.join(out_dir, "root_only"), FullReference)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def root_only_cases(rank, path, FullReference):
    """The model sharded at the root only (its parameters are plain tensors after each forward): fastai's
    SaveModelCallback in its default mode (save the best, load it at the end) with an EMA that does not validate,
    a Learner without EMA, lr_find, and a single-file checkpoint newer than the sharded one."""
    import math

    from fastai.callback.tracker import SaveModelCallback

    from fastema import EMACallback

    def first_epoch_is_best(value, best):  # keeps epoch 0 as "best": the load at the end must bring it back
        return best == -math.inf

    best = SaveModelCallback(monitor="valid_loss", comp=first_epoch_is_best, fname="best", with_opt=True)
    recorder = FullReference(ema="ema")
    learn = mlp_learner(
        [EMACallback(decay=DECAY, validate_ema=False), recorder, best], path, "fastai", world=WORLD, root_only=True
    )
    learn.fit(3)
    final = {
        "model": full_state(dict(learn.model.state_dict())),
        "ema": full_state(learn.ema.engine.state_dict()["tensors"]),
        "optimizer": optimizer_state(learn),
    }
    plain = mlp_learner(None, path, "fastai", world=WORLD, root_only=True)
    plain.fit(1)
    plain.save("plain")
    fresh = mlp_learner(None, path, "fastai", world=WORLD, root_only=True, seed=1)
    fresh.load("plain")
    before = full_state(dict(plain.model.state_dict()))
    lr_find_error = None
    try:
        plain.lr_find(num_it=3, show_plot=False)
    except RuntimeError as error:
        lr_find_error = str(error)
    after_lr_find = full_state(dict(plain.model.state_dict()))
    if rank == 0:  # a single-file checkpoint newer than the sharded one of the same name
        torch.save(plain.model.state_dict(), os.path.join(path, "models", "plain.pth"))
        later = time.time() + 10
        os.utime(os.path.join(path, "models", "plain.pth"), (later, later))
    dist.barrier()
    newer_file_error = None
    try:
        fresh.load("plain")
    except ValueError as error:
        newer_file_error = str(error)
    return {
        "files": sorted(name for name in os.listdir(os.path.join(path, "models")) if not name.startswith(".")),
        "epochs": recorder.epochs,
        "final": final,
        "plain": before,
        "fresh": full_state(dict(fresh.model.state_dict())),
        "lr_find_error": lr_find_error,
        "after_lr_find": after_lr_find,
        "newer_file_error": newer_file_error,
    }


def fastai_sharded_load_worker(rank, out_dir):
    """3 ranks load what 2 ranks saved (fastai's Adam): model, optimizer state and EMA, gathered to compare."""
    from fastai.torch_core import defaults

    from fastema import EMASchedule

    _gloo_distributed_dl()
    defaults.cpus = 0
    schedule = EMASchedule(start_decay=0.5, final_decay=DECAY)
    learn = mlp_learner([schedule], os.path.join(out_dir, "fastai"), "fastai", world=dist.get_world_size(), seed=1)
    learn.load("epoch_2")
    loaded = {
        "model": full_state(dict(learn.model.state_dict())),
        "ema": full_state(learn.ema_schedule.engine.state_dict()["tensors"]),
        "optimizer": optimizer_state(learn),
        "num_updates": learn.ema_schedule.engine.num_updates,
    }
    torch.save(loaded, os.path.join(out_dir, f"three{rank}.pt"))


def gather_worker(rank, out_dir):
    """fastema's gather and reshard of FSDP2-like layouts (even, uneven and empty shards) against DTensor's own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from fastema.core.parallel import gather_full, shard_like

    recorder = collective_recorder()
    mesh = init_device_mesh("cpu", (WORLD,))
    generator = torch.Generator().manual_seed(3)
    cases = [
        ("even rows", (6, 4), Shard(0), torch.float64),
        ("uneven rows", (5, 3), Shard(0), torch.float32),
        ("rank 1 empty", (1, 3), Shard(0), torch.float64),
        ("uneven columns", (4, 5), Shard(1), torch.float64),
        ("replicated", (3, 2), Replicate(), torch.float64),  # not FSDP2's layout: full_tensor()
    ]
    results = {}
    for name, shape, placement, dtype in cases:
        full = torch.randn(shape, generator=generator).to(dtype)  # the same on every rank
        like = distribute_tensor(full, mesh, [placement])
        expected = like.full_tensor()
        with recorder() as gathering:
            gathered = gather_full(like.to_local().clone(), like)
        with recorder() as resharding:
            part = shard_like(full, like)
        results[name] = {
            "local_rows": like.to_local().shape[placement.dim] if isinstance(placement, Shard) else None,
            "gathered": gathered,
            "expected": expected,
            "contiguous": gathered.is_contiguous(),
            "gather_collectives": gathering.names,
            "part": part,
            "own_part": like.to_local(),
            "reshard_collectives": resharding.names,
        }
    for forward in (True, False):
        results[f"sharded after the EMA, forward {forward}"] = ema_built_before_fully_shard(mesh, forward)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def ema_built_before_fully_shard(mesh, forward):
    """A ModelEMA built on the whole model, then the model sharded: the next update must refuse, not count.

    With a forward first (FSDP2's lazy initialisation runs), or with gradients set by hand (none does).
    """
    from torch.distributed.fsdp import fully_shard

    from fastema import ModelEMA

    torch.manual_seed(0)
    model = Mlp().double()
    ema = ModelEMA(model, DECAY)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    if forward:
        loss_of(model, global_batches()[0]).backward()
    else:
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    try:
        ema.update()
        refused = None
    except RuntimeError as error:
        refused = str(error)
    return {"refused": refused, "num_updates": ema.num_updates, "num_steps": ema.num_steps}


def collective_recorder():
    """A dispatch mode class that records every communication op (c10d and functional collectives) inside it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Collectives(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "c10d" in func.namespace:
                self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    return Collectives
