"""Calibration-set collectors for post-training quantization, shared by both backends (fake-quant in
:mod:`leandiff.compress.quant`, ONNX Runtime int8 in :mod:`leandiff.compress.onnx`).

All are data-free (the full-precision model's own denoising) except the ``real`` baseline:
``uniform`` (timesteps uniform along the FP sampling trajectories), ``qdiff`` (Q-Diffusion's
time-step-aware sampling, Li et al. 2023 §4.2), ``ndtc`` (PTQ4DM's normally distributed time-step
calibration, Shang et al. 2023 Alg. 1) — :data:`COLLECTORS`. Each returns the network's own inputs
and t (:meth:`leandiff.denoiser.Denoiser.net_input`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..denoiser import Denoiser, call_network
from ..device import device_of
from ..errors import UserError
from ..sample import SampleConfig, sample_all
from ..schedule import q_sample
from .ddim import ddim_to


@dataclass(frozen=True)
class CalibConfig:
    collector: str = "ndtc"  # uniform | qdiff | ndtc | real
    n: int = 256  # calibration samples (x_t, t)
    steps: int = 50  # DDIM steps of the full-precision trajectories the samples are taken from
    spacing: str = "leading"  # their timestep spacing (uniform, qdiff; ndtc walks its own linear grid)
    interval: int = 5  # qdiff: every c-th step of the trajectory
    mu: float = 0.4  # ndtc: mean of t as a fraction of T
    sigma: float = 0.4  # ndtc: standard deviation of t as a fraction of T
    batch_size: int = 128  # trajectories run in batches of this many
    seed: int = 0


class _Recorder(nn.Module):
    """Wraps a network: every evaluation's input (x_t, t) is appended to ``calls``."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).clone()))
        return call_network(self.net, x, t)


def fp_trajectories(denoiser: Denoiser, shape, cfg: CalibConfig, n_traj: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The FP model's own DDIM trajectories (via leandiff.sample): one (x_t, t) batch per step."""
    rec = _Recorder(denoiser.net)
    d = Denoiser(rec, denoiser.schedule, denoiser.parameterization)
    sample_all(d, shape, SampleConfig(solver="ddim", nfe=cfg.steps, spacing=cfg.spacing, n=n_traj, seed=cfg.seed,
                                      batch_size=cfg.batch_size))
    per_batch = [rec.calls[i:i + cfg.steps] for i in range(0, len(rec.calls), cfg.steps)]
    # step i of every batch together
    return [(torch.cat([b[i][0] for b in per_batch]), torch.cat([b[i][1] for b in per_batch])) for i in range(cfg.steps)]


def collect_uniform(denoiser, shape, cfg: CalibConfig, images=None):
    """Timesteps uniform along the FP sampling trajectories: n (sample, step) pairs drawn uniformly."""
    traj = fp_trajectories(denoiser, shape, cfg, n_traj=max(1, math.ceil(cfg.n / cfg.steps) * 4))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    m = traj[0][0].shape[0]
    steps = torch.randint(0, len(traj), (cfg.n,), generator=g)
    rows = torch.randint(0, m, (cfg.n,), generator=g)
    return torch.stack([traj[s][0][r] for s, r in zip(steps, rows)]), torch.stack([traj[s][1][r] for s, r in zip(steps, rows)])


def collect_qdiff(denoiser, shape, cfg: CalibConfig, images=None):
    """Q-Diffusion time-step-aware calibration (Li et al. 2023, §4.2): every c-th step of the FP
    sampling trajectory, the same number of samples at each selected step."""
    chosen = list(range(0, cfg.steps, cfg.interval))
    per = max(1, cfg.n // len(chosen))
    traj = fp_trajectories(denoiser, shape, cfg, n_traj=per)
    xs = torch.cat([traj[i][0][:per] for i in chosen])
    ts = torch.cat([traj[i][1][:per] for i in chosen])
    return xs[:cfg.n], ts[:cfg.n]


def ndtc_timesteps(T: int, cfg: CalibConfig, g: torch.Generator) -> torch.Tensor:
    """PTQ4DM Alg. 1 lines 3–5: t_i ~ N(μ, σ²), t_i = ⌊t_i⌋, t_i = clamp(t_i, 0, T − 1)
    (the slides write Clamp(0, T); with 0-based integer timesteps the last one is T − 1)."""
    t = torch.randn(cfg.n, generator=g) * cfg.sigma * T + cfg.mu * T
    return torch.clamp(torch.floor(t), 0, T - 1)


@torch.no_grad()
def collect_ndtc(denoiser, shape, cfg: CalibConfig, images=None):
    """PTQ4DM normally distributed time-step calibration (Shang et al. 2023, Alg. 1): each sample
    is produced by the FP model denoising from T down to its own t_i. The paper runs all ancestral
    steps T..t_i; to keep calibration cheap we take ``steps`` DDIM (η = 0) steps from T−1 to t_i,
    per sample (t is a per-sample vector, so one batch holds many different t_i)."""
    T = denoiser.schedule.T
    g = torch.Generator().manual_seed(cfg.seed)
    t_end = ndtc_timesteps(T, cfg, g)
    dev = device_of(denoiser.net)  # drawn on the CPU (the same set on every device), computed on the network's
    xs = []
    for b0 in range(0, cfg.n, cfg.batch_size):
        te = t_end[b0:b0 + cfg.batch_size].to(dev)
        x = torch.randn((te.shape[0], *shape), generator=g).to(dev)
        k = max(1, cfg.steps)
        grid = [(T - 1) + (te - (T - 1)) * j / k for j in range(k + 1)]  # per-sample linear t from T−1 to t_i
        for j in range(k):
            x = ddim_to(denoiser, x, torch.round(grid[j]), torch.round(grid[j + 1]), clip_x0=False)  # DDIM (η = 0) to s
        xs.append(x)
    return denoiser.net_input(torch.cat(xs), t_end.to(dev))


def collect_real(denoiser, shape, cfg: CalibConfig, images=None):
    """Baseline (not data-free): real training images noised by q_sample at uniform t."""
    if images is None:
        raise UserError("quant: calib=real needs training images (give --dataset)")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(0, images.shape[0], (cfg.n,), generator=g)
    t = torch.randint(0, denoiser.schedule.T, (cfg.n,), generator=g).float()
    noise = torch.randn((cfg.n, *shape), generator=g)
    dev = device_of(denoiser.net)
    t = t.to(dev)
    return denoiser.net_input(q_sample(denoiser.schedule, images[idx].to(dev), t, noise.to(dev)), t)


COLLECTORS: dict[str, Callable] = {"uniform": collect_uniform, "qdiff": collect_qdiff, "ndtc": collect_ndtc,
                                   "real": collect_real}


def collect(denoiser: Denoiser, shape, cfg: CalibConfig, images=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration set of collector ``cfg.collector``: the network's own inputs [N, C, H, W] and t [N]
    (x_t itself, or what :meth:`Denoiser.net_input` makes of it for a preconditioned parameterization)."""
    if cfg.collector not in COLLECTORS:
        raise UserError(f"quant: unknown calibration collector {cfg.collector!r}; known: {', '.join(COLLECTORS)}")
    if cfg.n < 1:
        raise UserError(f"quant: calibration size must be >= 1, got {cfg.n}")
    with torch.no_grad():
        return COLLECTORS[cfg.collector](denoiser, shape, cfg, images)
