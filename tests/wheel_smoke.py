"""Smoke check of the built wheel, run by `make smoke` in a fresh environment that has only torch besides it.

Not a pytest module: it runs with `python -I` from outside the repository, so it sees the installed
wheel and nothing else.
"""

import importlib.abc
import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import ClassVar

OPTIONAL = {"fastai", "lightning", "pytorch_lightning", "transformers"}


class RecordOptionalImports(importlib.abc.MetaPathFinder):
    """Records every attempt to import an optional framework (even one guarded by try/except ImportError)."""

    attempts: ClassVar[set[str]] = set()

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            self.attempts.add(name)
        return  # let the other finders find it (or not)


sys.meta_path.insert(0, RecordOptionalImports())

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastema  # noqa: E402
from fastema import *  # noqa: E402, F403  (a torch-only install must allow it)

installed = Path(sysconfig.get_paths()["purelib"]).resolve()
assert installed in Path(fastema.__file__).resolve().parents, f"not the installed wheel: {fastema.__file__}"
assert fastema.__version__ == importlib.metadata.version("fastema"), "one version, read by hatch from __init__"
assert (Path(fastema.__file__).parent / "py.typed").is_file(), "py.typed must ship in the wheel"
assert (Path(fastema.__file__).parent / "core" / "native.cpp").is_file(), "the native kernel's source must ship"

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
ema = fastema.ModelEMA(model, decay=0.9)
expected = {
    name: tensor.detach().double().clone()
    for name, tensor in ema.module.state_dict().items()
    if tensor.is_floating_point()
}
for step in range(2):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0 + step)
    model(torch.randn(16, 4))
    ema.update()
    for name, tensor in model.state_dict().items():
        if name in expected and tensor.is_floating_point():
            expected[name] = 0.9 * expected[name] + 0.1 * tensor.double()
for name, value in expected.items():
    torch.testing.assert_close(ema.module.state_dict()[name].double(), value, rtol=1e-6, atol=1e-7)
assert torch.equal(ema.module[1].num_batches_tracked, model[1].num_batches_tracked)

assert not RecordOptionalImports.attempts, f"import fastema tried to import {RecordOptionalImports.attempts}"
try:
    fastema.EMACallback  # noqa: B018
except ImportError as error:
    assert "fastema[fastai]" in str(error), error
else:
    raise AssertionError("fastema.EMACallback without fastai should raise an ImportError saying what to install")
subprocess.run([sys.executable, "-I", "-m", "fastema", "--help"], check=True, capture_output=True)
native = ema._tracker.plan.native
step = "eager (no native kernel here)" if not native or native[0].failed else "the native kernel"
print(f"wheel smoke check passed: fastema {fastema.__version__}, torch {torch.__version__}, update: {step}")
