"""The engine: `ModelEMA` and the collaborators it delegates to; no framework beyond PyTorch.

Data flows one way: the model's tensors are tracked (`tracking`, `tracker`), paired with the
EMA's and turned once into an update plan (`plan`) of steps (`steps`, `offload`); `swap` puts
the EMA into the live model, `state` and `checkpoint` read and write it. Nothing in `core`
imports from another fastema folder.
"""
