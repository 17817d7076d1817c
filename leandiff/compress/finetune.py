"""``finetune(steps=N[, kd=true, kd_frac=0.7, ...])``: recover quality after compression.

The training loop of :mod:`leandiff.train` on the checkpoint's own dataset, resumable (a killed
``compress`` continues the fine-tune from its last saved state). With ``kd=true`` the loss is the
knowledge-distillation mix of the L-Diff paper (../shared/papers/lite-diffusion-cifar10.md §4.3)::

    L = kd_frac · MSE(student(x_t, t), teacher(x_t, t)) + (1 − kd_frac) · MSE(student(x_t, t), target)

on the same (x₀, t, ε) draw, where the teacher is the checkpoint as it was before the recipe's first
step (or ``teacher=PATH``) and the target is the student's usual one (ε, v or x₀). The default
optimiser schedule is AdamW with cosine warm restarts (SGDR), as the L-Diff paper fine-tunes.
``weighting=snr+1|truncated-snr`` trains with the progressive-distillation report's x₀-space weightings
instead of the plain MSE, and ``x0_weight=λ`` adds λ·‖x̂₀ − x₀‖² to it (for an ε-model λ/SNR·‖ε̂ − ε‖²):
both move the effort to the high-noise steps, where a pruned network's ε error is largest relative to
the base's. Measured on pruned mnist-tiny, both made FID-dom worse (docs/pruning.md).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..errors import UserError
from ..spec import values
from ..schedule import q_sample
from ..train import TrainConfig, train, training_images


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
        t = torch.randint(0, student.schedule.T, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
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


def finetune_checkpoint(ckpt, out_dir, *, steps: int, dataset: str, data_dir: str | None = None,
                        teacher=None, kd_frac: float = 0.7, lr: float = 2e-4, batch_size: int = 128,
                        lr_schedule: str = "cosine-restarts", restart_period: int = 0, warmup: int = 0,
                        ema_decay: float = 0.995, bf16: bool = True, weighting: str = "plain",
                        x0_weight: float = 0.0, feat_weight: float = 0.0, seed: int = 0, progress=None,
                        record: dict | None = None):
    """Train ``ckpt`` for ``steps`` more steps (KD from ``teacher`` when given, with feature KD when
    ``feat_weight`` > 0); resumable in out_dir."""
    _check_loss(steps, weighting, x0_weight, kd=teacher is not None, feat_weight=feat_weight)
    ckpt = copy.copy(ckpt)  # train a copy: the input (the recipe's origin, a KD teacher) stays untouched
    ckpt.net = copy.deepcopy(ckpt.net)
    cfg = TrainConfig(dataset=dataset, data_dir=data_dir, steps=steps, batch_size=batch_size, lr=lr,
                      warmup=warmup, lr_schedule=lr_schedule, restart_period=restart_period or max(1, steps // 2),
                      ema_decay=ema_decay, bf16=bf16, weighting=weighting, x0_weight=x0_weight, seed=seed, sample_every=0,
                      checkpoint_every=max(1, min(250, steps)), parameterization=ckpt.parameterization)
    images = training_images(cfg, ckpt)
    kept = _feature_map(ckpt, teacher) if feat_weight else None
    loss_fn = KDLoss(teacher.denoiser(), kd_frac, feat_weight, kept) if teacher is not None else None
    out = train(cfg, out_dir, init=ckpt, images=images, loss_fn=loss_fn, resume=True,
                lineage_step=record, progress=progress is not False)
    if record is not None and out.lineage and out.lineage[-1].get("step") == "train":
        out.lineage.pop()  # the recipe records this step itself, with its arguments
    return out


def check_training(step: str, steps: int, *, kd_frac: float | None = None, **settings) -> None:
    """A training step's settings (``steps`` and any TrainConfig field: lr, batch_size, ema_decay,
    lr_schedule, weighting, ...) checked by TrainConfig itself, and ``kd_frac``'s range: recipe steps
    call this when the recipe is parsed, so a bad value fails before any step runs."""
    if steps < 1:
        raise UserError(f"{step} needs steps >= 1, got {steps}")
    try:
        TrainConfig(steps=steps, **settings)
    except UserError as e:
        raise UserError(f"{step}: {e}") from None
    if kd_frac is not None and not 0.0 <= kd_frac <= 1.0:
        raise UserError(f"{step}: kd_frac must be in [0, 1], got {kd_frac}")


def resolve_teacher(student, path: str, ctx):
    """The frozen teacher of every KD-using step (finetune, kd, lowrank, lora): the checkpoint at ``path``
    when given, else the checkpoint before the recipe's first step. When that is the student's own network
    (KD as the recipe's first step) the teacher is a frozen copy: freezing it in place would freeze the
    student too (no parameter would require grad)."""
    from ..checkpoint import load_checkpoint

    teacher = load_checkpoint(path) if path else ctx.origin
    if teacher is None:
        raise UserError("KD needs a teacher: give teacher=PATH (no checkpoint before the recipe is known)")
    mine = {id(p) for p in student.net.parameters()}
    if teacher.net is student.net or any(id(p) in mine for p in teacher.net.parameters()):
        teacher = copy.copy(teacher)
        teacher.net = copy.deepcopy(student.net)
    teacher.net.eval().requires_grad_(False)
    return teacher


def _feature_map(student, teacher) -> dict[str, list[int]]:
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


def _check_loss(steps: int, weighting: str, x0_weight: float, kd: bool, feat_weight: float = 0.0, **settings) -> None:
    """The fine-tune's length, loss and other training settings; also checked when a recipe is parsed."""
    check_training("finetune", steps, weighting=weighting, x0_weight=x0_weight, **settings)
    if not feat_weight >= 0:
        raise UserError(f"finetune: feat_weight must be >= 0, got {feat_weight}")
    if feat_weight and not kd:
        raise UserError("finetune: feat_weight is a distillation loss: it needs kd=true (or teacher=PATH)")
    if kd and (weighting != "plain" or x0_weight):
        raise UserError(f"finetune: weighting={weighting}, x0_weight={x0_weight} change the plain loss; "
                        "KD mixes plain MSEs (use neither with KD)")


def _check_args(args: dict) -> None:
    # restart_period 0 means "half the steps" (finetune_checkpoint), so it is checked as 1
    _check_loss(args["steps"], args["weighting"], args["x0_weight"], kd=bool(args["kd"] or args["teacher"]),
                feat_weight=args["feat_weight"], kd_frac=args["kd_frac"], lr=args["lr"], batch_size=args["batch_size"],
                lr_schedule=args["schedule"], ema_decay=args["ema_decay"], warmup=args["warmup"], restart_period=args["restart_period"] or 1)


@dataclass(frozen=True)
class FinetuneConfig:
    """``finetune(...)``: the training loop on the checkpoint's own data, plain or KD."""

    steps: int = 1000
    kd: bool = False
    kd_frac: float = 0.7
    teacher: str = ""
    lr: float = 2e-4
    batch_size: int = 128
    schedule: str = "cosine-restarts"
    restart_period: int = 0
    warmup: int = 0
    ema_decay: float = 0.995
    bf16: bool = True
    weighting: str = "plain"
    x0_weight: float = 0.0
    feat_weight: float = 0.0

    def __post_init__(self):
        _check_args(values(self))


def finetune_step(ckpt, cfg: FinetuneConfig, ctx):
    """Fine-tune with the training loop (plain loss, or KD from the pre-recipe model)."""
    args = values(cfg)
    if not ctx.dataset:
        raise UserError("finetune needs the training dataset: the checkpoint does not record one; pass --dataset")
    teacher = resolve_teacher(ckpt, args["teacher"], ctx) if args["kd"] or args["teacher"] else None
    return finetune_checkpoint(ckpt, ctx.step_dir, steps=args["steps"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                               teacher=teacher, kd_frac=args["kd_frac"], lr=args["lr"],
                               batch_size=args["batch_size"], lr_schedule=args["schedule"],
                               restart_period=args["restart_period"], warmup=args["warmup"],
                               ema_decay=args["ema_decay"], bf16=args["bf16"], weighting=args["weighting"],
                               x0_weight=args["x0_weight"], feat_weight=args["feat_weight"], seed=ctx.seed,
                               progress=ctx.progress, record={"finetune": args})
