"""Pruning: ``prune(method=..., ratio=p[, structured=false, threshold=...])``.

**Structured** (``structured=true``, the default) removes whole channels with Torch-Pruning's
dependency graph (Fang et al., CVPR 2023), so coupled layers (residual adds, skip concatenations,
GroupNorm groups, attention projections) shrink together and the result is a genuinely smaller
``UNet2DModel``. ``ratio`` is **the fraction of channels removed from every prunable layer**
(Torch-Pruning's per-layer ``pruning_ratio``), not of parameters or MACs: a conv whose input and
output both lose a fraction p keeps (1 − p)² of its MACs, so p = 0.3 removes about half of the
MACs and p = 0.5 about three quarters. Benchmarks report the MACs removed as measured.
Channel importance, one small callable per method (:data:`IMPORTANCE`):

- ``magnitude`` — ‖w‖_p of each channel's weights, p = ``norm`` (1 or 2): the "Ln structured"
  pruning of L-Diff (../shared/papers/lite-diffusion-cifar10.md §4.1, eq. 2) and MiniDiff
  (../shared/papers/mini-diffusion-mnist.md §4, magnitude importance).
- ``taylor`` — first-order Taylor |w · ∂L/∂w| (Molchanov et al. 2019) on the diffusion loss, with
  the gradients accumulated over timesteps spread over all of 0..T−1 on one mini-batch.
- ``diff`` — Diff-Pruning (Fang, Ma & Wang, NeurIPS 2023; MiniDiff Alg. 3): the same Taylor
  score, but the gradients are accumulated over t = 0, 1, 2, ... only while L_t / L_max > threshold
  (:func:`accumulate_gradients`), i.e. over the early, detail-forming steps whose loss is large.
- ``random`` — uniform random scores (seeded): the baseline.

**GroupNorm floor** (``min_group_channels``, default 2). Torch-Pruning keeps a GroupNorm's group count and
removes the same position from every group, so a 16-channel GroupNorm(8) (two channels a group, the first
level of ``mnist-tiny``) drops to one channel a group at any ratio: an instance norm, which removes each
channel's spatial mean. Before ``conv_out`` that makes the per-image mean of the prediction unlearnable:
the pruned-and-fine-tuned model had an ε-MSE at t = 999 twelve times the base model's and grey or white
backgrounds (benchmarks/results/prune.md). The floor gives every GroupNorm whose groups would fall below
``min_group_channels`` its own, lower ratio (Torch-Pruning's ``pruning_ratio_dict``) so that its groups
keep that many channels (or all they have); ``meta["prune"]["protected_norms"]`` lists them.

**Layer-wise reconstruction** (``reconstruct=N``, structured only). Removing channels loses their contribution to
every layer that read them. With ``reconstruct=N`` each Conv2d/Linear of the pruned network is then refitted, in
execution order, by ridge least squares so that on its own inputs it reproduces the unpruned network's outputs at
the channels it kept, over N calibration inputs (x_t, t) drawn as in training (:func:`reconstruct_layers`; the
reconstruction step of channel pruning, He, Zhang & Sun 2017 and ThiNet, Luo et al. 2017). No gradient steps; on
``mnist-tiny`` it takes a magnitude-pruned network (p = 0.3) from FID-dom ≈ 600 to ≈ 3.5 before any fine-tuning.

The output conv (``conv_out``) is never pruned; the time-embedding MLP (``time_embedding``) is
kept unless ``include_time=true`` (L-Diff §4.1 preserves the time-embedding layers). diffusers'
``Downsample2D/Upsample2D.channels`` and ``Attention.heads/inner_dim/...`` are updated after the
channel surgery (their forward asserts on them); attention head dimensions are pruned per head
(``num_heads``) so multi-head layers stay consistent. The change is recorded as an
``arch["surgery"]`` record of kind ``prune`` (new parameter shapes + attribute values per module)
that :func:`leandiff.models.build_network` replays on a freshly built network, so the pruned
checkpoint reloads from its own metadata.

**Unstructured** (``structured=false``) zeroes individual weights of every Conv2d/Linear weight
(same exclusions): ``l1`` the fraction p of smallest |w| per layer (L-Diff eq. 1), ``random`` a
random fraction p per layer, ``global`` the fraction p of smallest |w| over all those layers at
once (one threshold, L-Diff eq. 3). The zeros are stored as dense data: parameters, MACs, file
size and latency do not change. ``meta["prune"]`` records the sparsity and the bytes a CSR or a
bitmask encoding of the same weights would take (computed by :func:`sparse_bytes`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint
from ..device import device_of
from ..errors import UserError
from ..models import image_shape
from ..schedule import q_sample
from ..surgery.prune import WIDTH_ATTRS

STRUCTURED_METHODS = ("magnitude", "taylor", "diff", "random")
UNSTRUCTURED_METHODS = ("l1", "random", "global")


@dataclass(frozen=True)
class PruneConfig:
    method: str  # structured: magnitude | taylor | diff | random; unstructured: l1 | random | global
    ratio: float  # structured: fraction of channels removed per prunable layer; unstructured: of weights zeroed
    structured: bool = True  # whole channels (a smaller network) or single weights (zeros, same network)
    norm: int = 2  # p of the ‖w‖_p magnitude importance (1 or 2)
    threshold: float = 0.05  # Diff-Pruning: stop accumulating gradients once L_t / L_max <= threshold
    batch_size: int = 32  # training images in the mini-batch of the gradient-based importances
    t_stride: int = 1  # gradient importances visit t = 0, t_stride, 2·t_stride, ... (1: every step, as the paper)
    include_time: bool = False  # also prune the time-embedding MLP's hidden/output features
    min_group_channels: int = 2  # structured: no GroupNorm is left with fewer channels per group (0: no floor)
    reconstruct: int = 0  # structured: refit each layer to the unpruned outputs on this many calibration samples
    ridge: float = 1e-3  # reconstruction: ridge strength towards the pruned weights, relative to mean diag(AᵀA)
    seed: int = field(default=0, metadata={"recipe": False})  # mini-batch, noise and random scores (the recipe's --seed)

    def __post_init__(self):
        methods = STRUCTURED_METHODS if self.structured else UNSTRUCTURED_METHODS
        if self.method not in methods:
            kind = "structured" if self.structured else "unstructured (structured=false)"
            raise UserError(f"prune: unknown {kind} method {self.method!r}; known: {', '.join(methods)}")
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"prune: ratio must be in (0, 1), got {self.ratio}")
        if self.norm not in (1, 2):
            raise UserError(f"prune: norm must be 1 or 2, got {self.norm}")
        if not 0.0 < self.threshold < 1.0:  # L_0 / L_max = 1 at the first step: 1 would stop before it
            raise UserError(f"prune: threshold must be in (0, 1), got {self.threshold}")
        if not isinstance(self.min_group_channels, int) or self.min_group_channels < 0:
            raise UserError(f"prune: min_group_channels must be an integer >= 0, got {self.min_group_channels!r}")
        if not isinstance(self.reconstruct, int) or self.reconstruct < 0:
            raise UserError(f"prune: reconstruct must be a number of calibration samples >= 0, got {self.reconstruct!r}")
        if self.reconstruct and not self.structured:
            raise UserError("prune: reconstruct refits whole layers, which would undo structured=false's zeros")
        if not self.ridge > 0:
            raise UserError(f"prune: ridge must be > 0, got {self.ridge}")
        if self.batch_size < 1 or self.t_stride < 1:
            raise UserError(f"prune: batch_size and t_stride must be >= 1, got {self.batch_size}, {self.t_stride}")


# --- which layers ----------------------------------------------------------------------------------------------------

def kept_modules(net: nn.Module, include_time: bool = False) -> list[nn.Module]:
    """Layers whose outputs are never pruned: the output conv, and the time-embedding MLP unless asked."""
    keep = [net.conv_out] if hasattr(net, "conv_out") else []
    if not include_time and hasattr(net, "time_embedding"):
        keep.append(net.time_embedding)
    return keep


def prunable_weights(net: nn.Module, include_time: bool = False) -> dict[str, nn.Parameter]:
    """Conv2d/Linear weights unstructured pruning may zero (same exclusions as structured)."""
    skip = {id(m) for k in kept_modules(net, include_time) for m in k.modules()}
    return {f"{n}.weight": m.weight for n, m in net.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skip}


# --- Diff-Pruning's truncated gradient accumulation --------------------------------------------------------------------

def accumulate_gradients(loss_at: Callable[[int], torch.Tensor], ts: Sequence[int],
                         threshold: float | None) -> tuple[list[int], list[float]]:
    """Back-propagate L_t for t in ``ts`` in order, summing the gradients in ``.grad``.

    With a ``threshold`` (Diff-Pruning, MiniDiff Alg. 3): L_max = max over the losses seen so far
    (L_t included); stop *before* back-propagating the first L_t with L_t / L_max <= threshold.
    (Fang et al.'s released code back-propagates that last step too; we follow the algorithm as
    written.) Without one (Taylor), every t is used. Returns (timesteps used, their losses)."""
    used, losses, l_max = [], [], 0.0
    for t in ts:
        loss = loss_at(int(t))
        val = float(loss.detach())
        l_max = max(l_max, val)
        if threshold is not None and l_max > 0 and val / l_max <= threshold:
            break
        loss.backward()
        used.append(int(t))
        losses.append(val)
    return used, losses


def _diffusion_loss_at(denoiser, x0: torch.Tensor, noise: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """t -> L_t = MSE(D(√ᾱ_t x + √(1−ᾱ_t) ε, t), target) on one fixed (x, ε) (Alg. 3, first line of the loop)."""
    def loss_at(t: int) -> torch.Tensor:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        xt = q_sample(denoiser.schedule, x0, tt, noise)
        return F.mse_loss(denoiser(xt, tt).float(), denoiser.target(x0, noise, tt))
    return loss_at


# --- importance strategies (Torch-Pruning Importance callables: group -> scores) -----------------------------------

@dataclass
class ImportanceInputs:
    """What an importance strategy may use: the network (gradients are left in ``.grad``)."""

    ckpt: Checkpoint
    cfg: PruneConfig
    images: torch.Tensor | None  # training images (N×C×H×W in [-1, 1]) for gradient-based scores
    log: dict  # the strategy writes what it did here (timesteps used, losses)


def _batch(inp: ImportanceInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if inp.images is None:
        raise UserError(f"prune: method={inp.cfg.method} needs training images: pass --dataset")
    g = torch.Generator().manual_seed(inp.cfg.seed)
    idx = torch.randperm(len(inp.images), generator=g)[: inp.cfg.batch_size]
    x0 = inp.images[idx].float()
    return x0, torch.randn(x0.shape, generator=g)


def _gradient_importance(inp: ImportanceInputs, threshold: float | None):
    import torch_pruning as tp

    net = inp.ckpt.net
    x0, noise = _batch(inp)
    net.requires_grad_(True)  # the working copy may come from a frozen (teacher) checkpoint
    net.zero_grad(set_to_none=True)
    net.train(False)
    ts = range(0, inp.ckpt.schedule.T, inp.cfg.t_stride)
    used, losses = accumulate_gradients(_diffusion_loss_at(inp.ckpt.denoiser(), x0, noise), ts, threshold)
    inp.log.update(timesteps_used=len(used), t_last=used[-1], loss_first=losses[0], loss_max=max(losses),
                   loss_last=losses[-1])
    return tp.importance.TaylorImportance()  # |w · Σ_t ∂L_t/∂w| summed per channel, mean over the group


def _random_importance(inp: ImportanceInputs):
    g = torch.Generator().manual_seed(inp.cfg.seed)

    def scores(group, **_):
        return torch.rand(len(group[0][1]), generator=g)
    return scores


# method -> fn(ImportanceInputs) -> Torch-Pruning importance callable (group -> one score per channel)
IMPORTANCE: dict[str, Callable] = {
    "magnitude": lambda inp: __import__("torch_pruning").importance.MagnitudeImportance(p=inp.cfg.norm),
    "taylor": lambda inp: _gradient_importance(inp, None),
    "diff": lambda inp: _gradient_importance(inp, inp.cfg.threshold),
    "random": _random_importance,
}


# --- structured pruning and its replay ----------------------------------------------------------------------------



def _widths(net: nn.Module) -> dict[str, dict]:
    return {n: {a: getattr(m, a) for a in WIDTH_ATTRS if isinstance(getattr(m, a, None), int)}
            for n, m in net.named_modules() if n}  # the root's widths live in its config


def fix_diffusers_attrs(net: nn.Module) -> None:
    """Make diffusers' bookkeeping attributes agree with the (pruned) layers they describe."""
    from diffusers.models.attention_processor import Attention

    for m in net.modules():
        if type(m).__name__ in ("Downsample2D", "Upsample2D") and isinstance(getattr(m, "conv", None), nn.Conv2d):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        if isinstance(m, Attention):
            m.query_dim, m.inner_dim = m.to_q.in_features, m.to_q.out_features
            m.inner_kv_dim, m.out_dim = m.to_k.out_features, m.to_out[0].out_features
            if m.inner_dim % m.heads:
                raise RuntimeError(f"attention inner_dim {m.inner_dim} is not a multiple of its {m.heads} heads")


def group_norm_floors(net: nn.Module, ratio: float, min_channels: int) -> dict[str, tuple[nn.Module, float]]:
    """name -> (GroupNorm, lower ratio) for every GroupNorm that ``ratio`` would leave with fewer than
    ``min_channels`` channels a group (or fewer than it has, when it has fewer). Torch-Pruning keeps
    ⌊cpg·(1 − r)⌋ of the cpg channels of each group; the lower ratio keeps the floor exactly."""
    floors = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.GroupNorm) and min_channels > 0 and m.num_channels % m.num_groups == 0:
            cpg = m.num_channels // m.num_groups
            want = min(min_channels, cpg)
            if int(cpg * (1 - ratio)) < want:
                floors[name] = (m, max(0.0, 1 - (want + 0.5) / cpg))  # +0.5: ⌊·⌋ of a float just under `want`
    return floors


def structured_prune(ckpt: Checkpoint, cfg: PruneConfig, images: torch.Tensor | None = None) -> tuple[Checkpoint, dict]:
    """Remove channels (Torch-Pruning dependency graph); returns (pruned copy, log)."""
    import torch_pruning as tp
    from diffusers.models.attention_processor import Attention

    # Torch-Pruning traces the graph through autograd: a frozen network (a KD teacher, say) traces empty and
    # would come back unpruned without a word
    net = copy.deepcopy(ckpt.net).float().requires_grad_(True)
    work = Checkpoint(net=net, arch=ckpt.arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                      meta={})
    log: dict = {}
    importance = IMPORTANCE[cfg.method](ImportanceInputs(work, cfg, images, log))
    before_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    before_widths = _widths(net)
    c, h, w = image_shape(ckpt.arch)
    example = (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.long))
    heads = {}
    for m in net.modules():
        if isinstance(m, Attention):
            heads.update({m.to_q: m.heads, m.to_k: m.heads, m.to_v: m.heads})
    floors = group_norm_floors(net, cfg.ratio, cfg.min_group_channels)
    log["protected_norms"] = {n: r for n, (m, r) in floors.items()}
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        pruner = tp.pruner.BasePruner(net, example, importance=importance, pruning_ratio=cfg.ratio,
                                      pruning_ratio_dict={m: r for m, r in floors.values()} or None,
                                      ignored_layers=kept_modules(net, cfg.include_time), num_heads=heads,
                                      forward_fn=lambda m, inp: m(*inp).sample)
        pruner.step()
    net.zero_grad(set_to_none=True)
    fix_diffusers_attrs(net)
    kept = kept_channels(ckpt.net, net)  # into ckpt.net; composed below into the network before any prune
    before = ckpt.meta.get("prune", {}).get("kept") or {}
    log["kept"] = {n: [before[n][i] for i in rows] if n in before else rows for n, rows in kept.items()}
    if cfg.reconstruct:
        teacher = copy.deepcopy(ckpt.net).float().eval()
        errors = reconstruct_layers(teacher, net.eval(), calibration_batches(ckpt, images, cfg), cfg.ridge, kept)
        log["reconstruct"] = {"samples": cfg.reconstruct, "ridge": cfg.ridge, "layers": len(errors),
                              "rel_error_before": sum(e[0] for e in errors.values()) / len(errors),
                              "rel_error_after": sum(e[1] for e in errors.values()) / len(errors)}
    after_widths = _widths(net)
    record = {
        "kind": "prune", "method": cfg.method, "ratio": cfg.ratio,
        "shapes": {k: list(v.shape) for k, v in net.state_dict().items() if tuple(v.shape) != before_shapes[k]},
        "attrs": {n: {a: v for a, v in wd.items() if before_widths[n].get(a) != v}
                  for n, wd in after_widths.items() if any(before_widths[n].get(a) != v for a, v in wd.items())},
    }
    arch = copy.deepcopy(ckpt.arch)
    arch.setdefault("surgery", []).append(record)
    out = Checkpoint(net=net.eval(), arch=arch, schedule=ckpt.schedule, parameterization=ckpt.parameterization,
                     meta=copy.deepcopy(ckpt.meta))
    return out, log


# --- layer-wise least-squares reconstruction after channel removal --------------------------------------------------

class _Captured(Exception):
    """Raised by a forward hook once it has what it needs: the rest of the forward pass is skipped."""


def _capture(net: nn.Module, module: nn.Module, inputs: tuple, want: str) -> torch.Tensor:
    """Run ``net(*inputs)`` only as far as ``module`` and return its first input (``want="in"``) or its output."""
    got = []

    def hook(mod, args, out):
        got.append(args[0] if want == "in" else out)
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        net(*inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError("reconstruction: a layer was not reached by the forward pass")
    return got[0]


def _design(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the least-squares problem for ``module``'s weights: one row per output position
    (a conv's im2col patches, a linear layer's input vectors), with a 1 appended for the bias."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # N × C·k·k × L
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        a = x.reshape(-1, x.shape[-1])
    return torch.cat([a, a.new_ones(a.shape[0], 1)], 1).double()


def _targets(y: torch.Tensor) -> torch.Tensor:
    """A layer's output as rows matching :func:`_design` (a conv's output positions in unfold's order)."""
    if y.dim() == 4:
        y = y.permute(0, 2, 3, 1)
    return y.reshape(-1, y.shape[-1]).double()


def kept_rows(w_full: torch.Tensor, w_pruned: torch.Tensor) -> torch.Tensor:
    """Which output channels of the unpruned weight the pruned one kept, found from the values themselves:
    pruning only selects rows and columns, so every value of a kept row (its first kernel element per
    input channel) occurs, bit for bit, in the row it came from. Raises if a row matches none or several."""
    a = w_full.reshape(w_full.shape[0], w_full.shape[1], -1)[..., 0]  # O × I
    b = w_pruned.reshape(w_pruned.shape[0], w_pruned.shape[1], -1)[..., 0]  # o × i
    rows = []
    for j, row in enumerate(b):
        hits = (row[:, None, None] == a[None]).any(-1).all(0).nonzero().flatten()
        if len(hits) != 1:
            raise RuntimeError(f"reconstruction: pruned row {j} matches {len(hits)} rows of the unpruned weight")
        rows.append(int(hits[0]))
    return torch.tensor(rows)


def kept_channels(full: nn.Module, pruned: nn.Module) -> dict[str, list[int]]:
    """Conv2d/Linear name -> the output channels of ``full`` that ``pruned`` kept (:func:`kept_rows`).
    :func:`structured_prune` records it, composed with any earlier prune's map so that it points into the
    network before the first prune, as ``meta["prune"]["kept"]``; feature distillation
    (``finetune(feat_weight=...)``) reads it."""
    mods = dict(full.named_modules())
    out = {}
    for name, m in pruned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in mods:
            try:
                rows = kept_rows(mods[name].weight.float(), m.weight.float())
            except RuntimeError:  # tied rows (e.g. zeros from unstructured pruning): leave the layer out
                continue
            out[name] = rows.tolist()
    return out


def calibration_batches(ckpt: Checkpoint, images: torch.Tensor | None, cfg: PruneConfig,
                        batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``cfg.reconstruct`` network inputs (x_t, t) as in training: random training images, t uniform over
    0..T−1, fresh Gaussian noise (seeded); x_t as the network sees it (:meth:`Denoiser.net_input`)."""
    if images is None:
        raise UserError("prune: reconstruct needs training images: pass --dataset")
    g = torch.Generator().manual_seed(cfg.seed + 1)
    idx = torch.randperm(len(images), generator=g)[: cfg.reconstruct]
    out, denoiser = [], ckpt.denoiser()
    for i in range(0, len(idx), batch):
        x0 = images[idx[i:i + batch]].float()
        t = torch.randint(0, ckpt.schedule.T, (len(x0),), generator=g)
        out.append(denoiser.net_input(q_sample(ckpt.schedule, x0, t, torch.randn(x0.shape, generator=g)), t))
    return out


def reconstruct_layers(teacher: nn.Module, student: nn.Module, batches: Sequence[tuple], ridge: float = 1e-3,
                       kept: dict[str, list[int]] | None = None) -> dict:
    """Refit every Conv2d/Linear of the pruned ``student`` so that, on its own (already refitted) inputs, it
    reproduces the unpruned ``teacher``'s outputs at the kept channels — layer by layer in execution order, each
    by ridge-regularised least squares over the calibration ``batches`` of network inputs (x_t, t).

    This is the reconstruction step of channel pruning (He, Zhang & Sun, ICCV 2017; ThiNet, Luo et al. 2017):
    removing input channels of a layer loses their contribution, and the remaining weights are re-solved in
    closed form to make it up, ``argmin_W ‖A W − Y‖² + λ‖W − W₀‖²`` with A the layer's input patches (plus a
    column of ones for the bias), Y the teacher's output at the kept channels, W₀ the current weights and
    λ = ``ridge`` · mean(diag AᵀA). Going in execution order lets each layer also absorb the errors of the
    layers before it. ``kept`` (layer -> ``teacher`` channels, :func:`kept_channels`) is found from the weights
    when not given; a layer it leaves out (tied rows) is not refitted. Returns {layer: relative output error
    before → after} on the calibration set."""
    kept = kept_channels(teacher, student) if kept is None else kept
    t_mods = dict(teacher.named_modules())
    layers = [(n, m) for n, m in student.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n in t_mods]
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n) if n not in order else None)
             for n, m in layers]
    try:
        with torch.no_grad():
            student(*batches[0])
    finally:
        for h in hooks:
            h.remove()
    mods = dict(layers)
    report = {}
    with torch.no_grad():
        for name in (n for n in order if n in kept):
            s, t = mods[name], t_mods[name]
            rows = torch.tensor(kept[name])
            w0 = s.weight.reshape(s.weight.shape[0], -1).double()
            b0 = s.bias.double() if s.bias is not None else torch.zeros(s.weight.shape[0], dtype=torch.float64)
            theta0 = torch.cat([w0, b0[:, None]], 1).T  # (d + 1) × o
            gram = torch.zeros(theta0.shape[0], theta0.shape[0], dtype=torch.float64)
            cross = torch.zeros_like(theta0)
            yy, err0 = 0.0, 0.0
            for inputs in batches:
                a = _design(s, _capture(student, s, inputs, "in"))
                y = _targets(_capture(teacher, t, inputs, "out"))[:, rows]
                gram += a.T @ a
                cross += a.T @ y
                yy += float((y ** 2).sum())
                err0 += float(((a @ theta0 - y) ** 2).sum())
            lam = ridge * float(gram.diagonal().mean())
            if s.bias is None:  # no bias to fit: pin its column at zero
                gram[-1, :] = 0
                gram[:, -1] = 0
                gram[-1, -1] = 1
                cross[-1] = 0
            eye = torch.eye(gram.shape[0], dtype=torch.float64)
            theta = torch.linalg.solve(gram + lam * eye, cross + lam * theta0)
            err1 = float(((theta * (gram @ theta)).sum() - 2 * (theta * cross).sum() + yy))
            s.weight.copy_(theta[:-1].T.reshape(s.weight.shape).to(s.weight.dtype))
            if s.bias is not None:
                s.bias.copy_(theta[-1].to(s.bias.dtype))
            report[name] = (err0 / max(yy, 1e-30), max(err1, 0.0) / max(yy, 1e-30))
    return report




# --- unstructured pruning ----------------------------------------------------------------------------------------------

def _ranks_zeroed(n: int, ratio: float) -> int:
    return int(math.floor(ratio * n))


@torch.no_grad()
def unstructured_masks(net: nn.Module, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """name -> boolean mask of the weights to zero (True = zeroed)."""
    weights = prunable_weights(net, cfg.include_time)
    masks = {}
    if cfg.method == "global":  # L-Diff eq. 3: one magnitude threshold over all layers
        flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        k = _ranks_zeroed(flat.numel(), cfg.ratio)
        order = torch.argsort(flat, stable=True)
        zero = torch.zeros(flat.numel(), dtype=torch.bool)
        zero[order[:k]] = True
        start = 0
        for name, w in weights.items():
            masks[name] = zero[start:start + w.numel()].reshape(w.shape)
            start += w.numel()
        return masks
    g = torch.Generator().manual_seed(cfg.seed)
    for name, w in weights.items():  # per layer: L-Diff eq. 1 (l1) or random
        k = _ranks_zeroed(w.numel(), cfg.ratio)
        score = w.detach().abs().flatten() if cfg.method == "l1" else torch.rand(w.numel(), generator=g)
        zero = torch.zeros(w.numel(), dtype=torch.bool)
        zero[torch.argsort(score, stable=True)[:k]] = True
        masks[name] = zero.reshape(w.shape)
    return masks


def sparse_bytes(w: torch.Tensor, value_bytes: int = 4) -> dict[str, int]:
    """Bytes of one weight tensor (as a matrix out × in·k·k) stored dense, as CSR (values + column
    indices of the narrowest unsigned width that fits + int32 row pointers) and as a bitmask
    (one bit per entry + the non-zero values)."""
    rows = w.shape[0] if w.dim() > 1 else 1
    cols = w.numel() // rows
    nnz = int(torch.count_nonzero(w))
    idx = 1 if cols <= 2 ** 8 else 2 if cols <= 2 ** 16 else 4
    return {"dense": w.numel() * value_bytes, "csr": nnz * (value_bytes + idx) + 4 * (rows + 1),
            "bitmask": math.ceil(w.numel() / 8) + nnz * value_bytes, "nnz": nnz, "numel": w.numel()}


def sparsity_report(net: nn.Module, include_time: bool = False) -> dict:
    """Sparsity of the prunable weights and of all parameters; model bytes dense / with the pruned
    weights CSR- or bitmask-encoded (the others dense), fp32 values."""
    targets = prunable_weights(net, include_time)
    tot = {"dense": 0, "csr": 0, "bitmask": 0, "nnz": 0, "numel": 0}
    for w in targets.values():
        for k, v in sparse_bytes(w.detach()).items():
            tot[k] += v
    params = dict(net.named_parameters())
    other = sum(p.numel() for n, p in params.items() if n not in targets)
    all_nnz = sum(int(torch.count_nonzero(p)) for p in params.values())
    all_n = sum(p.numel() for p in params.values())
    return {"sparsity_prunable": 1 - tot["nnz"] / tot["numel"], "sparsity_all": 1 - all_nnz / all_n,
            "params": all_n, "params_nonzero": all_nnz,
            "bytes_dense": all_n * 4, "bytes_csr": tot["csr"] + other * 4, "bytes_bitmask": tot["bitmask"] + other * 4}


def unstructured_prune(ckpt: Checkpoint, cfg: PruneConfig) -> tuple[Checkpoint, dict]:
    """Zero weights in place of a copy (the network keeps its shape); returns (copy, sparsity report)."""
    net = copy.deepcopy(ckpt.net)
    with torch.no_grad():
        for name, mask in unstructured_masks(net, cfg).items():
            net.get_parameter(name).masked_fill_(mask, 0.0)
    out = Checkpoint(net=net.eval(), arch=copy.deepcopy(ckpt.arch), schedule=ckpt.schedule,
                     parameterization=ckpt.parameterization, meta=copy.deepcopy(ckpt.meta))
    return out, sparsity_report(net, cfg.include_time)


def prune_checkpoint(ckpt: Checkpoint, cfg: PruneConfig, images: torch.Tensor | None = None) -> Checkpoint:
    """Structured or unstructured pruning of ``ckpt`` by ``cfg``; ``meta["prune"]`` says what was done."""
    if cfg.structured:
        out, log = structured_prune(ckpt, cfg, images)
    else:
        out, log = unstructured_prune(ckpt, cfg)
    out.meta["prune"] = {"method": cfg.method, "ratio": cfg.ratio, "structured": cfg.structured,
                         "ratio_means": "fraction of channels removed per prunable layer" if cfg.structured
                         else "fraction of prunable Conv/Linear weights zeroed", **log}
    return out


def prune_step(ckpt, cfg: PruneConfig, ctx):
    """Prune channels (structured: magnitude|taylor|diff|random) or weights (structured=false: l1|random|global)."""
    cfg = dataclasses.replace(cfg, seed=ctx.seed)
    images = None
    if cfg.structured and (cfg.method in ("taylor", "diff") or cfg.reconstruct):
        if not ctx.dataset:
            what = "reconstruct" if cfg.reconstruct else f"method={cfg.method}"
            raise UserError(f"prune: {what} needs the training dataset; the checkpoint records none: pass --dataset")
        from ..data import load_dataset

        images = load_dataset(ctx.dataset, "train", ctx.data_dir, shape=image_shape(ckpt.arch)).images
    # Pruning is one pass of graph surgery (torch-pruning's dependency graph) and float64 least squares:
    # it runs on the CPU whatever the recipe's device, and the pruned network goes back to that device.
    device = device_of(ckpt.net)
    ckpt.net.cpu()
    try:
        out = prune_checkpoint(ckpt, cfg, images)
    finally:
        ckpt.net.to(device)
    out.net.to(device)
    return out
