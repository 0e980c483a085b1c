"""Smoke check of the built wheel, run by `make smoke` in a fresh environment that has only torch besides it.

Not a pytest module: it runs with `python -I` from outside the repository, so it sees the installed
wheel and nothing else.
"""

import importlib.metadata
import sys
from pathlib import Path

import torch
from torch import nn

import fastema

assert "src" not in Path(fastema.__file__).parts, f"imported the source tree, not the wheel: {fastema.__file__}"
assert fastema.__version__ == importlib.metadata.version("fastema"), "one version, read by hatch from __init__"
assert (Path(fastema.__file__).parent / "py.typed").is_file(), "py.typed must ship in the wheel"

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
ema = fastema.ModelEMA(model, decay=0.5)
expected = {name: tensor.detach().double().clone() for name, tensor in ema.module.state_dict().items()}
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(1.0)
model(torch.randn(16, 4))
ema.update()
for name, tensor in model.state_dict().items():
    if name in expected and tensor.is_floating_point():
        expected[name] = 0.5 * expected[name] + 0.5 * tensor.double()
        torch.testing.assert_close(ema.module.state_dict()[name].double(), expected[name], rtol=1e-6, atol=1e-7)
assert torch.equal(ema.module[1].num_batches_tracked, model[1].num_batches_tracked)

optional = {"fastai", "lightning", "pytorch_lightning", "transformers"}
imported = optional & set(sys.modules)
assert not imported, f"import fastema pulled in optional frameworks: {imported}"
print(f"wheel smoke check passed: fastema {fastema.__version__}, torch {torch.__version__}")
