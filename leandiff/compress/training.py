"""The one entry of the training loop for the compression steps (finetune, kd, lowrank, lora, pd, oneshot)
and the check of their training settings: each step brings its loss (:mod:`leandiff.train`'s one loop
takes it as a callable) and calls :func:`run` (through :func:`finetune_checkpoint` or :func:`fit`)."""
from __future__ import annotations

import copy

import torch

from ..checkpoint import Checkpoint, load_checkpoint
from ..errors import UserError
from ..distributed import rank_world
from ..train import TrainConfig, train, training_images


def run(cfg: TrainConfig, out_dir, init: Checkpoint, images, loss_fn=None, progress=None,
        record: dict | None = None) -> Checkpoint:
    """The one entry of the training loop for every training step: :func:`leandiff.train.train` on ``init``
    (resumable in ``out_dir``), without the loop's own "train" lineage entry (the recipe records the step
    itself, with its arguments)."""
    out = train(cfg, out_dir, init=init, images=images, loss_fn=loss_fn, resume=True, lineage_step=record,
                progress=progress is not False)
    if out.lineage and out.lineage[-1].get("step") == "train":
        out.lineage.pop()
    return out


def fit(cfg: TrainConfig, out_dir, init: Checkpoint, images, loss_fn=None, progress=None) -> Checkpoint:
    """:func:`run`, then the checkpoint as written: a resumed, already finished run returns the saved one with
    its own training record, not the initial metadata (the distillation rounds build on it)."""
    device = next(init.net.parameters()).device  # read before training: the next round trains where this one did
    run(cfg, out_dir, init, images, loss_fn, progress)
    out = load_checkpoint(out_dir, device)
    if rank_world()[1] > 1:  # every rank has read it before rank 0 rewrites it (progressive_distill does)
        torch.distributed.barrier()
    if out.lineage and out.lineage[-1].get("step") == "train":
        out.lineage.pop()
    return out


def training_config(dataset, data_dir, steps, batch_size, lr, param, seed, *, bf16=False, ema_decay=0.999, warmup=0,
                    lr_schedule="cosine", restart_period=1000, weighting="plain", x0_weight=0.0) -> TrainConfig:
    """The TrainConfig of a training step: no sample grids, a resumable state at least every 250 steps."""
    return TrainConfig(dataset=dataset, data_dir=data_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                       lr_schedule=lr_schedule, restart_period=restart_period, ema_decay=ema_decay, bf16=bf16,
                       weighting=weighting, x0_weight=x0_weight, seed=seed, sample_every=0,
                       checkpoint_every=max(1, min(250, steps)), parameterization=param)


def finetune_checkpoint(ckpt, out_dir, *, steps: int, dataset: str, data_dir: str | None = None,
                        loss_fn=None, lr: float = 2e-4, batch_size: int = 128,
                        lr_schedule: str = "cosine-restarts", restart_period: int = 0, warmup: int = 0,
                        ema_decay: float = 0.995, bf16: bool = True, weighting: str = "plain",
                        x0_weight: float = 0.0, seed: int = 0, progress=None, record: dict | None = None):
    """Train a copy of ``ckpt`` for ``steps`` more steps on its dataset with ``loss_fn`` (default: the
    plain diffusion loss; KD steps pass :class:`leandiff.compress.kd.KDLoss`); resumable in out_dir.
    ``restart_period`` 0: half the steps."""
    ckpt = copy.copy(ckpt)  # train a copy: the input (the recipe's origin, a KD teacher) stays untouched
    ckpt.net = copy.deepcopy(ckpt.net)
    cfg = training_config(dataset, data_dir, steps, batch_size, lr, ckpt.parameterization, seed, bf16=bf16,
                          ema_decay=ema_decay, warmup=warmup, lr_schedule=lr_schedule,
                          restart_period=restart_period or max(1, steps // 2), weighting=weighting, x0_weight=x0_weight)
    return run(cfg, out_dir, ckpt, training_images(cfg, ckpt), loss_fn, progress, record)


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


def need_dataset(ctx, step: str) -> None:
    if not ctx.dataset:
        raise UserError(f"{step} needs the training dataset: the checkpoint does not record one; pass --dataset")
