"""Distillation and low-rank compression: ``kd``, ``lowrank``, ``lora``, ``pd``, ``oneshot``.

- ``kd(s=1, kd_frac=0.7, steps=N)`` — knowledge distillation into a student whose channels are
  the teacher's divided by ``s`` (default 1: the checkpoint as it is, so ``kd`` after a surgery works) (L-Diff, ../shared/papers/lite-diffusion-cifar10.md §4.3, Table 3);
  with ``s=1`` the student is the checkpoint as it is, so ``prune(...) > kd(steps=N)`` is the
  paper's KD(BM, Prune(BM, p)). Loss: :class:`leandiff.compress.finetune.KDLoss`,
  kd_frac·MSE(student, teacher) + (1 − kd_frac)·MSE(student, ε).
- ``lowrank(r=2)`` — every Conv2d / Linear weight W (out × in·k·k) is replaced by its truncated
  SVD W ≈ (U√S)(√S Vᵀ) at rank ⌊full/r⌋ (r is L-Diff §4.4's "rank proportion factor"): a k×k conv
  to ``rank`` channels followed by a 1×1 conv (a Linear pair for Linear). A layer is factorised
  only where that lowers its parameter count (a square 1×1 conv or Linear at rank n/2 does not).
  Optional fine-tune of the factors (``steps=N``, KD or plain).
- ``lora(r=2, steps=N)`` — LoRA (Hu et al. 2021): W x + (α/rank)·B A x with the base frozen and only
  A, B trained; ``merge=true`` folds B A back into W (the same size as before: LoRA is
  parameter-efficient *fine-tuning*, it shrinks nothing that ships).
- ``pd(from=256, to=4, steps_per_round=N)`` — progressive distillation (Salimans & Ho 2022, Alg. 2;
  ../shared/papers/progressive-distillation-report.md §4).
- ``oneshot(teacher_nfe=50, steps=N)`` — Luhman & Luhman 2021: a one-step student regresses the
  teacher's DDIM output x₀ from the same x_T.

Structural changes are recorded as ``arch["surgery"]`` records (kinds ``lowrank`` and ``lora``) so
the checkpoints reload from their own metadata; a narrower student is a plain new
``UNet2DModel`` config (``block_out_channels`` divided by ``s``) and needs no surgery.

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
from dataclasses import dataclass, field
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint
from ..denoiser import Denoiser
from ..errors import UserError
from ..surgery.factor import LoRA, factor_pair
from ..surgery.modules import set_module
from ..spec import values
from ..schedule import SPACINGS, alpha_sigma, log_snr, q_sample, timesteps as make_timesteps
from ..train import DiffusionLoss, TrainConfig, _rank_world, train, training_images
from .ddim import coef, ddim_to
from .finetune import KDLoss, check_training, finetune_checkpoint, resolve_teacher

PD_WEIGHTINGS = ("truncated-snr", "snr+1")  # Salimans & Ho 2022, §4 (report eqs. 9 and 10)
STUDENT_PARAMETERIZATIONS = ("v", "x0")


def _full_rank(m: nn.Module) -> int:
    """Rank of the weight as a matrix out × (in·k·k)."""
    w = m.weight
    return min(w.shape[0], w[0].numel())


def _factorable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


# --- low-rank factorisation (L-Diff §4.4) ----------------------------------------------------------------------------

def _pair_params(m: nn.Module, rank: int) -> int:
    k = m.weight[0].numel()  # in·kh·kw
    return rank * (k + m.weight.shape[0])


@torch.no_grad()
def svd_factor(m: nn.Module, rank: int) -> nn.Sequential:
    """Truncated SVD W ≈ (U_r √S_r)(√S_r V_rᵀ) of a Conv2d/Linear as two layers (Eckart–Young:
    the best rank-r approximation in Frobenius norm); at full rank it reproduces ``m`` exactly."""
    pair = factor_pair(m, rank)
    w = m.weight.detach().double()
    u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).to(m.weight.dtype)  # rank × (in·k·k)
    b = (u[:, :rank] * root[None, :]).to(m.weight.dtype)  # out × rank
    pair[0].weight.copy_(a.reshape(pair[0].weight.shape))
    pair[1].weight.copy_(b.reshape(pair[1].weight.shape))
    if m.bias is not None:
        pair[1].bias.copy_(m.bias)
    return pair


def _check_rank(step: str, r: float, rank: int) -> None:
    if r < 1:
        raise UserError(f"{step}: the rank proportion factor r must be >= 1, got {r}")
    if rank < 0:
        raise UserError(f"{step}: rank must be >= 0 (0: full/r), got {rank}")


def lowrank_factorize(net: nn.Module, r: float = 2.0, *, rank: int = 0, only_if_smaller: bool = True,
                      skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Replace every Conv2d/Linear of ``net`` (in place) by its SVD factors at rank max(1, ⌊full/r⌋)
    (or ``rank`` when given, capped at full); returns {layer name: rank} of the layers replaced.
    With ``only_if_smaller`` a layer whose factors would hold as many parameters as it does is kept."""
    _check_rank("lowrank", r, rank)
    ranks = {}
    for name, m in list(net.named_modules()):
        if not name or not _factorable(m) or any(name.startswith(s) for s in skip):
            continue
        full = _full_rank(m)
        k = min(full, rank) if rank else max(1, int(full // r))
        if only_if_smaller and _pair_params(m, k) >= m.weight.numel():
            continue
        set_module(net, name, svd_factor(m, k))
        ranks[name] = k
    return ranks


# --- LoRA (Hu et al. 2021; L-Diff §4.4) -----------------------------------------------------------------------------

def add_lora(net: nn.Module, r: float = 2.0, *, rank: int = 0, alpha: float = 0.0) -> dict[str, int]:
    """Wrap every Conv2d/Linear in a :class:`LoRA` adapter of rank max(1, ⌊full/r⌋) (or ``rank``);
    freeze everything but the adapters. ``alpha`` > 0 sets scale = alpha/rank (Hu et al.), else 1."""
    _check_rank("lora", r, rank)
    ranks = {}
    for name, m in list(net.named_modules()):
        if not name or not _factorable(m):
            continue
        full = _full_rank(m)
        k = min(full, rank) if rank else max(1, int(full // r))
        set_module(net, name, LoRA(m, k, alpha / k if alpha > 0 else 1.0))
        ranks[name] = k
    for n, p in net.named_parameters():
        p.requires_grad_(".down." in f".{n}" or ".up." in f".{n}")
    return ranks


def merge_lora(net: nn.Module) -> nn.Module:
    for name, m in list(net.named_modules()):
        if isinstance(m, LoRA):
            set_module(net, name, m.merged())
    return net


# --- narrower students (L-Diff §4.3) ---------------------------------------------------------------------------------

def narrow_arch(arch: dict, s: int) -> dict:
    """The teacher's UNet2DModel config with ``block_out_channels`` divided by ``s``; the GroupNorm
    group count becomes the largest divisor of the teacher's that divides every new width."""
    if arch.get("surgery"):
        raise UserError("kd: s > 1 builds a fresh narrower config, but this checkpoint's architecture has "
                        "surgery records (pruned/factorised); use s=1 to distil into it as it is")
    cfg = copy.deepcopy(arch["config"])
    chans = list(cfg["block_out_channels"])
    if any(c % s for c in chans):
        raise UserError(f"kd: s={s} does not divide the channel widths {chans}")
    new = [c // s for c in chans]
    g0 = int(cfg.get("norm_num_groups", 32))
    cfg["norm_num_groups"] = max(g for g in range(1, g0 + 1) if g0 % g == 0 and all(c % g == 0 for c in new))
    cfg["block_out_channels"] = new
    return {**copy.deepcopy(arch), "config": cfg}


@torch.no_grad()
def slice_init(student: nn.Module, teacher: nn.Module) -> None:
    """Start a narrower student from the teacher's leading slices (every tensor ``W[:c_out, :c_in, ...]``).
    Consistent along plain chains of layers; at the UNet's skip concatenations the sliced input
    channels come from the first operand only, so this is a warm start, not a sub-network."""
    t_state = teacher.state_dict()
    for k, v in student.state_dict().items():
        t = t_state.get(k)
        if t is None or t.ndim != v.ndim:
            continue
        v.copy_(t[tuple(slice(0, n) for n in v.shape)])


# --- progressive distillation (Salimans & Ho 2022) ------------------------------------------------------------------

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


def _snr_weight(schedule, t: torch.Tensor, weighting: str) -> torch.Tensor:
    snr = log_snr(schedule, t).exp().float()
    return snr.clamp(min=1.0) if weighting == "truncated-snr" else snr + 1


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
        i = torch.randint(0, self.n, (x0.shape[0],), generator=g)
        t, t_mid, t_next = self.ts[i], self.tt[2 * i + 1], self.ts[i + 1]
        noise = torch.randn(x0.shape, generator=g)
        xt = q_sample(student.schedule, x0, t, noise)
        # The target in fp32 even under bf16 autocast: an ε teacher's x̂₀ = (x_t − σ ε̂)/α cancels
        # catastrophically at α ≈ 0.006 with bf16's 8-bit mantissa (only the student may run in bf16).
        with torch.no_grad(), torch.autocast(xt.device.type, enabled=False):
            target = pd_target(self.teacher, xt.float(), t, t_mid, t_next, self.clip_x0).float()
        _, x_hat = student.convert(student(xt, t).float(), xt, t)
        w = _snr_weight(student.schedule, t, self.weighting)
        return (w * (x_hat - target).pow(2).flatten(1).mean(1)).mean()


class OneShotLoss:
    """Luhman & Luhman 2021: ‖x₀^teacher − x̂_θ(x_T, T−1)‖² where each training "image" holds the pair
    (x_T, teacher's DDIM output from x_T) concatenated on the channel axis."""

    def __call__(self, student: Denoiser, pair: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        c = pair.shape[1] // 2
        xT, target = pair[:, :c], pair[:, c:]
        t = torch.full((pair.shape[0],), student.schedule.T - 1)
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


def _cfg(dataset, data_dir, steps, batch_size, lr, param, seed, bf16=False, ema_decay=0.999, warmup=0,
         lr_schedule="cosine", weighting="plain") -> TrainConfig:
    return TrainConfig(dataset=dataset, data_dir=data_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                       lr_schedule=lr_schedule, ema_decay=ema_decay, bf16=bf16, seed=seed, sample_every=0,
                       checkpoint_every=max(1, min(250, steps)), parameterization=param, weighting=weighting)


def _train(cfg: TrainConfig, out_dir, init: Checkpoint, images, loss_fn, progress) -> Checkpoint:
    """The training loop, then the checkpoint as written (a resumed, already finished run returns the
    saved one with its own training record, not the initial metadata); the recipe records the step."""
    from ..checkpoint import load_checkpoint

    train(cfg, out_dir, init=init, images=images, loss_fn=loss_fn, resume=True, progress=progress is not False)
    out = load_checkpoint(out_dir)
    if _rank_world()[1] > 1:  # every rank has read it before rank 0 rewrites it (progressive_distill does)
        torch.distributed.barrier()
    if out.lineage and out.lineage[-1].get("step") == "train":
        out.lineage.pop()
    return out


def _wall(ck: Checkpoint) -> float:
    return float((ck.meta.get("train") or {}).get("wall_seconds", 0.0))


def convert_parameterization(ckpt: Checkpoint, out_dir, *, param: str, steps: int, dataset: str,
                             data_dir=None, batch_size=128, lr=2e-4, seed=0, bf16=False, progress=None) -> Checkpoint:
    """Re-train a copy of ``ckpt`` to predict ``param`` (v or x0) on data: ``steps`` steps of the plain
    loss in the new parameterization (for v this is the SNR+1-weighted x₀ loss). See the module doc."""
    if param not in STUDENT_PARAMETERIZATIONS:
        raise UserError(f"student parameterization must be one of {STUDENT_PARAMETERIZATIONS}, got {param!r}")
    if ckpt.parameterization == param:
        return ckpt
    if steps < 1:
        raise UserError(f"the checkpoint predicts {ckpt.parameterization}; converting it to {param} needs convert_steps >= 1")
    student = _fresh(ckpt, param)
    cfg = _cfg(dataset, data_dir, steps, batch_size, lr, param, seed, bf16, ema_decay=0.995, warmup=min(50, steps))
    weighting = "plain" if param == "v" else "truncated-snr"
    return _train(cfg, out_dir, student, training_images(cfg, student), DiffusionLoss(weighting), progress)


def _check_student(step: str, param: str, spacing: str, convert_steps: int) -> None:
    if param not in STUDENT_PARAMETERIZATIONS:
        raise UserError(f"{step}: the student must predict one of {STUDENT_PARAMETERIZATIONS}, got {param!r}")
    if spacing not in SPACINGS:
        raise UserError(f"{step}: unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    if convert_steps < 0:
        raise UserError(f"{step}: convert_steps must be >= 0, got {convert_steps}")


def _check_pd(n_from: int, n_to: int, steps_per_round: int, weighting: str) -> None:
    if n_to < 1 or n_from <= n_to or n_from % n_to or (n_from // n_to) & (n_from // n_to - 1):
        raise UserError(f"pd: from/to must be a power of two > 1 (from={n_from}, to={n_to})")
    if steps_per_round < 1:
        raise UserError(f"pd: steps_per_round must be >= 1, got {steps_per_round}")
    if weighting not in PD_WEIGHTINGS:
        raise UserError(f"pd: weighting must be one of {PD_WEIGHTINGS}, got {weighting!r}")


def progressive_distill(ckpt: Checkpoint, out_dir, *, n_from: int, n_to: int, steps_per_round: int, dataset: str,
                        data_dir=None, param="v", weighting="truncated-snr", spacing="trailing", clip_x0=True,
                        convert_steps=400, batch_size=128, lr=1e-4, ema_decay=0.999, bf16=False, seed=0,
                        progress=None, log=print) -> Checkpoint:
    """Salimans & Ho 2022, Alg. 2: teacher at ``n_from`` DDIM steps → student at n_from/2 → ... → ``n_to``.
    Each round's student starts from its teacher (round 1: from the parameterization-converted
    teacher) and writes its checkpoint to ``out_dir/round-<N>``; a killed run resumes."""
    _check_pd(n_from, n_to, steps_per_round, weighting)
    out_dir = Path(out_dir)
    pd_timesteps(ckpt.schedule, n_to, spacing)  # fail before any training if the spacing is unusable
    student = convert_parameterization(ckpt, out_dir / "convert", param=param, steps=convert_steps, dataset=dataset,
                                       data_dir=data_dir, batch_size=batch_size, lr=max(lr, 2e-4), seed=seed,
                                       bf16=bf16, progress=progress)
    record = {"from": n_from, "to": n_to, "param": param, "weighting": weighting, "spacing": spacing,
              "clip_x0": clip_x0, "convert": {"steps": convert_steps if student is not ckpt else 0,
                                              "wall_seconds": _wall(student) if student is not ckpt else 0.0},
              "rounds": []}
    teacher, n = ckpt, n_from // 2
    while n >= n_to:
        log(f"pd round: {2 * n} -> {n} steps ({steps_per_round} steps x {batch_size})")
        loss = PDLoss(_frozen(teacher), n, spacing, weighting, clip_x0)
        st = _fresh(student)
        cfg = _cfg(dataset, data_dir, steps_per_round, batch_size, lr, st.parameterization, seed + n, bf16,
                   ema_decay=ema_decay)
        st = _train(cfg, out_dir / f"round-{n:04d}", st, training_images(cfg, st), loss, progress)
        record["rounds"].append({"nfe": n, "steps": steps_per_round, "batch_size": batch_size,
                                 "wall_seconds": _wall(st)})
        st.meta["sampler"] = {"solver": "ddim", "nfe": n, "spacing": spacing}
        st.meta["distill"] = copy.deepcopy(record)
        from ..checkpoint import save_checkpoint

        if _rank_world()[0] == 0:  # one writer under torchrun
            save_checkpoint(st, out_dir / f"round-{n:04d}")  # the round's student, self-describing
        teacher = student = st
        n //= 2
    student.meta["distill"]["train_seconds"] = round(record["convert"]["wall_seconds"]
                                                     + sum(r["wall_seconds"] for r in record["rounds"]), 1)
    return student


def _check_oneshot(pairs: int, steps: int, teacher_nfe: int) -> None:
    if pairs < 1 or steps < 1 or teacher_nfe < 1:
        raise UserError("oneshot: pairs, steps and teacher_nfe must be >= 1")


def oneshot_distill(ckpt: Checkpoint, out_dir, *, teacher_nfe: int, steps: int, dataset: str, data_dir=None,
                    pairs=2048, param="v", spacing="trailing", clip_x0=True, convert_steps=400, batch_size=128,
                    lr=1e-4, ema_decay=0.999, bf16=False, seed=0, progress=None,
                    init: Checkpoint | None = None) -> Checkpoint:
    """Luhman & Luhman 2021: ``pairs`` (x_T, DDIM-``teacher_nfe`` sample) pairs from the teacher, then a
    1-step student (initialised from the converted teacher, or from ``init``, e.g. a converted copy
    made already) regresses the sample from x_T."""
    from ..models import image_shape
    from ..solvers import get_solver

    _check_oneshot(pairs, steps, teacher_nfe)
    out_dir = Path(out_dir)
    student = init or convert_parameterization(ckpt, out_dir / "convert", param=param, steps=convert_steps,
                                               dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                                               lr=max(lr, 2e-4), seed=seed, bf16=bf16, progress=progress)
    if student.parameterization not in STUDENT_PARAMETERIZATIONS:
        raise UserError(f"oneshot: the student must predict v or x0, got {student.parameterization}")
    shape = image_shape(ckpt.arch)
    pairs_path = out_dir / "pairs.safetensors"
    if pairs_path.is_file():
        from safetensors.torch import load_file
        data = load_file(str(pairs_path))["pairs"]
    else:
        import time

        from safetensors.torch import save_file
        from ..io import atomic_path

        teacher = _frozen(ckpt)
        ts = make_timesteps(ckpt.schedule, teacher_nfe, spacing)
        chunks, t0 = [], time.perf_counter()
        for b in range(0, pairs, 256):
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7_777 + b)
            xT = torch.randn((min(256, pairs - b), *shape), generator=g)
            x0 = get_solver("ddim")(teacher, xT, ts, clip_x0=clip_x0)
            chunks.append(torch.cat([xT, x0], dim=1))
        data = torch.cat(chunks)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(pairs_path) as tmp:
            save_file({"pairs": data.contiguous()}, str(tmp), metadata={"seconds": repr(time.perf_counter() - t0)})
    st = _fresh(student)
    cfg = _cfg(dataset, data_dir, steps, batch_size, lr, st.parameterization, seed, bf16, ema_decay=ema_decay)
    st = _train(cfg, out_dir / "student", st, data, OneShotLoss(), progress)
    st.meta["sampler"] = {"solver": "ddim", "nfe": 1, "spacing": spacing}
    st.meta["distill"] = {"oneshot": {"teacher_nfe": teacher_nfe, "pairs": pairs, "steps": steps,
                                      "wall_seconds": _wall(st), "convert_steps": convert_steps}}
    return st


# --- recipe steps ---------------------------------------------------------------------------------------------------

def _need_dataset(ctx, step: str) -> None:
    if not ctx.dataset:
        raise UserError(f"{step} needs the training dataset: the checkpoint does not record one; pass --dataset")


# Each step's validator runs when the recipe is parsed: a bad value in the last step fails before the first runs.

def _check_kd(args: dict) -> None:
    if args["s"] < 1:
        raise UserError(f"kd: s must be >= 1, got {args['s']}")
    if args["init"] not in ("slice", "scratch"):
        raise UserError(f"kd: init must be slice or scratch, got {args['init']!r}")
    check_training("kd", args["steps"], kd_frac=args["kd_frac"], lr=args["lr"], batch_size=args["batch_size"],
                   lr_schedule=args["schedule"], ema_decay=args["ema_decay"])


def _check_lowrank(args: dict) -> None:
    _check_rank("lowrank", args["r"], args["rank"])
    if args["steps"] < 0:
        raise UserError(f"lowrank: steps must be >= 0 (0: no fine-tune), got {args['steps']}")
    if args["steps"] > 0:
        check_training("lowrank", args["steps"], kd_frac=args["kd_frac"], lr=args["lr"], batch_size=args["batch_size"])


def _check_lora(args: dict) -> None:
    _check_rank("lora", args["r"], args["rank"])
    if args["alpha"] < 0:
        raise UserError(f"lora: alpha must be >= 0 (0: scale 1), got {args['alpha']}")
    check_training("lora", args["steps"], kd_frac=args["kd_frac"], lr=args["lr"], batch_size=args["batch_size"])


def _check_pd_args(args: dict) -> None:
    _check_pd(args["from"], args["to"], args["steps_per_round"], args["weighting"])
    _check_student("pd", args["param"], args["spacing"], args["convert_steps"])
    check_training("pd", args["steps_per_round"], lr=args["lr"], batch_size=args["batch_size"],
                   ema_decay=args["ema_decay"])


def _check_oneshot_args(args: dict) -> None:
    _check_oneshot(args["pairs"], args["steps"], args["teacher_nfe"])
    _check_student("oneshot", args["param"], args["spacing"], args["convert_steps"])
    check_training("oneshot", args["steps"], lr=args["lr"], batch_size=args["batch_size"], ema_decay=args["ema_decay"])


@dataclass(frozen=True)
class KDConfig:
    """``kd(...)``: knowledge distillation into a student with channels / s."""

    s: int = 1
    kd_frac: float = 0.7
    steps: int = 1000
    init: str = "slice"
    teacher: str = ""
    lr: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine-restarts"
    ema_decay: float = 0.995
    bf16: bool = True

    def __post_init__(self):
        _check_kd(values(self))


def kd_step(ckpt, cfg: KDConfig, ctx):
    """Knowledge distillation into a student with channels / s (s=1: into this checkpoint as it is)."""
    args = values(cfg)
    _need_dataset(ctx, "kd")
    _check_kd(args)
    s = args["s"]
    student = ckpt
    if s > 1:
        from ..models import build_network

        arch = narrow_arch(ckpt.arch, s)
        torch.manual_seed(ctx.seed)
        net = build_network(arch)
        if args["init"] == "slice":
            slice_init(net, ckpt.net)
        student = Checkpoint(net=net, arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                             meta=copy.deepcopy(ckpt.meta))
    return finetune_checkpoint(student, ctx.step_dir, steps=args["steps"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                               teacher=resolve_teacher(student, args["teacher"], ctx), kd_frac=args["kd_frac"], lr=args["lr"], batch_size=args["batch_size"],
                               lr_schedule=args["schedule"], ema_decay=args["ema_decay"], bf16=args["bf16"],
                               seed=ctx.seed, progress=ctx.progress, record={"kd": args})


@dataclass(frozen=True)
class LowRankConfig:
    """``lowrank(...)``: SVD factors at rank full/r, optionally fine-tuned."""

    r: float = 2.0
    rank: int = 0
    steps: int = 0
    kd: bool = True
    kd_frac: float = 0.7
    lr: float = 2e-4
    batch_size: int = 128
    bf16: bool = True

    def __post_init__(self):
        _check_lowrank(values(self))


def lowrank_step(ckpt, cfg: LowRankConfig, ctx):
    """SVD-factorise Conv2d/Linear weights to rank full/r (L-Diff §4.4); optionally fine-tune the factors."""
    args = values(cfg)
    net = copy.deepcopy(ckpt.net)
    ranks = lowrank_factorize(net, args["r"], rank=args["rank"])
    if not ranks:
        raise UserError(f"lowrank: no layer gets smaller at r={args['r']:g}; use a larger r")
    arch = copy.deepcopy(ckpt.arch)
    arch.setdefault("surgery", []).append({"kind": "lowrank", "r": args["r"], "layers": ranks})
    out = Checkpoint(net=net.eval(), arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                     meta=copy.deepcopy(ckpt.meta))
    if args["steps"] > 0:
        _need_dataset(ctx, "lowrank")
        out = finetune_checkpoint(out, ctx.step_dir, steps=args["steps"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                                  teacher=resolve_teacher(out, "", ctx) if args["kd"] else None, kd_frac=args["kd_frac"],
                                  lr=args["lr"], batch_size=args["batch_size"], bf16=args["bf16"], seed=ctx.seed,
                                  progress=ctx.progress, record={"lowrank": args})
    return out


@dataclass(frozen=True)
class LoRAConfig:
    """``lora(...)``: LoRA adapters trained with the base frozen."""

    r: float = 2.0
    rank: int = 0
    alpha: float = 0.0
    steps: int = 1000
    kd: bool = True
    kd_frac: float = 0.7
    lr: float = 1e-3
    batch_size: int = 128
    merge: bool = True
    bf16: bool = True

    def __post_init__(self):
        _check_lora(values(self))


def lora_step(ckpt, cfg: LoRAConfig, ctx):
    """LoRA adapters (rank full/r) fine-tuned with the base frozen; merge=true folds them back in."""
    args = values(cfg)
    _need_dataset(ctx, "lora")
    net = copy.deepcopy(ckpt.net)
    ranks = add_lora(net, args["r"], rank=args["rank"], alpha=args["alpha"])
    arch = copy.deepcopy(ckpt.arch)
    scales = {n: m.scale for n, m in net.named_modules() if isinstance(m, LoRA)}
    arch.setdefault("surgery", []).append({"kind": "lora", "r": args["r"], "layers": ranks, "scales": scales})
    st = Checkpoint(net=net, arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                    meta=copy.deepcopy(ckpt.meta))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = finetune_checkpoint(st, ctx.step_dir, steps=args["steps"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                              teacher=resolve_teacher(st, "", ctx) if args["kd"] else None, kd_frac=args["kd_frac"],
                              lr=args["lr"], batch_size=args["batch_size"], bf16=args["bf16"], seed=ctx.seed,
                              progress=ctx.progress, record={"lora": args})
    out.meta["lora"] = {"trainable_params": trainable, "merged": args["merge"]}
    if args["merge"]:
        out.net = merge_lora(out.net)
        out.arch = copy.deepcopy(ckpt.arch)
    return out


@dataclass(frozen=True)
class PDConfig:
    """``pd(...)``: progressive distillation, from -> to DDIM steps."""

    n_from: int = field(default=256, metadata={"arg": "from"})
    to: int = 4
    steps_per_round: int = 1000
    param: str = "v"
    weighting: str = "truncated-snr"
    spacing: str = "trailing"
    clip: bool = True
    convert_steps: int = 400
    lr: float = 1e-4
    batch_size: int = 128
    ema_decay: float = 0.999
    bf16: bool = False

    def __post_init__(self):
        _check_pd_args(values(self))


def pd_step(ckpt, cfg: PDConfig, ctx):
    """Progressive distillation (Salimans & Ho 2022): halve the DDIM steps per round, from→to."""
    args = values(cfg)
    _need_dataset(ctx, "pd")
    return progressive_distill(ckpt, ctx.step_dir, n_from=args["from"], n_to=args["to"],
                               steps_per_round=args["steps_per_round"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                               param=args["param"], weighting=args["weighting"], spacing=args["spacing"],
                               clip_x0=args["clip"], convert_steps=args["convert_steps"], batch_size=args["batch_size"],
                               lr=args["lr"], ema_decay=args["ema_decay"], bf16=args["bf16"], seed=ctx.seed,
                               progress=ctx.progress)


@dataclass(frozen=True)
class OneShotConfig:
    """``oneshot(...)``: one-shot distillation into a 1-step student."""

    teacher_nfe: int = 50
    steps: int = 1000
    pairs: int = 2048
    param: str = "v"
    spacing: str = "trailing"
    clip: bool = True
    convert_steps: int = 400
    lr: float = 1e-4
    batch_size: int = 128
    ema_decay: float = 0.999
    bf16: bool = False

    def __post_init__(self):
        _check_oneshot_args(values(self))


def oneshot_step(ckpt, cfg: OneShotConfig, ctx):
    """One-shot distillation (Luhman & Luhman 2021): a 1-step student regresses the teacher's DDIM samples."""
    args = values(cfg)
    _need_dataset(ctx, "oneshot")
    return oneshot_distill(ckpt, ctx.step_dir, teacher_nfe=args["teacher_nfe"], steps=args["steps"],
                           dataset=ctx.dataset, data_dir=ctx.data_dir, pairs=args["pairs"], param=args["param"],
                           spacing=args["spacing"], clip_x0=args["clip"], convert_steps=args["convert_steps"],
                           batch_size=args["batch_size"], lr=args["lr"], ema_decay=args["ema_decay"],
                           bf16=args["bf16"], seed=ctx.seed, progress=ctx.progress)
