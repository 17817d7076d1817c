"""The one entry of the training loop for the compression steps (finetune, kd, lowrank, lora, pd, oneshot, cd, dmd)
and the check of their training settings: each step brings its loss (:mod:`leandiff.train`'s one loop
takes it as a callable) and calls :func:`run` (through :func:`train_copy` or :func:`fit`) with the
settings of one :class:`Training`."""
from __future__ import annotations

import copy
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Training:
    """The training settings of every training step (finetune, kd, lowrank, lora, pd, oneshot, cd, dmd), nested in
    its config and flat in the recipe: ``kd(s=2,steps=400,lr=1e-3)``. Each step states its own defaults as a
    ``Training(...)`` default of its ``train`` field; what is not stated is the same for all.

    ``bf16`` defaults to false everywhere, as in ``leandiff train``: bf16 autocast is fast only where the
    hardware has native bf16 (AVX-512 BF16 / AMX CPUs, Ampere or newer GPUs) and slower elsewhere, and the
    training scripts of the field (diffusers, EDM) default to full precision; ``bf16=true`` is one argument
    (fp32 master weights either way)."""

    steps: int = 1000
    lr: float = 2e-4
    batch_size: int = 128
    schedule: str = "cosine"  # learning-rate schedule: cosine, constant or cosine-restarts
    restart_period: int = 0  # cosine-restarts only: steps per cycle; 0: half the steps
    warmup: int = 0
    ema_decay: float = 0.999
    bf16: bool = False

    def __post_init__(self):
        if self.steps < 0:
            raise UserError(f"steps must be >= 0, got {self.steps}")
        if self.restart_period < 0:
            raise UserError(f"restart_period must be >= 0 (0: half the steps), got {self.restart_period}")
        self.config("mnist", None, "eps", 0)  # TrainConfig checks the rest

    def config(self, dataset, data_dir, param: str, seed: int, **loss) -> TrainConfig:
        """The TrainConfig of a training step: no sample grids, a resumable state at least every 250 steps;
        ``loss`` sets the loss fields (weighting, x0_weight) of the plain diffusion loss."""
        steps = max(1, self.steps)
        return TrainConfig(dataset=dataset, data_dir=data_dir, steps=steps, batch_size=self.batch_size, lr=self.lr,
                           warmup=self.warmup, lr_schedule=self.schedule,
                           restart_period=self.restart_period or max(1, steps // 2), ema_decay=self.ema_decay,
                           bf16=self.bf16, seed=seed, sample_every=0, checkpoint_every=min(250, steps),
                           parameterization=param, **loss)


def train_copy(ckpt, out_dir, train: Training, *, dataset: str, data_dir: str | None = None, seed: int = 0,
               loss_fn=None, progress=None, record: dict | None = None, **loss) -> Checkpoint:
    """Train a copy of ``ckpt`` with ``train``'s settings on its dataset with ``loss_fn`` (default: the plain
    diffusion loss with ``loss``'s fields; KD steps pass :class:`leandiff.compress.kd.KDLoss`); resumable in
    out_dir. The input (the recipe's origin, a KD teacher) stays untouched."""
    ckpt = copy.copy(ckpt)
    ckpt.net = copy.deepcopy(ckpt.net)
    cfg = train.config(dataset, data_dir, ckpt.parameterization, seed, **loss)
    return run(cfg, out_dir, ckpt, training_images(cfg, ckpt), loss_fn, progress, record)


def check_steps(step: str, train: Training, minimum: int = 1) -> None:
    """A training step's length: at least ``minimum`` (lowrank allows 0: no fine-tune)."""
    if train.steps < minimum:
        raise UserError(f"{step} needs steps >= {minimum}, got {train.steps}")


def check_kd_frac(step: str, kd_frac: float) -> None:
    if not 0.0 <= kd_frac <= 1.0:
        raise UserError(f"{step}: kd_frac must be in [0, 1], got {kd_frac}")


def need_dataset(ctx, step: str) -> None:
    if not ctx.dataset:
        raise UserError(f"{step} needs the training dataset: the checkpoint does not record one; pass --dataset")
