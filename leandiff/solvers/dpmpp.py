"""DPM-Solver++ (Lu, Zhou, Bao, Chen, Li & Zhu 2022b, arXiv 2211.01095): exponential integrators of the
probability-flow ODE and of the reverse SDE in data prediction x̂₀, multistep (one evaluation a step).

With α, σ of the VP process and λ = log(α/σ), h = λ_s − λ_t > 0 for a step t → s, the ODE solution is
(DPM-Solver++ eq. 8)

    x_s = (σ_s/σ_t)·x_t + α_s·∫_0^h e^{τ−h} x̂₀(λ_t + τ) dτ,

and the multistep methods replace x̂₀(λ) by the polynomial through the last one, two or three
predictions. The final step to t = −1 (σ = 0, h = ∞) is always first order and returns x̂₀ of the last
evaluation, as DPM-Solver++ and diffusers (``final_sigmas_type="zero"``) do.

Spacing matters for multistep methods: spacings that end at t = 0 ("leading", "linspace") make the
step into t = 0 a long jump in λ (λ goes from about 1.1 to 4.6 at 10 steps on the DDPM schedule, 4-5
times the step before it, and still O(1) at 100 steps), where extrapolating x̂₀ overshoots and, in the
SDE solvers, amplifies the injected noise. Every multistep step therefore uses only as many earlier
predictions as :func:`multistep_order` allows (consecutive λ-step ratios at most MAX_STEP_RATIO): on
"logsnr" (uniform in λ, the grid of the DPM-Solver papers) and "trailing" nothing changes, on the
uniform-in-t grids the last long step becomes first order. Measured on the Gaussian contract problem
of tests/test_solvers.py (1×8×8, 2,000 samples, max per-pixel relative std error at NFE 10/20/50/100),
dpmpp-3m-sde on leading went from 2.28 / 5.74 / 2.87 / 0.96 (diverging) to 0.48 / 0.26 / 0.10 / 0.06.
"""
from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ._common import alpha_sigma_f, check_range, half_lambda, predict, randn_like, step_pairs

# Largest ratio of consecutive λ-steps a multistep correction extrapolates over. Variable-step multistep
# methods are zero-stable only for bounded step ratios (Hairer, Nørsett & Wanner, Solving ODEs I, §III.5;
# BDF2, for one, needs ratios below 1 + √2); a grid uniform in t ("leading", "linspace") ends with a
# λ-step 4-5 times the one before it (λ ≈ 1.1 → 4.6 into t = 0 at 10 steps), where extrapolating x̂₀
# amplifies the SDE's injected noise (dpmpp-3m-sde on leading diverged: tests/test_solvers.py).
MAX_STEP_RATIO = 2.0


def multistep_order(h_hist: list[float], h: float) -> int:
    """How many predictions (1, 2, 3, ...) a multistep step of λ-length ``h`` may use: one more for
    each earlier step (``h_hist``, oldest first) as long as every consecutive ratio h_{j+1}/h_j from
    that step on is at most MAX_STEP_RATIO. On grids uniform in λ ("logsnr") nothing changes; on the
    uniform-in-t grids it makes the last long step first order: DPM-Solver++'s ``lower_order_final``
    (Lu et al. 2022b, §4 and its reference code) applied where the grid needs it, at any step count."""
    order, nxt = 1, h
    for h_prev in reversed(h_hist):
        if nxt > MAX_STEP_RATIO * h_prev:
            break
        order, nxt = order + 1, h_prev
    return order


def _dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps, eta: float, generator, callback,
              clip_x0: bool) -> torch.Tensor:
    """Second-order multistep exponential integrator with noise level η (the family of :func:`_dpmpp_3m`):

    x_s = (σ_s/σ_t)·e^{−ηh}·x_t + α_s·(1 − e^{−H})·D + σ_s·sqrt(1 − e^{−2ηh})·z,  H = (1 + η)·h,
    D = x̂₀_t + (x̂₀_t − x̂₀_prev)/(2r), r = h_prev/h ("midpoint"); D = x̂₀_t on the first step, and the
    last step (to σ = 0) returns x̂₀ without noise. η = 0 is DPM-Solver++(2M), η = 1 SDE-DPM-Solver++(2M).
    """
    x0_prev, h_prev = None, None
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        a_t, s_t = alpha_sigma_f(denoiser, t)
        a_s, s_s = alpha_sigma_f(denoiser, s)
        _, x0 = predict(denoiser, x, t, clip_x0)
        if s_s == 0:
            # Last step to clean data: first order, noise-free, x_s = x̂₀.
            x = x0
        else:
            h = half_lambda(a_s, s_s) - half_lambda(a_t, s_t)
            d = x0
            if x0_prev is not None and multistep_order([h_prev], h) >= 2:
                # Second-order multistep correction from the previous prediction.
                r = h_prev / h
                d = x0 + (x0 - x0_prev) / (2 * r)
            # Exponential-integrator step plus the exactly scaled fresh noise.
            x = (s_s / s_t * math.exp(-eta * h)) * x - a_s * math.expm1(-(1 + eta) * h) * d
            if eta > 0:
                x = x + s_s * (-math.expm1(-2 * eta * h)) ** 0.5 * randn_like(x, generator)
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                    clip_x0: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022b Alg. 2 ("midpoint" form, as diffusers' default):

    x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D,  D = (1 + 1/(2r))·x̂₀_t − 1/(2r)·x̂₀_prev,  r = h_prev/h;
    D = x̂₀_t on the first and the last step. The η = 0 member of :func:`_dpmpp_2m`.
    """
    return _dpmpp_2m(denoiser, x, timesteps, 0.0, generator, callback, clip_x0)


def _dpmpp_3m(denoiser: Denoiser, x: torch.Tensor, timesteps, eta: float, generator, callback,
              lower_order_final: bool, clip_x0: bool) -> torch.Tensor:
    """Third-order multistep exponential integrator of the reverse-time family with noise level η.

    For η ∈ [0, 1] the reverse process dx = [f x − (1 + η²)/2 · g² ∇log p] dt + η g dw̄ has the same
    marginals as the forward process (η = 0: probability-flow ODE, η = 1: the reverse SDE). Variation of
    constants in λ for a step t → s, h = λ_s − λ_t, k = 1 + η, H = k·h, gives

        x_s = (σ_s/σ_t)·e^{−ηh}·x_t + α_s·∫_0^h k·e^{k(τ−h)} x̂₀(λ_t + τ) dτ + σ_s·sqrt(1 − e^{−2ηh})·z,

    and with x̂₀(λ_t + τ) ≈ x̂₀ + τ·x̂₀' + τ²/2·x̂₀'' the integral is exact (substitute u = k·τ):
    α_s·(φ₁ x̂₀ + φ₂/k · x̂₀' + φ₃/k² · x̂₀''), with φ₁ = 1 − e^{−H}, φ₂ = H − 1 + e^{−H},
    φ₃ = H²/2 − H + 1 − e^{−H} (∫_0^H e^{u−H} u^j/j! du). x̂₀', x̂₀'' are the derivatives at λ_t of the
    Newton polynomial through the last (up to) three predictions. η = 0 is DPM-Solver++(3M) (Lu et al.
    2022b, derived here by the Taylor expansion); η = 1 is the third-order SDE-DPM-Solver++ in the
    form k-diffusion calls ``dpmpp_3m_sde`` (written here from the equation above, in VP variables).
    """
    hist: list[tuple[float, torch.Tensor]] = []  # (λ, x̂₀), newest last
    pairs = step_pairs(timesteps)
    k = 1.0 + eta
    for i, (t, s) in enumerate(pairs):
        order = min(3, len(pairs) - i) if lower_order_final and len(pairs) < 15 else 3
        a_t, s_t = alpha_sigma_f(denoiser, t)
        a_s, s_s = alpha_sigma_f(denoiser, s)
        _, x0 = predict(denoiser, x, t, clip_x0)
        lam_t = half_lambda(a_t, s_t)
        hist = (hist + [(lam_t, x0)])[-3:]
        if s_s == 0:
            # Last step to clean data: first order, noise-free, x_s = x̂₀.
            x = x0
        else:
            h = half_lambda(a_s, s_s) - lam_t
            # Lower order where a consecutive λ-step ratio exceeds MAX_STEP_RATIO (the long last step of leading).
            order = min(order, multistep_order([lb - la for (la, _), (lb, _) in zip(hist, hist[1:])], h))
            use = hist[-order:]  # the predictions this step's polynomial goes through
            big_h = k * h
            phi1 = -math.expm1(-big_h)
            phi2 = big_h + math.expm1(-big_h)
            phi3 = big_h * big_h / 2 - phi2
            x = (s_s / s_t * math.exp(-eta * h)) * x + a_s * phi1 * x0
            if len(use) >= 2:
                (l1, m1), (l0, m0) = use[-2], use[-1]
                f01 = (m0 - m1) / (l0 - l1)  # first divided difference
                if len(use) == 3:
                    l2, m2 = use[0]
                    f12 = (m1 - m2) / (l1 - l2)
                    f012 = (f01 - f12) / (l0 - l2)  # second divided difference
                    # Third order: derivatives of the Newton quadratic at λ_t.
                    x = x + a_s * (phi2 / k * (f01 + (l0 - l1) * f012) + phi3 / (k * k) * 2 * f012)
                else:
                    # Second order (warm-up or final steps): derivative of the line through two points.
                    x = x + a_s * phi2 / k * f01
            if eta > 0:
                x = x + s_s * (-math.expm1(-2 * eta * h)) ** 0.5 * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_dpmpp_3m(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                    lower_order_final: bool = True, clip_x0: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M): third-order multistep, derived here from eq. 8 by a Taylor expansion.

    With x̂₀(λ_t + τ) ≈ x̂₀ + τ·x̂₀' + τ²/2·x̂₀'' the integral is exact:
    x_s = (σ_s/σ_t)·x_t + α_s·(φ₁·x̂₀ + φ₂·x̂₀' + φ₃·x̂₀''), with
    φ₁ = 1 − e^{−h}, φ₂ = h − 1 + e^{−h}, φ₃ = h²/2 − h + 1 − e^{−h}  (∫_0^h e^{τ−h} τ^k/k! dτ),
    and x̂₀', x̂₀'' are the derivatives at λ_t of the quadratic through the last three predictions
    (Newton divided differences in λ). The first two steps use one and two predictions (orders 1, 2).
    With ``lower_order_final`` and fewer than 15 steps, step i of N uses order min(3, N − i), so the
    second-to-last step is second order: the stabilising rule of the reference DPM-Solver code
    (``lower_order_final``). On runs/mnist-tiny at NFE 5 (logsnr spacing, N = 256) it takes FID-dom
    from 82.8 to 8.0 (2M: 6.1). The η = 0 member of :func:`_dpmpp_3m`.
    """
    return _dpmpp_3m(denoiser, x, timesteps, 0.0, generator, callback, lower_order_final, clip_x0)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                        eta: float = 1.0, lower_order_final: bool = True, clip_x0: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): :func:`_dpmpp_3m` with noise level ``eta`` (1: the reverse SDE; 0: 3M ODE)."""
    eta = check_range("dpmpp-3m-sde", "eta", eta, 0.0, 1.0)
    return _dpmpp_3m(denoiser, x, timesteps, eta, generator, callback, lower_order_final, clip_x0)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                        eta: float = 1.0, clip_x0: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++(2M): the exponential integrator of the reverse SDE (Song et al. 2021 eq. 6) in
    data prediction. Variation of constants in λ gives, exactly for constant x̂₀ (SDE-DPM-Solver++1),

    x_s = (σ_s/σ_t)·e^{−h}·x_t + α_s·(1 − e^{−2h})·D + σ_s·sqrt(1 − e^{−2h})·z,

    and the two-step version uses D = x̂₀_t + (1/(2r))·(x̂₀_t − x̂₀_prev), r = h_prev/h ("midpoint", as
    diffusers' ``sde-dpmsolver++`` and k-diffusion's ``sample_dpmpp_2m_sde``). Last step: x̂₀, no noise.

    ``eta`` < 1 takes the member of :func:`_dpmpp_2m` with less fresh noise; η = 0 is dpmpp-2m exactly.
    """
    eta = check_range("dpmpp-2m-sde", "eta", eta, 0.0, 1.0)
    return _dpmpp_2m(denoiser, x, timesteps, eta, generator, callback, clip_x0)
