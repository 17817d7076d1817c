"""Adaptive momentum sampler, AMS (Wang, Dinh, Liu & Xu 2023, arXiv 2308.11941; MiniDiff §4.2),
on top of DDIM (``ams-ddim``) or DDPM (``ams-ddpm``).

Derivation (from DDIM eq. 12; ᾱ as in DDPM, so the papers' "α_t" is our ᾱ_t). Write the state in
the rescaled variable x̄ = x/sqrt(ᾱ) and let σ̄ = sqrt((1 − ᾱ)/ᾱ). Since x̂₀ = x̄_t − σ̄_t·ε̂,
dividing DDIM's update x_s = sqrt(ᾱ_s)·x̂₀ + sqrt(1 − ᾱ_s − σ²)·ε̂ + σ·z by sqrt(ᾱ_s) gives

    x̄_s = x̄_t + dx̄,   dx̄ = (μ_s − σ̄_t)·ε̂ + σ/sqrt(ᾱ_s)·z,   μ_s = sqrt((1 − ᾱ_s − σ²)/ᾱ_s),

i.e. for η = 0 an Euler step of dx̄/dσ̄ = ε̂ (the probability-flow ODE in these variables). AMS treats
dx̄ as the "gradient step" of an optimiser and replaces x̄_s = x̄_t + dx̄ by a heavy-ball step with an
RMS normalisation (as Adam):

    m_s = a·m_t + b·dx̄,   v_s = (1 − c)·v_t + c·dx̄²,   x̄_s = x̄_t + m_s/(sqrt(v_s) + ζ),
    x_s = sqrt(ᾱ_s)·x̄_s,   m_T = 0,  v_T = 1,

with dx̄² and the division elementwise. For DDPM, dx̄ = x_s^DDPM/sqrt(ᾱ_s) − x̄_t, where x_s^DDPM is
the ancestral draw (DDPM eq. 6–7); we compute dx̄ that way for DDIM too, so clipping x̂₀ is handled
by the plain step. At the final step to t = −1, ᾱ = 1 and x̄ = x. With a = 0, b = 1, c = 0, ζ = 0
the update is exactly the plain sampler.

The extracted MiniDiff formulas are garbled and are fixed here: its dx̄ reads "μ·ε + σ_t/sqrt(α_t − 1)·ε_t",
which misses the −σ̄_t·ε̂ term (without it x̄ never loses its noise) and should divide the noise by
sqrt(ᾱ_s); its x̄ update divides by sqrt(v_t) in the equation and sqrt(v_{t−1}) in Algorithm 1 — we
use the freshly updated v (Algorithm 1, Adam's order); and ||dx̄||² is taken elementwise.

Consistency: for small steps m → b/(1 − a)·dx̄, so b = 1 − a (an exponential moving average of the
increments) keeps the limit ODE, any other b rescales the velocity; c > 0 rescales steps by 1/sqrt(v),
which no longer tends to 1.

Defaults, from benchmarks/bench_ams_sweep.py on runs/mnist-tiny (4000 steps; N = 256, same x_T and
seeds for every row, FID-dom on the shipped MNIST classifier, leading spacing, clip_x0):

    setting (a, b, c)        ams-ddim NFE 10 / 20     ams-ddpm NFE 10 / 20
    0, 1, 0   (plain)        3.90 / 3.62               1.44 / 0.744
    0.02, 0.98, 0            3.87 / 3.40               1.46 / 0.784
    0.05, 0.95, 0            8.34 / 4.59               1.81 / 0.821
    0.05, 1, 0              64.6 / 59.4                1.84 / 0.732
    0.1, 0.9, 0             66.3 / –                   3.29 / –
    0, 1, 1e-5              14.0 / 24.4                1.51 / 0.892
    any c >= 1e-3          > 2000                     > 2000

Every c > 0 hurts: v averages dx̄², and the first increments of x̄ = x/sqrt(ᾱ) are ~1/sqrt(ᾱ_T) ≈ 150
times the data scale, so sqrt(v) stays large and later steps are shrunk. Momentum with b ≠ 1 − a
overshoots. The one setting that never hurt DDIM, a = 0.02, b = 0.98, c = 0, is the default for both
variants; it gains little (DDIM −1% / −6%) and costs DDPM 2–5% at NFE 10 / 20, differences of the
size N = 256 can barely resolve. No setting reliably improves DDPM (the best differ by NFE: a = 0.02,
b = 1, c = 1e-5 gives −4% at NFE 10, a = 0.05, b = 1 gives −2% at NFE 20, each worse elsewhere): like
the MiniDiff paper, we see no real gain from AMS.
"""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..errors import UserError
from ._common import ab, check_range, maybe_clip, step_pairs
from .ddim import ddim_sigma, ddim_step
from .ddpm import ddpm_step

# Defaults (a, b, c, ζ); see benchmarks/bench_ams_sweep.py for the measured sweep behind them.
AMS_DEFAULTS = {"a": 0.02, "b": 0.98, "c": 0.0, "zeta": 1e-8}


def _ams(name: str, denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator, callback, plain_step,
         a: float, b: float, c: float, zeta: float, clip_x0: bool) -> torch.Tensor:
    a = check_range(name, "a", a, 0.0, 1.0, hi_open=True)
    b = check_range(name, "b", b, 0.0, float("inf"))
    c = check_range(name, "c", c, 0.0, 1.0, hi_open=True)
    zeta = check_range(name, "zeta", zeta, 0.0, float("inf"))
    if b == 0:
        raise UserError(f"{name} needs b > 0 (b = 0 never moves x)")
    m = torch.zeros_like(x)  # m_T = 0
    v = torch.ones_like(x) if c > 0 else None  # v_T = 1
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        abar_t, _ = ab(denoiser, t)
        abar_s, _ = ab(denoiser, s)
        eps, x0 = denoiser.predict(x, t)
        x0 = maybe_clip(x0, clip_x0)
        # The plain DDIM/DDPM step, read as an increment of x̄ = x/sqrt(ᾱ).
        x_bar = x / abar_t ** 0.5
        dx_bar = plain_step(x, x0, eps, abar_t, abar_s, s) / abar_s ** 0.5 - x_bar
        # Momentum and second-moment averages, then the normalised step in x̄.
        m = a * m + b * dx_bar
        if c > 0:
            v = (1 - c) * v + c * dx_bar ** 2
            x = abar_s ** 0.5 * (x_bar + m / (v.sqrt() + zeta))
        else:
            x = abar_s ** 0.5 * (x_bar + m / (1 + zeta))  # v stays v_T = 1
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_ams_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                    eta: float = 0.0, a: float = AMS_DEFAULTS["a"], b: float = AMS_DEFAULTS["b"],
                    c: float = AMS_DEFAULTS["c"], zeta: float = AMS_DEFAULTS["zeta"],
                    clip_x0: bool = False) -> torch.Tensor:
    """AMS on DDIM with η ∈ [0, 1] (η = 0: deterministic)."""
    eta = check_range("ams-ddim", "eta", eta, 0.0, 1.0)

    def plain_step(x, x0, eps, abar_t, abar_s, s):
        return ddim_step(x0, eps, abar_s, ddim_sigma(eta, abar_t, abar_s), generator)

    return _ams("ams-ddim", denoiser, x, timesteps, generator=generator, callback=callback,
                plain_step=plain_step, a=a, b=b, c=c, zeta=zeta, clip_x0=clip_x0)


@torch.no_grad()
def sample_ams_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                    a: float = AMS_DEFAULTS["a"], b: float = AMS_DEFAULTS["b"], c: float = AMS_DEFAULTS["c"],
                    zeta: float = AMS_DEFAULTS["zeta"], clip_x0: bool = False) -> torch.Tensor:
    """AMS on DDPM ancestral sampling."""

    def plain_step(x, x0, eps, abar_t, abar_s, s):
        return ddpm_step(x, x0, abar_t, abar_s, s, generator)

    return _ams("ams-ddpm", denoiser, x, timesteps, generator=generator, callback=callback,
                plain_step=plain_step, a=a, b=b, c=c, zeta=zeta, clip_x0=clip_x0)
