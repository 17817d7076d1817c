"""Distribution matching distillation: ``dmd(...)``, a one-step generator (Yin et al. 2024, "One-step
Diffusion with Distribution Matching Distillation" (DMD); Yin et al. 2024, "Improved Distribution
Matching Distillation for Fast Image Synthesis" (DMD2)).

The generator is the student network at the sampler's first timestep: G(z) = x̂₀(z, T−1), z ~ N(0, I),
so the student is an ordinary checkpoint in its teacher's parameterization sampled by one trailing DDIM
step (which is exactly x̂₀ at T−1). Unlike PD and CD it is not bound to the teacher's ODE: it is trained
to make the *distribution* of G(z) the teacher's, by the gradient of KL(p_G ‖ p_teacher) on the noised
samples (DMD eq. 7), with two score networks in x̂₀ form:

- the real one, the teacher (frozen);
- the fake one, μ_fake, a copy of the teacher kept fitted to the generator's current samples by the
  plain denoising loss (``fake_steps`` Adam updates per generator update: DMD2's two time-scale rule, 5
  there; DMD uses 1).

Per generator update, with x = G(z), t uniform in [t_min·T, t_max·T] (DMD: [0.02, 0.98]), x_t = α x + σ ε:

    grad = (μ_fake(x_t, t) − μ_real(x_t, t)) / mean|x − μ_real(x_t, t)|      (DMD eq. 8, per sample)
    L_DM = ½ · mean (x − stopgrad(x − grad))²        (so ∂L_DM/∂x = grad, up to the mean's count)

The score difference s_fake − s_real is α(μ_real − μ_fake)/σ², so descending along ``grad`` moves x
toward the teacher's density; the normalisation makes the step size independent of t. DMD adds a
regression loss on (z, teacher ODE sample from z) pairs to anchor the generator and keep its modes
(§3.3; λ_reg = 0.25 with LPIPS); here the distance is the mean squared error, since no LPIPS weights are
available offline. Its weight ``reg`` is 2 by default: at DMD's 0.25 the generator of
``zoo:mnist-tiny-v2`` collapsed onto one digit within 750 updates (recall 0.000; benchmarks/results/dmd.md),
because at its start (the teacher's x̂₀ at T−1, the blurry data mean for every z) only the regression gives
G(z) any dependence on z. The pairs are the teacher's ``teacher_solver``-``teacher_nfe`` samples (trailing
spacing, x̂₀ clipped as the harness samples; made once, :func:`leandiff.compress.progressive.teacher_pairs`);
``reg=0`` is DMD2 without its GAN term, ``dm=0`` the regression alone. A quarter of each batch (at least
one) is drawn from the pairs and feeds both losses.

**GAN term** (``gan`` > 0, DMD2 §4.3): a discriminator D = a small classifier head on the fake score
network's bottleneck (its ``mid_block`` output), which sees real training images and generator samples,
both noised to the same t. The fake network's update adds ``gan_d``·(softplus(−D(real_t)) +
softplus(D(gen_t))), the non-saturating GAN loss, so the bottleneck and head learn to tell them apart; the
generator adds ``gan``·softplus(−D(G(z)_t)), back-propagated through the frozen fake encoder into G. DMD2
weights them 3e-3 (generator) and 1e-2 (fake network) on ImageNet; the GAN sees real data, so unlike the
DM term it is not bounded by the teacher. With ``fake_steps`` > 1 (DMD2's two time-scale rule) every
fake update after the first draws a fresh batch from the generator (no gradient).

**Several steps** (``nfe=K``, DMD2's multi-step generator): the generator is trained at the K trailing timesteps
t_0 = T−1 > … > t_{K−1} and sampled by consistency sampling over them (x̂₀ at t_k, re-noised to t_{k+1}).
Each sample of a batch draws its step k; its input x_{t_k} comes from the generator's own k earlier steps
from pure noise, run without gradient ("backward simulation", so training sees the inputs sampling
will), with x̂₀ clipped to [−1, 1] as the harness samples. The DM loss applies at every step; the
regression pairs start from pure noise, so they train step 0 only.

The teacher is the step's input checkpoint, or the one at ``teacher=PATH``: then the input is the
generator's start (DMD2 and its fine-tuning runs start the generator from an earlier one-step student; a
run continued this way restarts its learning-rate schedule and its fake network from the teacher). The
fake network starts from the teacher's weights; it and its optimizer are saved with the training state, so
a killed run resumes where it stopped. One process only: the fake network is not
synchronised across ranks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint
from ..denoiser import Denoiser
from ..errors import UserError
from ..schedule import alpha_sigma, q_sample, timesteps
from ..solvers import DETERMINISTIC
from ..spec import values
from ..train import load_optimizer_tensors, optimizer_tensors, training_images
from .progressive import teacher_pairs
from .training import Training, check_steps, fit, need_dataset, rank_world


@dataclass(frozen=True)
class DMDConfig:
    fake_steps: int = 1  # fake-score updates per generator update (DMD: 1; DMD2: 5)
    fake_lr: float = 0.0  # the fake network's Adam lr; 0: the generator's base lr
    dm: float = 1.0  # weight of the distribution-matching loss; 0: regression only (Luhman & Luhman on the pairs)
    reg: float = 2.0  # weight of the regression loss on teacher pairs; 0: none (0.25, DMD's λ_reg, collapsed here)
    pairs: int = 4096  # teacher ODE pairs for the regression loss
    teacher_solver: str = "dpmpp-2m"
    teacher_nfe: int = 50
    t_min: float = 0.02  # the DM loss's timesteps, as fractions of T (DMD's range)
    t_max: float = 0.98
    nfe: int = 1  # the generator's steps (DMD2's multistep generator when > 1)
    teacher: str = ""  # the teacher's checkpoint; "": the step's input (which the generator then also starts from)
    gan: float = 0.0  # weight of DMD2's GAN term in the generator's loss (DMD2, ImageNet: 3e-3); 0: none
    gan_d: float = 1e-2  # weight of the discriminator's loss in the fake network's update (DMD2: 1e-2)
    train: Training = field(default_factory=lambda: Training(steps=2000, lr=1e-4, batch_size=64, ema_decay=0.999))

    def __post_init__(self):
        checks = [(self.fake_steps >= 1, f"dmd: fake_steps must be >= 1, got {self.fake_steps}"),
                  (self.dm >= 0 and (self.dm > 0 or self.reg > 0), f"dmd: need dm >= 0 and dm or reg > 0, got dm={self.dm}, reg={self.reg}"),
                  (self.fake_lr >= 0, f"dmd: fake_lr must be >= 0 (0: the generator's lr), got {self.fake_lr}"),
                  (self.reg >= 0, f"dmd: reg must be >= 0, got {self.reg}"),
                  (self.nfe >= 1, f"dmd: nfe must be >= 1, got {self.nfe}"),
                  (self.gan >= 0 and self.gan_d >= 0, f"dmd: gan and gan_d must be >= 0, got {self.gan}, {self.gan_d}"),
                  (self.gan == 0 or self.dm > 0, "dmd: the GAN's discriminator lives on the DM term's fake network: gan needs dm > 0"),
                  (self.pairs >= 1, f"dmd: pairs must be >= 1, got {self.pairs}"),
                  (self.teacher_solver in DETERMINISTIC,  # a pair is defined by its x_T
                   f"dmd: teacher_solver must be a deterministic solver ({', '.join(DETERMINISTIC)}), got {self.teacher_solver!r}"),
                  (self.teacher_nfe >= 1, f"dmd: teacher_nfe must be >= 1, got {self.teacher_nfe}"),
                  (0 <= self.t_min < self.t_max <= 1, f"dmd: need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        check_steps("dmd", self.train)


def dm_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample normalised distribution-matching gradient with respect to the sample x (eq. 8)."""
    norm = (x - real_x0).abs().flatten(1).mean(1).clamp(min=1e-8)
    return (fake_x0 - real_x0) / norm.reshape((-1,) + (1,) * (x.ndim - 1))


class _Stop(Exception):
    """Raised by the bottleneck hook when only the features are wanted (the decoder is not run)."""


class BottleneckHead(nn.Module):
    """DMD2's discriminator head on the bottleneck features: conv 3×3 → SiLU → conv 3×3 stride 2 → SiLU →
    global average → linear, one real-vs-generated logit per sample. No per-sample normalisation (a
    GroupNorm here would remove exactly the feature means that set real and generated images apart)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h).float()[:, 0]


def bottleneck(net: nn.Module) -> tuple[nn.Module, int]:
    """The network's bottleneck (a diffusers UNet's ``mid_block``) and its channels, or a user error naming
    what is missing."""
    mid = getattr(net, "mid_block", None)
    conv = next((m for m in mid.modules() if isinstance(m, nn.Conv2d)), None) if mid is not None else None
    if conv is None:
        raise UserError(f"dmd: gan needs a UNet with a convolutional mid_block; {type(net).__name__} has none")
    return mid, conv.in_channels


class DMDLoss:
    """The generator's loss (L_DM + reg·L_reg + gan·L_GAN) as a training-loop loss with state: each call
    first updates the fake score network (and the discriminator head) on the generator's current samples."""

    def __init__(self, teacher: Denoiser, fake_net: nn.Module, pairs: torch.Tensor, cfg: DMDConfig, lr: float):
        self.teacher, self.cfg, self.pairs = teacher, cfg, pairs
        self.fake = Denoiser(fake_net.train().requires_grad_(True), teacher.schedule, teacher.parameterization)
        self.head, self._feat, self._stop = None, None, False
        params = list(fake_net.parameters())
        if cfg.gan > 0:  # DMD2's discriminator: a head on the fake network's bottleneck, trained with it
            mid, channels = bottleneck(fake_net)
            self.head = BottleneckHead(channels)
            self.head.to(next(fake_net.parameters()).device)
            mid.register_forward_hook(self._keep_features)
            params += list(self.head.parameters())
        self.opt = torch.optim.Adam(params, lr=cfg.fake_lr or lr)
        self.steps = [float(t) for t in timesteps(teacher.schedule, cfg.nfe, "trailing").tolist()]

    def _keep_features(self, module, inputs, output):
        self._feat = output[0] if isinstance(output, tuple) else output
        if self._stop:
            raise _Stop

    def logits(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The discriminator's logit for each noised sample x_t at t (the fake network's encoder and head;
        its decoder is not run)."""
        self._stop = True
        try:
            self.fake(xt, t)
        except _Stop:
            pass
        finally:
            self._stop = False
        return self.head(self._feat)

    def state_dict(self) -> dict:
        head = {} if self.head is None else {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return ({f"fake.{k}": v for k, v in self.fake.net.state_dict().items()} | head
                | optimizer_tensors(self.opt, "opt."))

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.fake.net.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("fake.")})
        if self.head is not None:
            self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        load_optimizer_tensors(self.opt, state, "opt.")

    def _fake_update(self, x: torch.Tensor, real: torch.Tensor, g: torch.Generator) -> None:
        """One step of the fake network on the (detached) generator samples x: the plain denoising loss,
        plus, with the GAN term, the discriminator's loss on real images and x noised to the same t."""
        T = self.teacher.schedule.T
        t = torch.randint(0, T, (x.shape[0],), generator=g, device=g.device).to(x.device).float()
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x.device)
        xt = q_sample(self.fake.schedule, x, t, noise)
        loss = F.mse_loss(self.fake(xt, t).float(), self.fake.target(x, noise, t).float())
        if self.head is not None and self.cfg.gan_d > 0:
            gen_logit = self.head(self._feat)  # the features of the forward just run
            n = min(len(real), len(x))
            noise = torch.randn(real[:n].shape, generator=g, device=g.device).to(x.device)
            real_logit = self.logits(q_sample(self.fake.schedule, real[:n], t[:n], noise), t[:n])
            loss = loss + self.cfg.gan_d * (F.softplus(-real_logit).mean() + F.softplus(gen_logit).mean())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def _simulate(self, student: Denoiser, z: torch.Tensor, k: int, g: torch.Generator):
        """Each sample's generator input and timestep: a step drawn uniformly (the last ``k`` samples, the
        regression pairs', at step 0) and the input the generator's own earlier steps give it from z."""
        b, n = z.shape[0], len(self.steps)
        if n == 1:  # the one-step generator draws nothing here
            return z, torch.full((b,), self.steps[0], device=z.device)
        step = torch.randint(0, n, (b,), generator=g, device=g.device).to(z.device)
        if k:
            step[b - k:] = 0
        x, xin = z, z.clone()
        with torch.no_grad():
            for i in range(1, int(step.max()) + 1):
                live = step >= i  # the samples whose step is i or later: the others' inputs are set
                noise = torch.randn(x.shape, generator=g, device=g.device).to(z.device)  # all rows: one stream
                t = torch.full((int(live.sum()),), self.steps[i - 1], device=z.device)
                x0 = student.convert(student(x[live], t).float(), x[live], t)[1].clamp(-1, 1)
                a, sg = (float(v) for v in alpha_sigma(student.schedule, torch.tensor(self.steps[i])))
                x = x.clone()
                x[live] = a * x0 + sg * noise[live]
                xin[step == i] = x[step == i]
        tin = torch.tensor(self.steps, device=z.device)[step]
        return xin, tin

    def _dm_t(self, b: int, g: torch.Generator, device) -> torch.Tensor:
        """Timesteps uniform in [t_min, t_max]·(T − 1): where the DM and the generator's GAN loss look."""
        cfg = self.cfg
        t = (cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(b, generator=g, device=g.device)) * (self.teacher.schedule.T - 1)
        return t.to(device)

    def __call__(self, student: Denoiser, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        cfg, sched = self.cfg, student.schedule
        b = x0.shape[0]
        z = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
        k = max(1, b // 4) if cfg.reg > 0 else 0
        if k:
            idx = torch.randint(0, len(self.pairs), (k,), generator=g, device=g.device).cpu()
            pair = self.pairs[idx].to(x0.device)
            c = pair.shape[1] // 2
            z = torch.cat([z[: b - k], pair[:, :c]]) if cfg.dm > 0 else pair[:, :c]
            b = len(z)  # regression only: the pairs' part alone
        xin, tin = self._simulate(student, z, k, g)
        x = student.convert(student(xin, tin).float(), xin, tin)[1]  # G at each sample's step
        loss = x.new_zeros(())
        if cfg.dm > 0:
            xd = x.detach()
            with torch.enable_grad():
                self._fake_update(xd, x0, g)
            for _ in range(cfg.fake_steps - 1):  # two time scales: a fresh generator batch for each
                with torch.no_grad():
                    zf = torch.randn(xd.shape, generator=g, device=g.device).to(x0.device)
                    fin, ftin = self._simulate(student, zf, 0, g)
                    xf = student.convert(student(fin, ftin).float(), fin, ftin)[1]
                with torch.enable_grad():
                    self._fake_update(xf, x0, g)
            t = self._dm_t(b, g, x0.device)
            noise = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
            xt = q_sample(sched, xd, t, noise)
            with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
                real = self.teacher.x0(xt.float(), t).float()
                fake = self.fake.x0(xt.float(), t).float()
            grad = dm_gradient(xd, real, fake)
            loss = cfg.dm * 0.5 * F.mse_loss(x, (xd - grad))
        if k:
            loss = loss + cfg.reg * 0.5 * F.mse_loss(x[b - k:], pair[:, c:])
        if cfg.gan > 0:  # the generator's non-saturating GAN loss, through the frozen fake encoder and head
            t = self._dm_t(b, g, x0.device)
            noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
            frozen = [p for p in [*self.fake.net.parameters(), *self.head.parameters()] if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                logit = self.logits(q_sample(sched, x, t, noise), t)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            loss = loss + cfg.gan * F.softplus(-logit).mean()
        return loss


def dmd_distill(ckpt: Checkpoint, out_dir, cfg: DMDConfig, *, dataset: str, data_dir=None, seed: int = 0,
                progress=None, teacher: Checkpoint | None = None) -> Checkpoint:
    """Distil ``teacher`` (default: ``ckpt``) into a ``cfg.nfe``-step generator that starts from ``ckpt``, by
    distribution matching (see the module doc)."""
    if rank_world()[1] > 1:
        raise UserError("dmd trains in one process: its fake score network is not synchronised across ranks")
    tck = teacher if teacher is not None else ckpt
    if tck.schedule != ckpt.schedule:
        raise UserError("dmd: the teacher and the generator's start have different noise schedules")
    out_dir = Path(out_dir)
    pairs = teacher_pairs(tck, out_dir / "pairs.safetensors", cfg.pairs, cfg.teacher_solver, cfg.teacher_nfe,
                          "trailing", True, seed) if cfg.reg > 0 else torch.zeros(0)
    teacher = Denoiser(copy.deepcopy(tck.net).float().eval().requires_grad_(False), tck.schedule,
                       tck.parameterization)
    student = Checkpoint(net=copy.deepcopy(ckpt.net).float().train().requires_grad_(True), arch=copy.deepcopy(ckpt.arch),
                         schedule=ckpt.schedule, parameterization=ckpt.parameterization, meta=copy.deepcopy(ckpt.meta))
    tcfg = cfg.train.config(dataset, data_dir, ckpt.parameterization, seed)
    loss = DMDLoss(teacher, copy.deepcopy(tck.net).float(), pairs, cfg, cfg.train.lr)
    out = fit(tcfg, out_dir / "student", student, training_images(tcfg, student), loss, progress)
    # one trailing DDIM step is exactly G; K steps are consistency sampling over the K trailing timesteps
    out.meta["sampler"] = {"solver": "ddim" if cfg.nfe == 1 else "consistency", "nfe": cfg.nfe, "spacing": "trailing"}
    out.meta["distill"] = {"method": "dmd", **values(cfg),
                           "train_cpu_seconds": (out.meta.get("train") or {}).get("cpu_seconds")}
    return out


def dmd_step(ckpt: Checkpoint, cfg: DMDConfig, ctx) -> Checkpoint:
    """Distribution matching distillation (DMD / DMD2): a one- or few-step generator matched to the teacher's
    distribution."""
    need_dataset(ctx, "dmd")
    teacher = load_checkpoint(cfg.teacher, next(ckpt.net.parameters()).device) if cfg.teacher else None
    return dmd_distill(ckpt, ctx.step_dir, cfg, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                       progress=ctx.progress, teacher=teacher)
