"""Distillation into few-step students: ``pd`` (progressive) and ``oneshot``.

- ``pd(from=256, to=4, steps_per_round=N)`` — progressive distillation (Salimans & Ho 2022, Alg. 2;
  ../shared/papers/progressive-distillation-report.md §4).
- ``oneshot(teacher_nfe=50, steps=N)`` — Luhman & Luhman 2021: a one-step student regresses the
  teacher's DDIM output x₀ from the same x_T.

**Parameterization of PD / one-shot students.** A distilled student must predict v (or x₀): an
ε-network's implied x̂₀ = (x_t − σ ε̂)/α divides by α ≈ 0.006 at the first step of a linear-β
schedule, so few-step samplers driven by ε are unusable (Salimans & Ho 2022, §4). We therefore
initialise the student from the teacher's weights and re-train its output head to v (or x₀) with a
short data fine-tune (``convert_steps``, the plain v-MSE, i.e. SNR+1 weighting) before the first
round. We do *not* distil the conversion from the ε teacher: the teacher's implied v̂ =
(ε̂ − σ x_t)/α amplifies its ε error by 1/α at high noise. The conversion only provides a start;
the first PD round's targets come from the original teacher's own DDIM steps, so the student chain
distils the shipped model's DDIM ODE. A student network reinterpreting the ε head would not help:
the 1/α would still be there.

**Timesteps.** The student at N steps is sampled by leandiff's ``ddim`` solver on
``schedule.timesteps(N, spacing)`` (default ``trailing``: the first step starts at t = T−1, which a
1-step sampler needs — ``leading`` would start a 1-step sampler at t = 0). Round N's teacher uses
``timesteps(2N, spacing)``, whose even entries must be the student's (trailing is nested; this is
checked at run time; ``leading`` is not), so one student DDIM step
from t_i to t_{i+1} is trained to match the teacher's two DDIM steps t_i → t'_{2i+1} → t_{i+1}.
The student records ``meta["sampler"] = {"solver": "ddim", "nfe": N, "spacing": "trailing"}``.
The linear-β schedule of the teacher is kept (the report's cosine schedule would change the
teacher's ODE); the paper's α(1) = 0 endpoint is therefore ᾱ_{T−1} = 4e-5 here.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoint import Checkpoint, save_checkpoint
from ..denoiser import Denoiser
from ..device import device_of
from ..errors import UserError
from ..io import atomic_path
from ..models import image_shape
from ..schedule import SPACINGS, log_snr, q_sample, timesteps as make_timesteps
from ..solvers import get_solver
from ..spec import Step, values
from ..train import WEIGHTINGS, DiffusionLoss, training_images
from .ddim import coef, ddim_to
from .training import Training, check_steps, fit, need_dataset, rank_world

PD_WEIGHTINGS = ("truncated-snr", "snr+1")  # Salimans & Ho 2022, §4 (report eqs. 9 and 10)
STUDENT_PARAMETERIZATIONS = ("v", "x0")


def pd_timesteps(schedule, n_student: int, spacing: str = "trailing") -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) timestep sequences, each descending and ending with −1 (clean data):
    the student's N steps and the teacher's 2N, the teacher's even entries being the student's."""
    if 2 * n_student > schedule.T:
        raise UserError(f"pd: a {n_student}-step student needs a {2 * n_student}-step teacher; T={schedule.T}")
    ts = torch.cat([make_timesteps(schedule, n_student, spacing), torch.tensor([-1])])
    tt = torch.cat([make_timesteps(schedule, 2 * n_student, spacing), torch.tensor([-1])])
    if not torch.equal(tt[::2], ts):
        raise UserError(f"pd: spacing {spacing!r} is not nested at {n_student}/{2 * n_student} steps "
                        f"(teacher's even timesteps {tt[::2].tolist()[:6]}... differ from the student's); use trailing")
    return ts, tt


def pd_target(teacher: Denoiser, xt: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor,
              clip_x0: bool = True) -> torch.Tensor:
    """x̃ such that one student DDIM step t → t'' with x̂ = x̃ lands where two teacher DDIM steps
    t → t' → t'' land (Salimans & Ho 2022, Alg. 2):
    x̃ = (x_{t''} − (σ_{t''}/σ_t) x_t) / (α_{t''} − (σ_{t''}/σ_t) α_t).

    Substituting the two steps, x̃ = w_a x̂₀(x_t) + w_b x̂₀(x_{t'}) with w_a + w_b = 1 and both ≥ 0
    because α/σ grows from t to t' to t'': a convex combination of the teacher's two predictions.
    The teacher's 2N-step sampler this reproduces is ``euler`` (= DDIM, consistent clipping) with
    clipping, and ``ddim`` = ``euler`` without it."""
    x_mid = ddim_to(teacher, xt, t, t_mid, clip_x0)  # 2 steps of DDIM with the teacher
    x_next = ddim_to(teacher, x_mid, t_mid, t_next, clip_x0)
    a_t, s_t = coef(teacher.schedule, t, xt.ndim)
    a_n, s_n = coef(teacher.schedule, t_next, xt.ndim)
    ratio = s_n / s_t
    return (x_next - ratio * xt) / (a_n - ratio * a_t)


class PDLoss:
    """w(λ_t)·‖x̃ − x̂_θ(x_t)‖² at t = the student's timesteps, drawn uniformly (Alg. 2);
    w = max(SNR, 1) (truncated SNR) or SNR + 1 (report eqs. 9, 10)."""

    def __init__(self, teacher: Denoiser, n_student: int, spacing: str = "trailing",
                 weighting: str = "truncated-snr", clip_x0: bool = True):
        if weighting not in PD_WEIGHTINGS:
            raise UserError(f"pd: weighting must be one of {PD_WEIGHTINGS}, got {weighting!r}")
        self.teacher, self.weighting, self.clip_x0 = teacher, weighting, clip_x0
        self.ts, self.tt = pd_timesteps(teacher.schedule, n_student, spacing)
        self.n = n_student

    def __call__(self, student: Denoiser, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        i = torch.randint(0, self.n, (x0.shape[0],), generator=g, device=g.device)
        if self.ts.device != i.device:  # once: the step tables live where the training runs
            self.ts, self.tt = self.ts.to(i.device), self.tt.to(i.device)
        t, t_mid, t_next = self.ts[i], self.tt[2 * i + 1], self.ts[i + 1]
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        xt = q_sample(student.schedule, x0, t, noise)
        # The target in fp32 even under bf16 autocast: an ε teacher's x̂₀ = (x_t − σ ε̂)/α cancels
        # catastrophically at α ≈ 0.006 with bf16's 8-bit mantissa (only the student may run in bf16).
        with torch.no_grad(), torch.autocast(xt.device.type, enabled=False):
            target = pd_target(self.teacher, xt.float(), t, t_mid, t_next, self.clip_x0).float()
        _, x_hat = student.convert(student(xt, t).float(), xt, t)
        snr = log_snr(student.schedule, t).exp().float()
        w = WEIGHTINGS[self.weighting](snr, torch.ones_like(snr), None)  # the x̂₀-space weight (leandiff.train's table)
        return (w * (x_hat - target).pow(2).flatten(1).mean(1)).mean()


class OneShotLoss:
    """Luhman & Luhman 2021: ‖x₀^teacher − x̂_θ(x_T, T−1)‖² where each training "image" holds the pair
    (x_T, teacher's DDIM output from x_T) concatenated on the channel axis."""

    def __call__(self, student: Denoiser, pair: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        c = pair.shape[1] // 2
        xT, target = pair[:, :c], pair[:, c:]
        t = torch.full((pair.shape[0],), student.schedule.T - 1, device=pair.device)
        _, x_hat = student.convert(student(xT, t).float(), xT, t)
        return F.mse_loss(x_hat, target)


def _fresh(ckpt: Checkpoint, parameterization: str | None = None) -> Checkpoint:
    """A trainable deep copy (the teacher stays untouched)."""
    net = copy.deepcopy(ckpt.net).train().requires_grad_(True)
    return Checkpoint(net=net, arch=copy.deepcopy(ckpt.arch), schedule=ckpt.schedule,
                      parameterization=parameterization or ckpt.parameterization, meta=copy.deepcopy(ckpt.meta))


def _frozen(ckpt: Checkpoint) -> Denoiser:
    ckpt.net.eval().requires_grad_(False)
    return ckpt.denoiser()


def _wall(ck: Checkpoint) -> float:
    return float((ck.meta.get("train") or {}).get("wall_seconds", 0.0))


def convert_parameterization(ckpt: Checkpoint, out_dir, *, param: str, steps: int, train: Training, dataset: str,
                             data_dir=None, seed=0, progress=None) -> Checkpoint:
    """Re-train a copy of ``ckpt`` to predict ``param`` (v or x0) on data: ``steps`` steps of the plain
    loss in the new parameterization (for v this is the SNR+1-weighted x₀ loss), at ``train``'s batch size
    and precision, lr at least 2e-4, EMA 0.995, 50 warm-up steps. See the module doc."""
    if param not in STUDENT_PARAMETERIZATIONS:
        raise UserError(f"student parameterization must be one of {STUDENT_PARAMETERIZATIONS}, got {param!r}")
    if ckpt.parameterization == param:
        return ckpt
    if steps < 1:
        raise UserError(f"the checkpoint predicts {ckpt.parameterization}; converting it to {param} needs convert_steps >= 1")
    student = _fresh(ckpt, param)
    conv = replace(train, steps=steps, lr=max(train.lr, 2e-4), ema_decay=0.995, warmup=min(50, steps),
                   schedule="cosine")
    cfg = conv.config(dataset, data_dir, param, seed)
    weighting = "plain" if param == "v" else "truncated-snr"
    return fit(cfg, out_dir, student, training_images(cfg, student), DiffusionLoss(weighting), progress)


@dataclass(frozen=True)
class _StudentConfig:
    """What ``pd`` and ``oneshot`` share: the student's parameterization, its DDIM spacing, the teacher's
    x̂₀ clipping and the length of the ε → v (or x₀) conversion before distilling."""

    param: str = "v"
    spacing: str = "trailing"
    clip: bool = True
    convert_steps: int = 400

    def _check(self, step: str) -> None:
        if self.param not in STUDENT_PARAMETERIZATIONS:
            raise UserError(f"{step}: the student must predict one of {STUDENT_PARAMETERIZATIONS}, got {self.param!r}")
        if self.spacing not in SPACINGS:
            raise UserError(f"{step}: unknown timestep spacing {self.spacing!r}; expected one of {', '.join(SPACINGS)}")
        if self.convert_steps < 0:
            raise UserError(f"{step}: convert_steps must be >= 0, got {self.convert_steps}")
        check_steps(step, self.train)

    def student(self, ckpt: Checkpoint, out_dir: Path, *, dataset, data_dir, seed, progress) -> Checkpoint:
        return convert_parameterization(ckpt, out_dir / "convert", param=self.param, steps=self.convert_steps,
                                        train=self.train, dataset=dataset, data_dir=data_dir, seed=seed,
                                        progress=progress)


_DISTILL_TRAINING = dict(lr=1e-4, ema_decay=0.999)


@dataclass(frozen=True)
class PDConfig(_StudentConfig):
    """``pd(...)``: progressive distillation, from -> to DDIM steps (``steps_per_round`` updates a round)."""

    n_from: int = field(default=256, metadata={"arg": "from"})
    to: int = 4
    weighting: str = "truncated-snr"
    train: Training = field(default_factory=lambda: Training(**_DISTILL_TRAINING),
                            metadata={"rename": {"steps": "steps_per_round"}})

    def __post_init__(self):
        n_from, n_to = self.n_from, self.to
        if n_to < 1 or n_from <= n_to or n_from % n_to or (n_from // n_to) & (n_from // n_to - 1):
            raise UserError(f"pd: from/to must be a power of two > 1 (from={n_from}, to={n_to})")
        if self.train.steps < 1:
            raise UserError(f"pd: steps_per_round must be >= 1, got {self.train.steps}")
        if self.weighting not in PD_WEIGHTINGS:
            raise UserError(f"pd: weighting must be one of {PD_WEIGHTINGS}, got {self.weighting!r}")
        self._check("pd")


def progressive_distill(ckpt: Checkpoint, out_dir, cfg: PDConfig, *, dataset: str, data_dir=None, seed=0,
                        progress=None, log=print) -> Checkpoint:
    """Salimans & Ho 2022, Alg. 2: teacher at ``cfg.n_from`` DDIM steps → student at n_from/2 → ... →
    ``cfg.to``. Each round's student starts from its teacher (round 1: from the parameterization-converted
    teacher) and writes its checkpoint to ``out_dir/round-<N>``; a killed run resumes."""
    out_dir = Path(out_dir)
    pd_timesteps(ckpt.schedule, cfg.to, cfg.spacing)  # fail before any training if the spacing is unusable
    student = cfg.student(ckpt, out_dir, dataset=dataset, data_dir=data_dir, seed=seed, progress=progress)
    record = {"from": cfg.n_from, "to": cfg.to, "param": cfg.param, "weighting": cfg.weighting,
              "spacing": cfg.spacing, "clip_x0": cfg.clip,
              "convert": {"steps": cfg.convert_steps if student is not ckpt else 0,
                          "wall_seconds": _wall(student) if student is not ckpt else 0.0},
              "rounds": []}
    steps, batch = cfg.train.steps, cfg.train.batch_size
    teacher, n = ckpt, cfg.n_from // 2
    while n >= cfg.to:
        log(f"pd round: {2 * n} -> {n} steps ({steps} steps x {batch})")
        loss = PDLoss(_frozen(teacher), n, cfg.spacing, cfg.weighting, cfg.clip)
        st = _fresh(student)
        tcfg = cfg.train.config(dataset, data_dir, st.parameterization, seed + n)
        st = fit(tcfg, out_dir / f"round-{n:04d}", st, training_images(tcfg, st), loss, progress)
        train_rec = st.meta.get("train") or {}
        record["rounds"].append({"nfe": n, "steps": steps, "batch_size": batch, "wall_seconds": _wall(st),
                                 "cpu_seconds": train_rec.get("cpu_seconds")})
        st.meta["sampler"] = {"solver": "ddim", "nfe": n, "spacing": cfg.spacing}
        st.meta["distill"] = copy.deepcopy(record)
        if rank_world()[0] == 0:  # one writer under torchrun
            # the round's student, self-describing: its lineage names the recipe that makes exactly it
            # (rounds are seeded by their NFE, so pd(..., to=n) repeats this chain and stops here)
            saved = Checkpoint(net=st.net, arch=st.arch, schedule=st.schedule, parameterization=st.parameterization,
                               meta=copy.deepcopy(st.meta))
            saved.lineage.append(round_lineage(cfg, n, ckpt.hash()))
            save_checkpoint(saved, out_dir / f"round-{n:04d}")
        teacher = student = st
        n //= 2
    student.meta["distill"]["train_seconds"] = round(record["convert"]["wall_seconds"]
                                                     + sum(r["wall_seconds"] for r in record["rounds"]), 1)
    return student


def round_lineage(cfg: PDConfig, n: int, parent: str) -> dict:
    """The lineage record of PD's round-``n`` student: the ``pd`` step with ``to=n`` (what the recipe
    records for a run that stops there), the teacher's weights hash as its parent."""
    args = values(replace(cfg, to=n))
    return {"step": "pd", "args": args, "parent": parent, "recipe": str(Step("pd", args, 0))}


def pd_step(ckpt, cfg: PDConfig, ctx):
    """Progressive distillation (Salimans & Ho 2022): halve the DDIM steps per round, from→to."""
    need_dataset(ctx, "pd")
    return progressive_distill(ckpt, ctx.step_dir, cfg, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                               progress=ctx.progress)


@dataclass(frozen=True)
class OneShotConfig(_StudentConfig):
    """``oneshot(...)``: one-shot distillation into a 1-step student."""

    teacher_nfe: int = 50
    pairs: int = 2048
    train: Training = field(default_factory=lambda: Training(**_DISTILL_TRAINING))

    def __post_init__(self):
        if self.pairs < 1 or self.teacher_nfe < 1:
            raise UserError("oneshot: pairs and teacher_nfe must be >= 1")
        self._check("oneshot")


def teacher_pairs(ckpt: Checkpoint, path: Path, n: int, solver: str, nfe: int, spacing: str, clip: bool,
                  seed: int) -> torch.Tensor:
    """``n`` pairs (x_T, the teacher's ``solver``-``nfe`` sample from x_T), x_T and the sample concatenated on
    the channel axis, on the CPU (device-free). Made once and kept in ``path`` (written atomically; a rerun
    or a resumed run reads it back)."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))["pairs"]
    teacher = _frozen(ckpt)
    ts = make_timesteps(ckpt.schedule, nfe, spacing)
    chunks, t0 = [], time.perf_counter()
    for b in range(0, n, 256):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7_777 + b)
        xT = torch.randn((min(256, n - b), *image_shape(ckpt.arch)), generator=g)
        x0 = get_solver(solver)(teacher, xT.to(device_of(teacher.net)), ts, clip_x0=clip)
        chunks.append(torch.cat([xT, x0.cpu()], dim=1))
    data = torch.cat(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"pairs": data.contiguous()}, str(tmp), metadata={"seconds": repr(time.perf_counter() - t0)})
    return data


def oneshot_distill(ckpt: Checkpoint, out_dir, cfg: OneShotConfig, *, dataset: str, data_dir=None, seed=0,
                    progress=None, init: Checkpoint | None = None) -> Checkpoint:
    """Luhman & Luhman 2021: ``cfg.pairs`` (x_T, DDIM-``teacher_nfe`` sample) pairs from the teacher, then a
    1-step student (initialised from the converted teacher, or from ``init``, e.g. a converted copy
    made already) regresses the sample from x_T."""
    out_dir = Path(out_dir)
    student = init or cfg.student(ckpt, out_dir, dataset=dataset, data_dir=data_dir, seed=seed, progress=progress)
    if student.parameterization not in STUDENT_PARAMETERIZATIONS:
        raise UserError(f"oneshot: the student must predict v or x0, got {student.parameterization}")
    data = teacher_pairs(ckpt, out_dir / "pairs.safetensors", cfg.pairs, "ddim", cfg.teacher_nfe, cfg.spacing,
                         cfg.clip, seed)
    st = _fresh(student)
    tcfg = cfg.train.config(dataset, data_dir, st.parameterization, seed)
    st = fit(tcfg, out_dir / "student", st, data, OneShotLoss(), progress)
    st.meta["sampler"] = {"solver": "ddim", "nfe": 1, "spacing": cfg.spacing}
    st.meta["distill"] = {"oneshot": {"teacher_nfe": cfg.teacher_nfe, "pairs": cfg.pairs, "steps": cfg.train.steps,
                                      "wall_seconds": _wall(st), "convert_steps": cfg.convert_steps}}
    return st


def oneshot_step(ckpt, cfg: OneShotConfig, ctx):
    """One-shot distillation (Luhman & Luhman 2021): a 1-step student regresses the teacher's DDIM samples."""
    need_dataset(ctx, "oneshot")
    return oneshot_distill(ckpt, ctx.step_dir, cfg, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                           progress=ctx.progress)
