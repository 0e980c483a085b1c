"""Post-hoc EMA (EDM2): K power-function EMAs through the engine's steps, snapshots, and synthesis."""

from .averager import PostHocEMA
from .profiles import gamma_to_sigma_rel, sigma_rel_to_gamma
from .snapshots import synthesize

__all__ = ["PostHocEMA", "gamma_to_sigma_rel", "sigma_rel_to_gamma", "synthesize"]
