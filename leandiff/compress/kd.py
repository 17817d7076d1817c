"""Knowledge distillation: the KD loss, the teacher every KD-using step shares, narrower students and the
``kd`` step.

- :class:`KDLoss`: the L-Diff mix (../shared/papers/lite-diffusion-cifar10.md §4.3)
  kd_frac·MSE(student, teacher) + (1 − kd_frac)·MSE(student, target) on one (x₀, t, ε) draw, plus
  feature KD through a pruned student's kept-channel map;
- :func:`resolve_teacher`: the frozen teacher of finetune(kd=true), kd, lowrank and lora;
- ``kd(s=1, kd_frac=0.7, steps=N)``: KD into a student whose channels are the teacher's divided by ``s``
  (L-Diff §4.3, Table 3; default 1: the checkpoint as it is, so ``prune(...) > kd(steps=N)`` is the
  paper's KD(BM, Prune(BM, p)) and ``lowrank(r=2) > kd(steps=N)`` works); a narrower student is a plain
  new ``UNet2DModel`` config (``block_out_channels`` divided by ``s``) and needs no surgery.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint
from ..denoiser import Denoiser
from ..errors import UserError
from ..models import build_network
from ..schedule import q_sample
from ..spec import values
from .training import Training, check_kd_frac, check_steps, need_dataset, train_copy


class _Features:
    """Forward hooks that keep the outputs of the named layers of one network (for the current forward)."""

    def __init__(self, net: torch.nn.Module, names):
        mods = dict(net.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: self.out.__setitem__(n, o)) for n in names]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                 kept: dict[str, list[int]]) -> torch.Tensor:
    """Mean over layers of MSE(student layer output, teacher layer output at the channels the student kept),
    each divided by the teacher output's mean square so every layer counts alike (BK-SDM's feature-level KD,
    Kim et al. 2023, with the pruned layer's own channels in place of a learnt projection)."""
    terms = []
    for name, s in student.items():
        t = teacher[name].float()
        t = t[:, kept[name]] if t.dim() == 4 else t[..., kept[name]]
        terms.append(F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


class KDLoss:
    """``kd_frac``·MSE(student, teacher) + (1 − kd_frac)·MSE(student, target) on one (x₀, t, ε) draw, plus
    ``feat_weight`` · :func:`feature_loss` over the layers in ``kept`` (a pruned student's map from its layers
    to the teacher's channels, ``meta["prune"]["kept"]``). The teacher's output is converted to the student's
    parameterization when the two differ."""

    def __init__(self, teacher: Denoiser, kd_frac: float = 0.7, feat_weight: float = 0.0,
                 kept: dict[str, list[int]] | None = None):
        if not 0.0 <= kd_frac <= 1.0:
            raise UserError(f"kd_frac must be in [0, 1], got {kd_frac}")
        self.teacher = teacher
        self.kd_frac = float(kd_frac)
        self.feat_weight = float(feat_weight)
        self.kept = kept or {}
        if self.feat_weight and not self.kept:
            raise UserError("finetune: feat_weight needs a structurally pruned student; this one's checkpoint records "
                            "none of the teacher channels its layers kept")

    def __call__(self, student: Denoiser, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, student.schedule.T, (x0.shape[0],), generator=g, device=g.device)
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        xt = q_sample(student.schedule, x0, t, noise)
        hooks = _Features(student.net, self.kept) if self.feat_weight else None
        try:
            out = student(xt, t).float()
        finally:
            if hooks:
                hooks.close()
        loss_data = F.mse_loss(out, student.target(x0, noise, t))
        if self.kd_frac == 0.0 and not self.feat_weight:
            return loss_data
        t_hooks = _Features(self.teacher.net, self.kept) if self.feat_weight else None
        try:
            with torch.no_grad():
                tout = self.teacher(xt, t).float()
        finally:
            if t_hooks:
                t_hooks.close()
        if self.teacher.parameterization != student.parameterization:
            eps, x0_hat = self.teacher.convert(tout, xt, t)
            tout = student.target(x0_hat, eps, t)
        loss = self.kd_frac * F.mse_loss(out, tout) + (1.0 - self.kd_frac) * loss_data
        if self.feat_weight:
            loss = loss + self.feat_weight * feature_loss(hooks.out, t_hooks.out, self.kept)
        return loss


def resolve_teacher(student, path: str, ctx):
    """The frozen teacher of every KD-using step (finetune, kd, lowrank, lora): the checkpoint at ``path``
    when given, else the checkpoint before the recipe's first step. When that is the student's own network
    (KD as the recipe's first step) the teacher is a frozen copy: freezing it in place would freeze the
    student too (no parameter would require grad)."""
    teacher = load_checkpoint(path, next(student.net.parameters()).device) if path else ctx.origin
    if teacher is None:
        raise UserError("KD needs a teacher: give teacher=PATH (no checkpoint before the recipe is known)")
    mine = {id(p) for p in student.net.parameters()}
    if teacher.net is student.net or any(id(p) in mine for p in teacher.net.parameters()):
        teacher = copy.copy(teacher)
        teacher.net = copy.deepcopy(student.net)
    teacher.net.eval().requires_grad_(False)
    return teacher


def feature_map(student, teacher) -> dict[str, list[int]]:
    """The pruned student's layer -> teacher channel map (empty when it records none: KDLoss says so), checked
    against the teacher's layers."""
    kept = student.meta.get("prune", {}).get("kept") or {}
    mods = dict(teacher.net.named_modules())
    for name, rows in kept.items():
        m = mods.get(name)
        width = getattr(m, "out_channels", getattr(m, "out_features", None))
        if width is None or (rows and max(rows) >= width):
            raise UserError(f"finetune: the teacher is not the network this student was pruned from (layer {name})")
    return kept


def kd_loss(student, teacher, kd_frac: float, feat_weight: float = 0.0) -> KDLoss:
    """The KD loss of ``student`` (a checkpoint) from ``teacher`` (a frozen checkpoint), with feature KD
    through the student's kept-channel map when ``feat_weight`` > 0."""
    kept = feature_map(student, teacher) if feat_weight else None
    return KDLoss(teacher.denoiser(), kd_frac, feat_weight, kept)


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


@dataclass(frozen=True)
class KDConfig:
    """``kd(...)``: knowledge distillation into a student with channels / s."""

    s: int = 1
    kd_frac: float = 0.7
    init: str = "slice"
    teacher: str = ""
    train: Training = field(default_factory=lambda: Training(lr=5e-4, schedule="cosine-restarts", ema_decay=0.995))

    def __post_init__(self):
        if self.s < 1:
            raise UserError(f"kd: s must be >= 1, got {self.s}")
        if self.init not in ("slice", "scratch"):
            raise UserError(f"kd: init must be slice or scratch, got {self.init!r}")
        check_steps("kd", self.train)
        check_kd_frac("kd", self.kd_frac)


def kd_step(ckpt, cfg: KDConfig, ctx):
    """Knowledge distillation into a student with channels / s (s=1: into this checkpoint as it is)."""
    need_dataset(ctx, "kd")
    student = ckpt
    if cfg.s > 1:
        arch = narrow_arch(ckpt.arch, cfg.s)
        torch.manual_seed(ctx.seed)
        net = build_network(arch).to(next(ckpt.net.parameters()).device)  # where the recipe computes
        if cfg.init == "slice":
            slice_init(net, ckpt.net)
        student = Checkpoint(net=net, arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                             meta=copy.deepcopy(ckpt.meta))
    return train_copy(student, ctx.step_dir, cfg.train, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                      loss_fn=kd_loss(student, resolve_teacher(student, cfg.teacher, ctx), cfg.kd_frac),
                      progress=ctx.progress, record={"kd": values(cfg)})
