"""DDIM (Song, Meng & Ermon 2021, eq. 12), η ∈ [0, 1], on any descending subsequence of timesteps."""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..errors import UserError
from ._common import ab, maybe_clip, randn_like, step_pairs


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                eta: float = 0.0, clip_x0: bool = False) -> torch.Tensor:
    """x_s = sqrt(ᾱ_s)·x̂₀ + sqrt(1 − ᾱ_s − σ²)·ε̂ + σ·z with
    σ = η·sqrt((1 − ᾱ_s)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_s)  (DDIM eq. 12 and 16).
    η = 0 is the deterministic DDIM; η = 1 is DDPM on the same subsequence."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"ddim needs 0 <= eta <= 1, got {eta}")
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        abar_t, one_minus_t = ab(denoiser, t)
        abar_s, one_minus_s = ab(denoiser, s)
        eps, x0 = denoiser.predict(x, t)
        x0 = maybe_clip(x0, clip_x0)
        sigma = eta * (one_minus_s / one_minus_t * (1 - abar_t / abar_s)) ** 0.5
        # Point back along the predicted noise direction, then add fresh noise.
        x = abar_s ** 0.5 * x0 + max(one_minus_s - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
