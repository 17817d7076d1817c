"""Low-rank compression (L-Diff §4.4): ``lowrank`` and ``lora``.

- ``lowrank(r=2)`` — every Conv2d / Linear weight W (out × in·k·k) is replaced by its truncated
  SVD W ≈ (U√S)(√S Vᵀ) at rank ⌊full/r⌋ (r is L-Diff §4.4's "rank proportion factor"): a k×k conv
  to ``rank`` channels followed by a 1×1 conv (a Linear pair for Linear). A layer is factorised
  only where that lowers its parameter count (a square 1×1 conv or Linear at rank n/2 does not).
  Optional fine-tune of the factors (``steps=N``, KD or plain).
- ``lora(r=2, steps=N)`` — LoRA (Hu et al. 2021): W x + (α/rank)·B A x with the base frozen and only
  A, B trained; ``merge=true`` folds B A back into W (the same size as before: LoRA is
  parameter-efficient *fine-tuning*, it shrinks nothing that ships).

The layers (:func:`leandiff.surgery.factor.factor_pair`, :class:`~leandiff.surgery.factor.LoRA`) and
their replay from the ``lowrank`` / ``lora`` surgery records live in :mod:`leandiff.surgery.factor`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import UserError
from ..spec import values
from ..surgery.factor import LoRA, factor_pair
from ..surgery.modules import set_module
from .kd import kd_loss, resolve_teacher
from .training import Training, check_kd_frac, check_steps, need_dataset, train_copy


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

def add_lora(net: nn.Module, r: float = 2.0, *, rank: int = 0, alpha: float = 0.0, seed: int = 0) -> dict[str, int]:
    """Wrap every Conv2d/Linear in a :class:`LoRA` adapter of rank max(1, ⌊full/r⌋) (or ``rank``);
    freeze everything but the adapters. ``alpha`` > 0 sets scale = alpha/rank (Hu et al.), else 1.
    The adapters' initial weights are drawn from a generator seeded by ``seed`` (the same seed, the same
    adapters: a LoRA step is as reproducible as the rest of a recipe)."""
    _check_rank("lora", r, rank)
    g = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
    ranks = {}
    for name, m in list(net.named_modules()):
        if not name or not _factorable(m):
            continue
        full = _full_rank(m)
        k = min(full, rank) if rank else max(1, int(full // r))
        set_module(net, name, LoRA(m, k, alpha / k if alpha > 0 else 1.0, generator=g))
        ranks[name] = k
    for n, p in net.named_parameters():
        p.requires_grad_(".down." in f".{n}" or ".up." in f".{n}")
    return ranks


def merge_lora(net: nn.Module) -> nn.Module:
    for name, m in list(net.named_modules()):
        if isinstance(m, LoRA):
            set_module(net, name, m.merged())
    return net


@dataclass(frozen=True)
class _FactorConfig:
    """What ``lowrank`` and ``lora`` share: the rank (full/r, or ``rank`` when > 0) and a KD or plain fine-tune."""

    r: float = 2.0
    rank: int = 0
    kd: bool = True
    kd_frac: float = 0.7

    def _check(self, step: str, min_steps: int) -> None:
        _check_rank(step, self.r, self.rank)
        check_steps(step, self.train, min_steps)
        check_kd_frac(step, self.kd_frac)

    def teacher_loss(self, student, ctx):
        """The fine-tune's loss: KD from the pre-recipe model, or None (the plain loss)."""
        return kd_loss(student, resolve_teacher(student, "", ctx), self.kd_frac) if self.kd else None


_FACTOR_TRAINING = dict(schedule="cosine-restarts", ema_decay=0.995)


@dataclass(frozen=True)
class LowRankConfig(_FactorConfig):
    """``lowrank(...)``: SVD factors at rank full/r, optionally fine-tuned (steps=0: not)."""

    train: Training = field(default_factory=lambda: Training(steps=0, **_FACTOR_TRAINING))

    def __post_init__(self):
        self._check("lowrank", 0)


def lowrank_step(ckpt, cfg: LowRankConfig, ctx):
    """SVD-factorise Conv2d/Linear weights to rank full/r (L-Diff §4.4); optionally fine-tune the factors."""
    net = copy.deepcopy(ckpt.net)
    ranks = lowrank_factorize(net, cfg.r, rank=cfg.rank)
    if not ranks:
        raise UserError(f"lowrank: no layer gets smaller at r={cfg.r:g}; use a larger r")
    arch = copy.deepcopy(ckpt.arch)
    arch.setdefault("surgery", []).append({"kind": "lowrank", "r": cfg.r, "layers": ranks})
    out = Checkpoint(net=net.eval(), arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                     meta=copy.deepcopy(ckpt.meta))
    if cfg.train.steps > 0:
        need_dataset(ctx, "lowrank")
        out = train_copy(out, ctx.step_dir, cfg.train, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                         loss_fn=cfg.teacher_loss(out, ctx), progress=ctx.progress, record={"lowrank": values(cfg)})
    return out


@dataclass(frozen=True)
class LoRAConfig(_FactorConfig):
    """``lora(...)``: LoRA adapters trained with the base frozen."""

    alpha: float = 0.0
    merge: bool = True
    train: Training = field(default_factory=lambda: Training(lr=1e-3, **_FACTOR_TRAINING))

    def __post_init__(self):
        self._check("lora", 1)
        if self.alpha < 0:
            raise UserError(f"lora: alpha must be >= 0 (0: scale 1), got {self.alpha}")


def lora_step(ckpt, cfg: LoRAConfig, ctx):
    """LoRA adapters (rank full/r) fine-tuned with the base frozen; merge=true folds them back in."""
    need_dataset(ctx, "lora")
    net = copy.deepcopy(ckpt.net)
    ranks = add_lora(net, cfg.r, rank=cfg.rank, alpha=cfg.alpha, seed=ctx.seed)
    arch = copy.deepcopy(ckpt.arch)
    scales = {n: m.scale for n, m in net.named_modules() if isinstance(m, LoRA)}
    arch.setdefault("surgery", []).append({"kind": "lora", "r": cfg.r, "layers": ranks, "scales": scales})
    st = Checkpoint(net=net, arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                    meta=copy.deepcopy(ckpt.meta))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = train_copy(st, ctx.step_dir, cfg.train, dataset=ctx.dataset, data_dir=ctx.data_dir, seed=ctx.seed,
                     loss_fn=cfg.teacher_loss(st, ctx), progress=ctx.progress, record={"lora": values(cfg)})
    out.meta["lora"] = {"trainable_params": trainable, "merged": cfg.merge}
    if cfg.merge:
        out.net = merge_lora(out.net)
        out.arch = copy.deepcopy(ckpt.arch)
    return out
