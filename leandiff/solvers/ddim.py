"""DDIM (Song, Meng & Ermon 2021, eq. 12), η ∈ [0, 1], on any descending subsequence of timesteps."""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ._common import ab, check_range, maybe_clip, randn_like, step_pairs


def ddim_sigma(eta: float, abar_t: float, abar_s: float) -> float:
    """σ_t(η) = η·sqrt((1 − ᾱ_s)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_s)  (DDIM eq. 16)."""
    return eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) ** 0.5


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, abar_s: float, sigma: float, generator) -> torch.Tensor:
    """x_s = sqrt(ᾱ_s)·x̂₀ + sqrt(1 − ᾱ_s − σ²)·ε̂ + σ·z  (DDIM eq. 12)."""
    x = abar_s ** 0.5 * x0 + max(1 - abar_s - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma > 0:
        x = x + sigma * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                eta: float = 0.0, clip_x0: bool = False) -> torch.Tensor:
    """DDIM: point back along the predicted noise direction, then add η-scaled fresh noise.
    η = 0 is the deterministic DDIM; η = 1 is DDPM on the same subsequence."""
    eta = check_range("ddim", "eta", eta, 0.0, 1.0)
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        abar_t, _ = ab(denoiser, t)
        abar_s, _ = ab(denoiser, s)
        eps, x0 = denoiser.predict(x, t)
        x0 = maybe_clip(x0, clip_x0)  # clipped x̂₀, unclipped ε̂: diffusers' DDIMScheduler convention
        x = ddim_step(x0, eps, abar_s, ddim_sigma(eta, abar_t, abar_s), generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
