import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# A test is `slow` when it trains a fastai Learner or another trainer, starts a process or runs the demo;
# `make test-fast` (pytest -m "not slow and not distributed") runs the rest in seconds.
SLOW_SIGNS = (
    "make_learner(",
    "Learner(",
    "_learner(",
    ".fit(",
    "subprocess",
    "run_demo(",
    'main(["demo"',
    "hf_trainer(",
)


@pytest.fixture(autouse=True)
def eager_by_default(request, monkeypatch):
    """compile=None compiles a float32 EMA of a bf16/fp16 model on CPU, seconds per new layout; tests that are not
    about compiling keep the eager step, the reference. test_compiled.py checks what the default compiles."""
    if request.module.__name__ != "test_compiled":
        from fastema.core import plan

        monkeypatch.setattr(plan, "compile_by_default", lambda *args: False)


def pytest_collection_modifyitems(config, items):
    skip_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if skip_cuda is not None and "cuda" in item.keywords:
            item.add_marker(skip_cuda)
        if item.module.__name__ in ("test_distributed", "test_sharded"):  # gloo launches: distributed, and slow too
            item.add_marker(pytest.mark.distributed)
            item.add_marker(pytest.mark.slow)
            continue
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if any(sign in source for sign in SLOW_SIGNS):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    """List the gloo exit aborts the distributed launcher tolerated (PyTorch's; see docs/multi-gpu.md)."""
    workers = sys.modules.get("distributed_workers")  # imported only by the distributed tests
    aborts = getattr(workers, "tolerated_aborts", [])
    if aborts:
        terminalreporter.section(f"tolerated gloo exit aborts: {len(aborts)}")
        for line in aborts:
            terminalreporter.line(line)
