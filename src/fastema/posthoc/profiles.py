"""Power-function EMA profiles (EDM2): the exponent for a relative width, each update's decay, and the
least-squares weights that combine snapshots into the profile of another width."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

# gamma = 0, a uniform average. We keep gamma >= 0 (the profile grows or stays flat over training): the
# width is not monotonic below gamma = 0 (it peaks at about 0.3003 near gamma = -0.38).
MAX_SIGMA_REL = math.sqrt(1 / 12)


def check_sigma_rel(value: object, name: str = "sigma_rel") -> float:
    """A relative EMA width in (0, sqrt(1/12)) (power-function EMAs with gamma > 0), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r}; expected a float in (0, {MAX_SIGMA_REL:.4f})")
    value = float(value)
    if not 0.0 < value < MAX_SIGMA_REL:
        raise ValueError(f"Invalid {name}: {value}; expected a float in (0, {MAX_SIGMA_REL:.4f}) (sqrt(1/12))")
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function EMA with exponent `gamma`: sqrt((g+1) / ((g+2)^2 (g+3)))."""
    if not gamma > -1:
        raise ValueError(f"Invalid gamma: {gamma}; expected a number > -1")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function EMA of relative width `sigma_rel`.

    The largest real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0, found by bisection
    on (0, inf), where the width decreases monotonically from sqrt(1/12) to 0.
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    low, high = 0.0, max(10.0, 4.0 / sigma_rel)
    while gamma_to_sigma_rel(high) > sigma_rel:
        high *= 2
    for _ in range(200):  # to the last bit
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if gamma_to_sigma_rel(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def power_decay(step: int, gamma: float, update_every: int = 1) -> float:
    """The decay of the update at optimizer step `step` (counted from 1): (1 - N/step) ** (gamma + 1)."""
    return (1.0 - update_every / step) ** (gamma + 1)


def profile_products(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> = integral over [0, min(t_a, t_b)] of the two profiles p(tau) = (g+1) tau^g / t^(g+1).

    Closed form: (g_a+1)(g_b+1) / (g_a+g_b+1) * min^(g_a+g_b+1) / (t_a^(g_a+1) t_b^(g_b+1)); broadcasts.
    """
    ratio = t_a / t_b
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


def snapshot_coefficients(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> Tensor:
    """Weights x of the snapshots (taken at `steps` with `gammas`) whose combination best matches the EMA
    profile (`step`, `gamma`): the least-squares solution of A x = b (Gram matrix of the snapshot
    profiles, their products with the target), normalised to sum to 1; float64."""
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    gram = profile_products(t[:, None], g[:, None], t[None, :], g[None, :])
    target = profile_products(
        t, g, torch.tensor(float(step), dtype=torch.float64), torch.tensor(gamma, dtype=torch.float64)
    )
    solution = torch.linalg.lstsq(gram, target[:, None], driver="gelsd").solution[:, 0]
    return solution / solution.sum()
