"""One deterministic DDIM step between arbitrary per-sample timesteps, shared by progressive distillation
(the teacher's two steps behind each PD target) and PTQ4DM's NDTC calibration collector (the FP model
denoising each sample down to its own t). The solvers' own DDIM (:mod:`leandiff.solvers.ddim`) steps
a whole batch between two scalar timesteps; this one takes a timestep per sample."""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..schedule import alpha_sigma


def coef(schedule, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, s = alpha_sigma(schedule, t)
    shape = (-1,) + (1,) * (ndim - 1)
    return a.float().reshape(shape), s.float().reshape(shape)


def ddim_to(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, clip_x0: bool) -> torch.Tensor:
    """One deterministic DDIM step x_t → x_s per sample (Song et al. 2021, eq. 12 with η = 0):
    x_s = α_s x̂₀ + σ_s ε̂. With ``clip_x0`` x̂₀ is clamped to [−1, 1] and ε̂ = (x_t − α_t x̂₀)/σ_t is
    recomputed from it (the consistent clipping of leandiff's ``euler`` solver, which is DDIM written
    in EDM's variables), not the unclamped ε̂ of the ``ddim`` solver (diffusers' convention).

    Why: with the unclamped ε̂ the step is not a function of one x̂₀, and at the first step of a
    linear-β schedule an ε teacher's x̂₀ = (x_t − σε̂)/α is far outside [−1, 1]; the PD target x̃ then
    divides that mismatch by α_{t''} − (σ_{t''}/σ_t)α_t ≈ 0.006 and the loss is dominated by targets of
    size ~100 (measured: the 16-step student fell from FID-dom 3 to 11). With consistent clipping x̃ is
    a convex combination of the teacher's two clamped x̂₀ (see :func:`pd_target`), so it lies in
    [−1, 1], and a student outputting it takes exactly the same step under ``ddim`` with clipping."""
    eps, x0 = denoiser.predict(x, t)
    if clip_x0:
        a_t, s_t = coef(denoiser.schedule, t, x.ndim)
        x0 = x0.clamp(-1, 1)
        eps = (x - a_t * x0) / s_t
    a_s, s_s = coef(denoiser.schedule, s, x.ndim)
    return a_s * x0 + s_s * eps
