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

from dataclasses import dataclass, field

from ..errors import UserError
from ..spec import values
from .kd import kd_loss, resolve_teacher
from .training import Training, check_kd_frac, check_steps, train_copy


@dataclass(frozen=True)
class FinetuneConfig:
    """``finetune(...)``: the training loop on the checkpoint's own data, plain or KD."""

    kd: bool = False
    kd_frac: float = 0.7
    teacher: str = ""
    weighting: str = "plain"
    x0_weight: float = 0.0
    feat_weight: float = 0.0
    train: Training = field(default_factory=lambda: Training(schedule="cosine-restarts", ema_decay=0.995))

    @property
    def uses_kd(self) -> bool:
        return bool(self.kd or self.teacher)

    def __post_init__(self):
        check_steps("finetune", self.train)
        check_kd_frac("finetune", self.kd_frac)
        try:  # the loss fields are checked by TrainConfig itself
            self.train.config("mnist", None, "eps", 0, weighting=self.weighting, x0_weight=self.x0_weight)
        except UserError as e:
            raise UserError(f"finetune: {e}") from None
        if not self.feat_weight >= 0:
            raise UserError(f"finetune: feat_weight must be >= 0, got {self.feat_weight}")
        if self.feat_weight and not self.uses_kd:
            raise UserError("finetune: feat_weight is a distillation loss: it needs kd=true (or teacher=PATH)")
        if self.uses_kd and (self.weighting != "plain" or self.x0_weight):
            raise UserError(f"finetune: weighting={self.weighting}, x0_weight={self.x0_weight} change the plain loss; "
                            "KD mixes plain MSEs (use neither with KD)")


def finetune_step(ckpt, cfg: FinetuneConfig, ctx):
    """Fine-tune with the training loop (plain loss, or KD from the pre-recipe model)."""
    if not ctx.dataset:
        raise UserError("finetune needs the training dataset: the checkpoint does not record one; pass --dataset")
    loss_fn = kd_loss(ckpt, resolve_teacher(ckpt, cfg.teacher, ctx), cfg.kd_frac, cfg.feat_weight) if cfg.uses_kd else None
    return train_copy(ckpt, ctx.step_dir, cfg.train, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                      loss_fn=loss_fn, progress=ctx.progress, record={"finetune": values(cfg)},
                      weighting=cfg.weighting, x0_weight=cfg.x0_weight)
