"""The forward process as data: ``alphas_cumprod`` for T discrete steps and pure helpers.

Conventions (as in DDPM and diffusers): integer timesteps ``t = 0 .. T-1``, where
``alphas_cumprod[t] = ᾱ_t`` is the signal level *after* step t; ``α_t = sqrt(ᾱ_t)``,
``σ_t = sqrt(1 - ᾱ_t)``, ``log-SNR λ_t = log(α_t² / σ_t²)``. A fractional t interpolates
λ linearly between its integer neighbours, so α and σ stay consistent (α² + σ² = 1).
``t = -1`` stands for clean data (ᾱ = 1); samplers step to it at the end.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .errors import UserError

SCHEDULE_KINDS = ("linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace", "quadratic", "logsnr", "karras")
# EDM's sampling noise levels (Karras et al. 2022, Table 1, "Ours": σ_min 0.002, σ_max 80, ρ 7).
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0
# Spacing for a checkpoint that records none, by schedule kind (Schedule.default_spacing).
# linear β: logsnr. Measured on zoo:mnist-tiny (N=512, seed 0, FID-dom): DDIM-50 logsnr 5.455 / leading
# 6.376 / trailing 6.740; dpmpp-3m-sde NFE 20 0.511 / 0.620 / 0.643; on the Gaussian contract problem
# (tests/test_solvers.py) DDIM's std error is lowest on logsnr at NFE 10-100.
# cosine: trailing. The cosine schedule's log-SNR runs to about ±20 at its ends, so steps uniform in λ
# crowd where nothing changes: on zoo:mnist-tiny-v2 (N=2048, its card) dpmpp-2m-20 reads 0.505 trailing
# against 0.549 logsnr, on zoo:fashion-tiny-v2 1.244 against 1.606; dpmpp-3m-sde-10 (N=512,
# benchmarks/results/default_sampler.md) 56.4 logsnr on mnist-tiny-v2. The default solver
# (solvers.DEFAULT_SOLVER) brings its own spacing, trailing, on every schedule: at 10 NFE logsnr is far
# worse for it on linear β too (mnist-tiny 22.7 against 0.42, same file).
DEFAULT_SPACINGS = {"linear": "logsnr", "cosine": "trailing"}
DEFAULT_SPACING = DEFAULT_SPACINGS["linear"]  # where no schedule is known (SampleConfig, EvalConfig fields)


@dataclass(frozen=True)
class Schedule:
    """A discrete variance-preserving forward process."""

    kind: str  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal 2021)
    num_timesteps: int = 1000  # T
    beta_start: float = 1e-4  # linear-β only: β_1
    beta_end: float = 0.02  # linear-β only: β_T

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise UserError(f"unknown schedule {self.kind!r}; expected one of {', '.join(SCHEDULE_KINDS)}")
        if self.num_timesteps < 2:
            raise UserError(f"a schedule needs T >= 2 steps, got {self.num_timesteps}")

    @property
    def T(self) -> int:
        return self.num_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T-1 in float64 (computed on demand; it is cheap)."""
        return alphas_cumprod(self)

    @property
    def default_spacing(self) -> str:
        """The timestep spacing to use when neither the user nor the checkpoint names one."""
        return DEFAULT_SPACINGS[self.kind]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_timesteps": self.num_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        try:
            return cls(kind=str(d["kind"]), num_timesteps=int(d.get("num_timesteps", 1000)),
                       beta_start=float(d.get("beta_start", 1e-4)), beta_end=float(d.get("beta_end", 0.02)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed schedule in metadata: {d!r} ({e})") from None


def betas(schedule: Schedule) -> torch.Tensor:
    """β_t, float64. Linear: DDPM (Ho et al. 2020) β from 1e-4 to 0.02.
    Cosine: Nichol & Dhariwal 2021 eq. 17, ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at 0.999."""
    T = schedule.num_timesteps
    if schedule.kind == "linear":
        return torch.linspace(schedule.beta_start, schedule.beta_end, T, dtype=torch.float64)
    s = 0.008
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def alphas_cumprod(schedule: Schedule) -> torch.Tensor:
    return torch.cumprod(1 - betas(schedule), dim=0)


def log_snr(schedule: Schedule, t) -> torch.Tensor:
    """λ(t) = log(ᾱ_t / (1 - ᾱ_t)) at integer or fractional t (float64); t = -1 gives +inf."""
    if torch.is_tensor(t) and t.device.type != "cpu":
        return _log_snr_on_device(schedule, t)
    t = torch.as_tensor(t, dtype=torch.float64)
    ac = alphas_cumprod(schedule)
    lam = torch.log(ac) - torch.log1p(-ac)
    lam_ext = torch.cat([torch.tensor([math.inf], dtype=torch.float64), lam])  # index 0 is t = -1
    if ((t < -1) | (t > schedule.T - 1)).any():
        raise UserError(f"timestep out of range [-1, {schedule.T - 1}]: {t.min().item()}..{t.max().item()}")
    return _interpolate(lam_ext, t, schedule.T)


@functools.lru_cache(maxsize=16)
def _log_snr_table(schedule: Schedule, device: torch.device) -> torch.Tensor:
    """λ at t = -1 .. T-1 (float64, or float32 where the device has no float64: MPS), copied to ``device``
    once per (schedule, device), so that the per-step coefficients of a loop on an accelerator need no
    host-device copy."""
    ac = alphas_cumprod(schedule)
    lam = torch.cat([torch.tensor([math.inf], dtype=torch.float64), torch.log(ac) - torch.log1p(-ac)])
    return lam.to(device, torch.float32 if device.type == "mps" else torch.float64)


def _log_snr_on_device(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """:func:`log_snr` for t on an accelerator, computed there. The range check is asynchronous (a host
    check would wait for the device at every step); a bad t fails at the next synchronisation."""
    table = _log_snr_table(schedule, t.device)
    t = t.to(table.dtype)
    if t.device.type != "meta":
        torch._assert_async(((t >= -1) & (t <= schedule.T - 1)).all())
    return _interpolate(table, t, schedule.T)


def _interpolate(lam_ext: torch.Tensor, t: torch.Tensor, T: int) -> torch.Tensor:
    pos = t + 1
    lo = pos.floor().long().clamp(max=T)
    hi = (lo + 1).clamp(max=T)
    w = pos - lo
    a, b = lam_ext[lo], lam_ext[hi]
    # interpolate only where needed, so that +inf at t = -1 does not produce NaN
    return torch.where(w == 0, a, a + w * (b - a))


def alpha_sigma(schedule: Schedule, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) = (sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) from λ: α² = sigmoid(λ), σ² = sigmoid(-λ)."""
    lam = log_snr(schedule, t)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def alpha(schedule: Schedule, t) -> torch.Tensor:
    return alpha_sigma(schedule, t)[0]


def sigma(schedule: Schedule, t) -> torch.Tensor:
    return alpha_sigma(schedule, t)[1]


def q_sample(schedule: Schedule, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    """Forward process (DDPM eq. 4): x_t = α_t x_0 + σ_t ε, per-sample t of shape [B] or scalar."""
    a, s = alpha_sigma(schedule, t)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = a.to(x0.device, x0.dtype).reshape(shape) if a.ndim else a.to(x0.device, x0.dtype)
    s = s.to(x0.device, x0.dtype).reshape(shape) if s.ndim else s.to(x0.device, x0.dtype)
    return a * x0 + s * noise


def timesteps(schedule: Schedule, steps: int, spacing: str = "leading") -> torch.Tensor:
    """Descending integer timesteps for a ``steps``-step sampler; the sampler ends at t = -1.

    - ``leading``: t_i = i·⌊T/steps⌋ (DDIM; diffusers' default "leading").
    - ``trailing``: t_i = round(T - i·T/steps) - 1 (Lin et al. 2024, starts at T-1).
    - ``linspace``: evenly spaced from 0 to T-1, rounded.
    - ``quadratic``: t_i = ⌊(i·sqrt(0.8T)/(steps-1))²⌋, DDIM's CIFAR-10 "quad" setting.
    - ``logsnr``: uniform in log-SNR between t = T-1 and t = 0, mapped back to the nearest step.
    - ``karras``: EDM's grid (Karras et al. 2022, eq. 5): σ_i = (σ_max^(1/ρ) + i/(steps-1)·(σ_min^(1/ρ) −
      σ_max^(1/ρ)))^ρ in EDM's σ = σ_t/α_t, ρ = 7, σ_max = min(80, σ at T-1), σ_min = max(0.002, σ at 0),
      mapped back to the nearest step. It starts below T-1 where the schedule's σ passes 80, as EDM does.
    Steps that collide after rounding are moved apart by one, so the count is always exact.
    """
    T = schedule.T
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise UserError(f"number of steps must be an integer in [1, {T}], got {steps!r}")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.long) * (T // steps)
    elif spacing == "trailing":
        ts = (torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)) - 1).long().flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    elif spacing == "quadratic":
        ts = (torch.linspace(0, math.sqrt(0.8 * T), steps, dtype=torch.float64) ** 2).long()
    elif spacing in ("logsnr", "karras"):
        lam = log_snr(schedule, torch.arange(T))
        if spacing == "logsnr":
            target = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
        else:  # σ = exp(-λ/2)
            hi = min(math.exp(-lam[-1].item() / 2), KARRAS_SIGMA_MAX) ** (1 / KARRAS_RHO)
            lo = max(math.exp(-lam[0].item() / 2), KARRAS_SIGMA_MIN) ** (1 / KARRAS_RHO)
            sigma = (hi + torch.linspace(0, 1, steps, dtype=torch.float64) * (lo - hi)) ** KARRAS_RHO
            target = -2 * torch.log(sigma)
        ts = (lam[None, :] - target[:, None]).abs().argmin(dim=1)
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    # Rounding can make neighbours collide at small t (quadratic, log-SNR): nudge them apart so that
    # exactly ``steps`` distinct steps remain, staying inside [0, T-1].
    ts = ts.sort().values.tolist()
    for i in range(1, steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = min(ts[-1], T - 1)
    for i in range(steps - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    ts = torch.tensor(ts, dtype=torch.long)
    return ts.flip(0)


def t_of_log_snr(schedule: Schedule, lam) -> torch.Tensor:
    """The fractional t whose log-SNR is ``lam``: the inverse of :func:`log_snr` (which interpolates λ
    linearly between integer steps), float64. Values outside [λ(T-1), λ(0)] are clamped to [0, T-1]."""
    if torch.is_tensor(lam) and lam.device.type != "cpu":  # on an accelerator: its cached table, no sync
        table = _log_snr_table(schedule, lam.device)[1:].flip(0)
        x = torch.minimum(torch.maximum(lam.to(table.dtype), table[0]), table[-1])
        j = torch.searchsorted(table, x.contiguous()).clamp(1, schedule.T - 1)
        lo, hi = table[j - 1], table[j]
        return (schedule.T - j).to(table.dtype) - (x - lo) / (hi - lo)
    lam = torch.as_tensor(lam, dtype=torch.float64)
    table = log_snr(schedule, torch.arange(schedule.T)).flip(0)  # increasing in λ, index j is t = T-1-j
    x = lam.clamp(table[0].item(), table[-1].item())
    j = torch.searchsorted(table, x.contiguous()).clamp(1, schedule.T - 1)
    lo, hi = table[j - 1], table[j]
    frac = (x - lo) / (hi - lo)  # 0 at t = T-j, 1 at t = T-1-j
    return (schedule.T - j).to(torch.float64) - frac


def t_of_edm_sigma(schedule: Schedule, sigma_edm) -> torch.Tensor:
    """The fractional VP t at which σ_t/α_t equals EDM's noise level σ (Karras et al. 2022, Table 1:
    the VP process is x/α = x₀ + σ·ε with σ = σ_t/α_t, so λ = log(α²/σ_t²) = −2·ln σ)."""
    return t_of_log_snr(schedule, -2 * torch.log(torch.as_tensor(sigma_edm, dtype=torch.float64)))
