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
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import UserError
from ..spec import values
from ..surgery.factor import LoRA, factor_pair
from ..surgery.modules import set_module
from .kd import kd_loss, resolve_teacher
from .training import check_training, finetune_checkpoint, need_dataset


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
        need_dataset(ctx, "lowrank")
        out = finetune_checkpoint(out, ctx.step_dir, steps=args["steps"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                                  loss_fn=kd_loss(out, resolve_teacher(out, "", ctx), args["kd_frac"]) if args["kd"] else None,
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
    need_dataset(ctx, "lora")
    net = copy.deepcopy(ckpt.net)
    ranks = add_lora(net, args["r"], rank=args["rank"], alpha=args["alpha"])
    arch = copy.deepcopy(ckpt.arch)
    scales = {n: m.scale for n, m in net.named_modules() if isinstance(m, LoRA)}
    arch.setdefault("surgery", []).append({"kind": "lora", "r": args["r"], "layers": ranks, "scales": scales})
    st = Checkpoint(net=net, arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                    meta=copy.deepcopy(ckpt.meta))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = finetune_checkpoint(st, ctx.step_dir, steps=args["steps"], dataset=ctx.dataset, data_dir=ctx.data_dir,
                              loss_fn=kd_loss(st, resolve_teacher(st, "", ctx), args["kd_frac"]) if args["kd"] else None,
                              lr=args["lr"], batch_size=args["batch_size"], bf16=args["bf16"], seed=ctx.seed,
                              progress=ctx.progress, record={"lora": args})
    out.meta["lora"] = {"trainable_params": trainable, "merged": args["merge"]}
    if args["merge"]:
        out.net = merge_lora(out.net)
        out.arch = copy.deepcopy(ckpt.arch)
    return out
