"""Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Alg. 2).

A consistency function f_θ(x_t, t) maps every point of a probability-flow ODE trajectory to its
origin. CD trains it on adjacent points of a discretisation σ_min = σ_1 < … < σ_N = σ_max of the
teacher's ODE: with x_{n+1} = x₀ + σ_{n+1}·z (EDM coordinates; in VP ones x_t = α_t·x̄) and x̂_n one
step of the teacher's ODE solver from x_{n+1} to σ_n,

    L = d(f_θ(x_{n+1}, σ_{n+1}), f_θ⁻(x̂_n, σ_n)),  θ⁻ ← stopgrad(μ·θ⁻ + (1 − μ)·θ),

n uniform in 1..N−1. The boundary condition f(x, σ_min) = x holds exactly by the parameterization
``cm(sigma_data, sigma_min, base=B)`` (:func:`leandiff.denoiser.cm_base_skip`): f = c_skip·x̄ +
(1 − c_skip)·x̂₀, with x̂₀ what the network says in its teacher's parameterization B (ε, v, x₀ or EDM), so
the teacher's weights are the consistency function everywhere but at the boundary and CD starts from
them. (The first version read the network's output as App. C's F; from a v teacher that start is F = v
where the match is F = −v at σ_d = 1 — a sign- and scale-flipped x̂₀ that 1,500 updates did not undo.)
The student is a Denoiser like any other: its x̂₀ is f, every solver and runtime runs it, and the
``consistency`` solver samples it in one or a few steps (Alg. 1). The discretisation is Karras et al.'s
(ρ = 7, CD's choice): σ_i = (σ_min^{1/ρ} + (i−1)/(N−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ, with σ_min, σ_max
the schedule's own ends (linear β: 0.010 and 157) unless given. Where a given σ_max lies below the
schedule's end, the end (t = T−1, where every sampler starts) is added as one more point above it, so
the student is trained at the timestep it is first called at (on the cosine schedule σ_max = 80 is
t ≈ 991 and t = 999 is σ ≈ 2·10⁴: the same pure noise, but a t the network must still be taught).
The distance is the pseudo-Huber loss of Song & Dhariwal
2023 ("Improved Techniques for Training Consistency Models", §3.3): d(x, y) = sqrt(‖x − y‖² + c²) − c,
c = 0.00054·sqrt(dim), since no LPIPS weights are available offline. The default μ = 0 is iCT's
finding (§3.2: θ⁻ = stopgrad(θ) is better than an EMA target); μ > 0 keeps the EMA target of the CM
paper, saved with the training state so that a killed run resumes exactly.

The student starts from the teacher's weights.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..denoiser import EDM_SIGMA_DATA, Denoiser, parse_parameterization
from ..errors import UserError
from ..schedule import alpha_sigma, q_sample, t_of_edm_sigma
from ..spec import values
from ..train import training_images
from .training import Training, check_steps, fit

TEACHER_SOLVERS = ("heun", "euler")
GRIDS = ("continuous", "discrete")


@dataclass(frozen=True)
class CDConfig:
    # discretisation points N. CD on CIFAR-10 uses 18; at 2,500 updates on zoo:mnist-tiny-v2, N = 10 beat 18 at
    # every NFE (1 step 4.60 vs 6.52, 8 steps 2.80 vs 7.47: benchmarks/results/fewstep.md vs fewstep_cd_n18.md):
    # fewer hops for the boundary condition to travel up the grid, as iCT's curriculum starts at 10
    n: int = 10
    rho: float = 7.0  # Karras et al.'s ρ
    solver: str = "heun"  # the teacher's ODE step between adjacent points: heun (2 evaluations) or euler (= DDIM)
    mu: float = 0.0  # target EMA decay; 0: θ⁻ = stopgrad(θ) (iCT)
    huber_c: float = 0.0  # pseudo-Huber c; 0: 0.00054·sqrt(dim)
    sigma_min: float = 0.0  # 0: the schedule's smallest σ (t = 0)
    sigma_max: float = 0.0  # 0: the schedule's largest σ (t = T−1)
    sigma_data: float = 0.0  # c_in's σ_d for an EDM teacher; 0: the teacher's own (any other base: 0.5, unused)
    nfe: int = 1  # the student's intended number of steps (recorded for its sampler)
    # discrete: n drawn from the N points only (Alg. 2); continuous: the pair (σ(u), σ(u+1)) at a uniform
    # real u in [0, N−2] of the same ρ-grid, so every t a sampler may call is trained (see CDLoss)
    grid: str = "continuous"
    # the EMA is what the checkpoint holds (evaluation weights), as in the CM paper; bf16: the student's
    # forward/backward only (the teacher and the target run in fp32)
    train: Training = field(default_factory=lambda: Training(steps=2000, lr=1e-4, warmup=100, ema_decay=0.999))

    def __post_init__(self):
        checks = [(self.n >= 2, f"cd: n (discretisation points) must be >= 2, got {self.n}"),
                  (self.rho > 0, f"cd: rho must be > 0, got {self.rho}"),
                  (self.solver in TEACHER_SOLVERS, f"cd: solver must be one of {', '.join(TEACHER_SOLVERS)}, got {self.solver!r}"),
                  (self.grid in GRIDS, f"cd: grid must be one of {', '.join(GRIDS)}, got {self.grid!r}"),
                  (0 <= self.mu < 1, f"cd: mu must be in [0, 1), got {self.mu}"),
                  (self.huber_c >= 0, f"cd: huber_c must be >= 0, got {self.huber_c}"),
                  (self.sigma_min >= 0 and self.sigma_max >= 0, "cd: sigma_min and sigma_max must be >= 0"),
                  (self.sigma_max == 0 or self.sigma_max > self.sigma_min, "cd: sigma_max must exceed sigma_min"),
                  (self.sigma_data >= 0, f"cd: sigma_data must be >= 0, got {self.sigma_data}"),
                  (self.nfe >= 1, f"cd: nfe must be >= 1, got {self.nfe}")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        check_steps("cd", self.train)


def sigma_range(schedule, cfg: CDConfig) -> tuple[float, float]:
    """(σ_min, σ_max) of the discretisation: the config's, else the schedule's ends (EDM σ = σ_t/α_t)."""
    a, s = alpha_sigma(schedule, torch.tensor([0.0, schedule.T - 1.0]))
    lo, hi = (s / a).tolist()
    return (cfg.sigma_min or lo), (cfg.sigma_max or hi)


def karras_sigma_at(u: torch.Tensor, sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """σ at a real index u in [0, N−1] of the N-point ρ-grid (Karras et al. 2022, eq. 5, increasing)."""
    a, b = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (a + u / (n - 1) * (b - a)) ** rho


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """σ_1 < … < σ_N (Karras et al. 2022, eq. 5, in increasing order), float64."""
    return karras_sigma_at(torch.arange(n, dtype=torch.float64), sigma_min, sigma_max, n, rho)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def teacher_step(teacher: Denoiser, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, solver: str = "heun") -> torch.Tensor:
    """One step of the probability-flow ODE from t to s < t per sample, in EDM's variables
    dx̄/dσ̄ = ε̂ (x̄ = x/α, σ̄ = σ/α): Euler (= DDIM) or Heun (EDM Alg. 1 without churn); back to x = α x̄."""
    a_t, s_t = alpha_sigma(teacher.schedule, t.double())
    a_s, s_s = alpha_sigma(teacher.schedule, s.double())
    h = _bcast(s_s / a_s - s_t / a_t, x)  # step in σ̄ (negative)
    a_t, a_s = _bcast(a_t, x), _bcast(a_s, x)
    x_bar = x / a_t
    d = teacher.eps(x, t)
    # Euler step.
    x_next = x_bar + h * d
    if solver == "heun":
        # 2nd-order correction: average the slopes at both ends.
        x_next = x_bar + h * (d + teacher.eps(a_s * x_next, s)) / 2
    return a_s * x_next


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(‖a − b‖² + c²) − c per sample (iCT §3.3)."""
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt() - c


class CDLoss:
    """The consistency-distillation loss (Alg. 2) as a training-loop loss with state: the target
    network θ⁻ (an EMA of the student with decay μ, updated before each step from the student's
    current weights) is saved and restored with the training state.

    Adjacent points: ``grid=discrete`` draws n from the N points (and the extra top pair, if any) as
    Alg. 2 does, so the student is trained at those N timesteps only and a sampler's other timesteps
    (trailing 2 NFE calls t = 499, between two points) meet an untrained mix of teacher and student.
    ``grid=continuous`` draws a real u uniform in [0, N−2] and pairs σ(u+1) with σ(u) on the same ρ-grid
    (the step in σ^{1/ρ} is the discrete grid's), the extra top pair with probability 1/N."""

    def __init__(self, teacher: Denoiser, student_net: nn.Module, ts: torch.Tensor, cfg: CDConfig, dim: int,
                 sigma_ends: tuple[float, float]):
        self.teacher, self.ts, self.cfg = teacher, ts, cfg
        self.sigma_ends = sigma_ends  # (σ_min, σ_max) of the ρ-grid
        self.c = cfg.huber_c or 0.00054 * math.sqrt(dim)
        self.target = copy.deepcopy(student_net).eval().requires_grad_(False)
        self.started = False

    def state_dict(self) -> dict:
        return {f"target.{k}": v for k, v in self.target.state_dict().items()} | {
            "started": torch.tensor(int(self.started))}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.target.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("target.")})
            self.started = bool(state.get("started", torch.tensor(1)).item())

    @torch.no_grad()
    def _update_target(self, student_net: nn.Module) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ, with θ the weights after the previous optimizer step."""
        net = getattr(student_net, "module", student_net)  # DDP
        for p_t, p in zip(self.target.parameters(), net.parameters()):
            p_t.lerp_(p.detach(), 1 - self.cfg.mu)
        for b_t, b in zip(self.target.buffers(), net.buffers()):
            b_t.copy_(b)

    def _continuous(self, t_lo, t_hi, n, g):
        """(t(σ(u)), t(σ(u+1))) for u uniform in [0, N−2]; the rows that drew the extra top pair keep it."""
        k = self.cfg.n
        u = torch.rand(n.shape, generator=g, device=g.device, dtype=torch.float64) * (k - 2)
        c_lo, c_hi = (t_of_edm_sigma(self.teacher.schedule, karras_sigma_at(v, *self.sigma_ends, k, self.cfg.rho))
                      for v in (u, u + 1))
        c_lo, c_hi = c_lo.to(t_lo), c_hi.to(t_hi)
        top = n >= k - 1  # the pair (σ_max, schedule end), when the grid has it
        return torch.where(top, t_lo, c_lo), torch.where(top, t_hi, c_hi)

    def __call__(self, student: Denoiser, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.started:
            self._update_target(student.net)
        self.started = True
        n = torch.randint(0, len(self.ts) - 1, (x0.shape[0],), generator=g, device=g.device)
        if self.ts.device != n.device:  # once: the step table lives where the training runs
            self.ts = self.ts.to(n.device)
        t_lo, t_hi = self.ts[n], self.ts[n + 1]
        if self.cfg.grid == "continuous":
            t_lo, t_hi = self._continuous(t_lo, t_hi, n, g)
        z = torch.randn(x0.shape, generator=g, device=x0.device)
        x_hi = q_sample(student.schedule, x0, t_hi, z)
        with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
            x_lo = teacher_step(self.teacher, x_hi.float(), t_hi, t_lo, self.cfg.solver)
            target = Denoiser(self.target, student.schedule, student.parameterization).x0(x_lo, t_lo).float()
        pred = student.convert(student(x_hi, t_hi).float(), x_hi, t_hi)[1]
        return pseudo_huber(pred, target, self.c).mean()


def student_parameterization(teacher: str, sigma_min: float, sigma_data: float = 0.0) -> str:
    """The student's ``cm`` over its teacher's parameterization, with the boundary at ``sigma_min``."""
    kind, settings = parse_parameterization(teacher)
    if kind == "cm":  # a consistency model distilled again keeps what its network predicts
        kind, settings = settings.get("base", "edm"), settings
    own = settings.get("sigma_data")
    if sigma_data and own is not None and kind == "edm" and sigma_data != own:
        raise UserError(f"cd: sigma_data={sigma_data} differs from the EDM teacher's {own}; the student's network "
                        "is the teacher's and keeps its c_in")
    sd = own if own is not None else (sigma_data or EDM_SIGMA_DATA)
    return f"cm(sigma_data={sd!r},sigma_min={sigma_min!r},base={kind})"


def discretisation(schedule, cfg: CDConfig) -> tuple[float, float, torch.Tensor]:
    """(σ_min, σ_max, the timesteps t_1 < … of the discretisation): Karras' N points, plus t = T−1 above a
    σ_max given below the schedule's end (see the module doc)."""
    lo, hi = sigma_range(schedule, cfg)
    ts = t_of_edm_sigma(schedule, karras_sigmas(lo, hi, cfg.n, cfg.rho)).float()
    if ts[-1] < schedule.T - 1 - 1e-3:
        ts = torch.cat([ts, torch.tensor([schedule.T - 1.0])])
    if (ts[1:] <= ts[:-1]).any():
        raise UserError(f"cd: the discretisation collapses on this schedule (n={cfg.n} between σ={lo:.3g} and {hi:.3g})")
    return lo, hi, ts


def consistency_distill(ckpt: Checkpoint, out_dir, cfg: CDConfig, *, dataset: str, data_dir=None, seed: int = 0,
                        progress=None) -> Checkpoint:
    """Distil ``ckpt``'s probability-flow ODE into a consistency model (see the module doc)."""
    from ..models import image_shape

    lo, hi, ts = discretisation(ckpt.schedule, cfg)
    teacher_net = copy.deepcopy(ckpt.net).float().eval().requires_grad_(False)
    teacher = Denoiser(teacher_net, ckpt.schedule, ckpt.parameterization)
    param = student_parameterization(ckpt.parameterization, lo, cfg.sigma_data)
    student = Checkpoint(net=copy.deepcopy(ckpt.net).float().train().requires_grad_(True), arch=copy.deepcopy(ckpt.arch),
                         schedule=ckpt.schedule, parameterization=param, meta=copy.deepcopy(ckpt.meta))
    tcfg = cfg.train.config(dataset, data_dir, param, seed)
    dim = math.prod(image_shape(ckpt.arch))
    loss = CDLoss(teacher, student.net, ts, cfg, dim, sigma_ends=(lo, hi))
    out = fit(tcfg, out_dir, student, training_images(tcfg, student), loss, progress)
    out.meta["sampler"] = {"solver": "consistency", "nfe": cfg.nfe, "spacing": "trailing"}
    out.meta["distill"] = {"method": "cd", **values(cfg), "sigma_min": lo, "sigma_max": hi,
                           "timesteps": [round(float(t), 4) for t in ts],
                           "teacher_parameterization": ckpt.parameterization,
                           "train_cpu_seconds": (out.meta.get("train") or {}).get("cpu_seconds")}
    parse_parameterization(out.parameterization)
    return out


def cd_step(ckpt: Checkpoint, cfg: CDConfig, ctx) -> Checkpoint:
    """Consistency distillation (Song et al. 2023, Alg. 2): a one- or few-step consistency-model student."""
    if not ctx.dataset:
        raise UserError("cd needs the training dataset: the checkpoint does not record one; pass --dataset")
    return consistency_distill(ckpt, ctx.step_dir, cfg, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                               progress=ctx.progress)
