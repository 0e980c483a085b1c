"""Small models, data and fastai Learners shared by the tests."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class ToyNet(nn.Module):
    """BatchNorm (running stats, num_batches_tracked), a frozen layer and a changing non-persistent buffer."""

    def __init__(self, n_in: int = 8, n_hidden: int = 16, n_out: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, n_hidden), nn.BatchNorm1d(n_hidden), nn.ReLU())
        self.frozen = nn.Linear(n_hidden, n_hidden)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(n_hidden, n_out)
        self.register_buffer("calls", torch.zeros(1), persistent=False)

    def forward(self, x):
        if self.training:
            self.calls.add_(1.0)  # a non-persistent buffer that changes while training
        return self.head(self.body(x) + 0.1 * self.frozen(self.body(x)))


class RunningAverage(nn.Module):
    """A buffer replaced by a new tensor in every forward (`self.average = ...`), as running statistics often are."""

    def __init__(self, keep: float = 0.5, take: float = 0.5):
        super().__init__()
        self.keep, self.take = keep, take
        self.linear = nn.Linear(8, 8)
        self.register_buffer("average", torch.zeros(8))

    def forward(self, x):
        y = self.linear(x)
        self.average = self.keep * self.average + self.take * y.detach().mean(0)  # a new tensor every call
        return y


def toy_data(n: int = 64, n_in: int = 8, n_out: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=generator)
    y = (x[:, :n_out].argmax(dim=1)).long()
    return x, y


class TensorPairs(torch.utils.data.TensorDataset):
    """(x, y) pairs; `new_empty` lets fastai's `Learner.export` drop the data."""

    def new_empty(self):
        return TensorPairs(*(tensor[:0] for tensor in self.tensors))


def make_dls(n_train: int = 64, n_valid: int = 32, bs: int = 8):
    from fastai.data.core import DataLoaders

    x, y = toy_data(n_train + n_valid)
    train = TensorPairs(x[:n_train], y[:n_train])
    valid = TensorPairs(x[n_train:], y[n_train:])
    return DataLoaders.from_dsets(train, valid, bs=bs, shuffle=False, device=torch.device("cpu"))


def make_learner(cbs=None, n_train: int = 64, bs: int = 8, lr: float = 0.05, seed: int = 0, **kwargs):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import SGD

    torch.manual_seed(seed)
    return Learner(
        make_dls(n_train=n_train, bs=bs),
        ToyNet(),
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        opt_func=SGD,
        lr=lr,
        cbs=cbs,
        **kwargs,
    )


EMA_KERNELS = {"_foreach_lerp_", "_foreach_copy_", "lerp_", "copy_"}


def calls_during(function):
    """Every torch function called (Python level: `Tensor.cpu`, `.item`, `torch._foreach_lerp_`, ...) and every
    aten op dispatched while `function()` runs: what a host sync or an allocation would have to go through."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            functions.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    functions, ops = set(), set()
    with Functions(), Ops():
        function()
    return functions, ops


def assert_update_runs_only_ema_kernels(ema, *args, also=()):
    """`ema.update()` calls the lerp/copy kernels and nothing else: no `.item()`, `.cpu()`, tensor-to-bool
    (host syncs), no `empty`/`.to()` (allocations). `also`: other harmless calls to allow."""
    functions, ops = calls_during(lambda: ema.update(*args))
    allowed = EMA_KERNELS | {"_set_grad_enabled", "data_ptr", *also}  # data_ptr: a staleness check
    assert functions <= allowed, functions
    assert ops <= EMA_KERNELS, ops
    # The native kernel runs no ATen op at all; otherwise an empty set would mean the capture saw nothing.
    assert ops or ema._tracker.plan.native, ops


def update_forbidding_cuda_sync(ema, *args):
    """`ema.update(*args)` under `torch.cuda.set_sync_debug_mode("error")`: any host sync raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)


class ConvNet(nn.Module):
    """Conv + BatchNorm2d + Linear: 4-d weights that channels-last gives non-contiguous strides."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).relu().mean((2, 3)))


class MixedNet(nn.Module):
    """What a compiled step must handle: float32, bfloat16 and float16 parameters, a channels-last conv
    weight, a parameter with gaps in its memory, BatchNorm statistics and their integer count."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        self.norm = nn.BatchNorm2d(4)
        self.bf16 = nn.Linear(4, 4).bfloat16()
        self.fp16 = nn.Linear(4, 4).half()
        self.gappy = nn.Parameter(torch.randn(4, 10)[:, ::2])

    def forward(self, x):
        return self.norm(self.conv(x)).mean((2, 3))


def all_tensors(module):
    return dict(itertools.chain(module.named_parameters(), module.named_buffers()))


def assert_state_matches(state, expected_state, rtol=1e-6, atol=1e-10):
    """Every tensor of `expected_state` (the reference's float64 values) is in `state`: floats close, others equal."""
    for name, expected in expected_state.items():
        actual = state[name]
        if expected.is_floating_point():
            torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(actual, expected), name


def assert_matches_reference(ema, reference, rtol=1e-6, atol=1e-10):
    assert_state_matches(all_tensors(ema.module), reference.state, rtol, atol)


def sgd_steps(model, optimizer, ema, reference, tracked, n_steps, decay, make_input, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        x = make_input(generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(decay)
        reference.update(tracked, decay)


HANG_MID_WRITE = """
def hang_mid_write():
    \"\"\"From now on fastema's file writes write half the file, print `writing` and hang (to be killed).\"\"\"
    import time

    import torch
    from fastema.core import checkpoint

    real_save = torch.save

    def slow_save(obj, stream, **kwargs):
        real_save(obj, stream, **kwargs)
        stream.truncate(stream.tell() // 2)
        stream.flush()
        print("writing", flush=True)
        time.sleep(60)

    checkpoint.torch.save = slow_save
"""


def kill_while_writing(script: str) -> int:
    """Run `script` in a new Python; when it prints `writing` (it then hangs mid-write), SIGKILL it. The exit code.

    The script can call `hang_mid_write()` (see `HANG_MID_WRITE`) to make fastema's next file write do that.
    """
    import signal
    import subprocess
    import sys

    script = HANG_MID_WRITE + script
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        process.stdout.close()
    return process.returncode
