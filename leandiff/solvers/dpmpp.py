"""DPM-Solver++ (Lu, Zhou, Bao, Chen, Li & Zhu 2022b, arXiv 2211.01095): exponential integrators of the
probability-flow ODE and of the reverse SDE in data prediction x̂₀, multistep (one evaluation a step).

With α, σ of the VP process and λ = log(α/σ), h = λ_s − λ_t > 0 for a step t → s, the ODE solution is
(DPM-Solver++ eq. 8)

    x_s = (σ_s/σ_t)·x_t + α_s·∫_0^h e^{τ−h} x̂₀(λ_t + τ) dτ,

and the multistep methods replace x̂₀(λ) by the polynomial through the last one, two or three
predictions. The final step to t = −1 (σ = 0, h = ∞) is always first order and returns x̂₀ of the last
evaluation, as DPM-Solver++ and diffusers (``final_sigmas_type="zero"``) do.

Spacing matters for multistep methods: spacings that end at t = 0 ("leading", "linspace") make the
step into t = 0 a long jump in λ (λ goes from about 1 to 4.6 at 10 steps on the DDPM schedule), where
extrapolating x̂₀ linearly overshoots; "logsnr" (uniform in λ, the grid of the DPM-Solver papers) or
"trailing" avoid it. On the Gaussian contract problem of tests/test_solvers.py at 10 steps the final
std is off by +38% (leading) versus +3% (logsnr) for dpmpp-2m.
"""
from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ._common import alpha_sigma_f, half_lambda, predict, randn_like, step_pairs


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                    clip_x0: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022b Alg. 2 ("midpoint" form, as diffusers' default):

    x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D,  D = (1 + 1/(2r))·x̂₀_t − 1/(2r)·x̂₀_prev,  r = h_prev/h;
    D = x̂₀_t on the first and the last step.
    """
    x0_prev, h_prev = None, None
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        a_t, s_t = alpha_sigma_f(denoiser, t)
        a_s, s_s = alpha_sigma_f(denoiser, s)
        _, x0 = predict(denoiser, x, t, clip_x0)
        if s_s == 0:
            # Last step to clean data: first order, x_s = x̂₀.
            x = x0
        else:
            h = half_lambda(a_s, s_s) - half_lambda(a_t, s_t)
            d = x0
            if x0_prev is not None:
                # Second-order multistep correction from the previous prediction.
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
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
    from 82.8 to 8.0 (2M: 6.1).
    """
    hist: list[tuple[float, torch.Tensor]] = []  # (λ, x̂₀), newest last
    pairs = step_pairs(timesteps)
    for i, (t, s) in enumerate(pairs):
        order = min(3, len(pairs) - i) if lower_order_final and len(pairs) < 15 else 3
        a_t, s_t = alpha_sigma_f(denoiser, t)
        a_s, s_s = alpha_sigma_f(denoiser, s)
        _, x0 = predict(denoiser, x, t, clip_x0)
        lam_t = half_lambda(a_t, s_t)
        hist = (hist + [(lam_t, x0)])[-3:]
        use = hist[-order:]  # the predictions this step's polynomial goes through
        if s_s == 0:
            # Last step to clean data: first order, x_s = x̂₀.
            x = x0
        else:
            h = half_lambda(a_s, s_s) - lam_t
            phi1 = -math.expm1(-h)
            phi2 = h + math.expm1(-h)
            phi3 = h * h / 2 - phi2
            x = (s_s / s_t) * x + a_s * phi1 * x0
            if len(use) >= 2:
                (l1, m1), (l0, m0) = use[-2], use[-1]
                f01 = (m0 - m1) / (l0 - l1)  # first divided difference
                if len(use) == 3:
                    l2, m2 = use[0]
                    f12 = (m1 - m2) / (l1 - l2)
                    f012 = (f01 - f12) / (l0 - l2)  # second divided difference
                    # Third order: derivatives of the Newton quadratic at λ_t.
                    x = x + a_s * (phi2 * (f01 + (l0 - l1) * f012) + phi3 * 2 * f012)
                else:
                    # Second order (warm-up or final steps): derivative of the line through two points.
                    x = x + a_s * phi2 * f01
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                        clip_x0: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++(2M): the exponential integrator of the reverse SDE (Song et al. 2021 eq. 6) in
    data prediction. Variation of constants in λ gives, exactly for constant x̂₀ (SDE-DPM-Solver++1),

    x_s = (σ_s/σ_t)·e^{−h}·x_t + α_s·(1 − e^{−2h})·D + σ_s·sqrt(1 − e^{−2h})·z,

    and the two-step version uses D = x̂₀_t + (1/(2r))·(x̂₀_t − x̂₀_prev), r = h_prev/h ("midpoint", as
    diffusers' ``sde-dpmsolver++`` and k-diffusion's ``sample_dpmpp_2m_sde``). Last step: x̂₀, no noise.
    """
    x0_prev, h_prev = None, None
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        a_t, s_t = alpha_sigma_f(denoiser, t)
        a_s, s_s = alpha_sigma_f(denoiser, s)
        _, x0 = predict(denoiser, x, t, clip_x0)
        if s_s == 0:
            # Last step to clean data: first order, noise-free.
            x = x0
        else:
            h = half_lambda(a_s, s_s) - half_lambda(a_t, s_t)
            d = x0
            if x0_prev is not None:
                # Second-order multistep correction.
                r = h_prev / h
                d = x0 + (x0 - x0_prev) / (2 * r)
            one_minus_e2h = -math.expm1(-2 * h)
            # Exponential-integrator step plus the exactly scaled fresh noise.
            x = (s_s / s_t * math.exp(-h)) * x + a_s * one_minus_e2h * d
            x = x + s_s * one_minus_e2h ** 0.5 * randn_like(x, generator)
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
