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

from dataclasses import dataclass

from ..errors import UserError
from ..spec import values
from .kd import kd_loss, resolve_teacher
from .training import check_training, finetune_checkpoint


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
    loss_fn = None
    if args["kd"] or args["teacher"]:
        loss_fn = kd_loss(ckpt, resolve_teacher(ckpt, args["teacher"], ctx), args["kd_frac"], args["feat_weight"])
    return finetune_checkpoint(ckpt, ctx.step_dir, steps=args["steps"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                               loss_fn=loss_fn, lr=args["lr"],
                               batch_size=args["batch_size"], lr_schedule=args["schedule"],
                               restart_period=args["restart_period"], warmup=args["warmup"],
                               ema_decay=args["ema_decay"], bf16=args["bf16"], weighting=args["weighting"],
                               x0_weight=args["x0_weight"], seed=ctx.seed,
                               progress=ctx.progress, record={"finetune": args})
