"""Post-training quantization of diffusion networks: the research path (fake-quant, any bit width).

Fake quantization (quantize-dequantize in fp32) *simulates* low-bit arithmetic to measure its cost
in quality. It saves no time and is always labelled as a simulation (runtime ``fake-quant``); real
int8 execution is :mod:`leandiff.compress.onnx` (runtime ``ort-int8``).

Pieces, each a small strategy in a dict registry:

- uniform quantizer ŵ = s·clip(round(w/s), c_min, c_max) (MiniDiff, Alg. 2) — :func:`fake_quant`;
- observers (range estimators): ``minmax``, ``percentile``, ``mse`` — :data:`OBSERVERS`;
- calibration-set collectors, all data-free (the full-precision model's own denoising) except the
  ``real`` baseline: ``uniform``, ``qdiff`` (Q-Diffusion's time-step-aware sampling, Li et al. 2023
  §4.2), ``ndtc`` (PTQ4DM's normally distributed time-step calibration, Shang et al. 2023 Alg. 1) —
  :data:`COLLECTORS`;
- activation scales per timestep group (beyond the papers: the activation range drifts with t);
- weight rounding: to nearest, or learned per weight by AdaRound (``w_round=adaround``; Nagel et al.
  2020, the layer-wise core of the BRECQ reconstruction that Q-Diffusion runs) — :func:`adaround_layer`.

A quantized network reloads from data: the ``quant`` surgery record names the wrapped layers and
the settings; the scales are buffers in ``model.safetensors``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import Denoiser, call_network
from ..errors import UserError
from ..models import register_surgery
from ..recipe import register_step
from ..runtime import eager, register_runtime
from ..schedule import SPACINGS, alpha_sigma, q_sample

# --- the quantizer ---------------------------------------------------------------------------------------------------


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(c_min, c_max) of a ``bits``-bit integer grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def fake_quant(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | float, c_min: int, c_max: int) -> torch.Tensor:
    """x̂ = s·(clip(round(x/s) + z, c_min, c_max) − z)  (MiniDiff Alg. 2 with a zero point z; z = 0 is
    the symmetric case written there as ŵ = s·clip(round(w/s), c_min, c_max)). Inside the clipping
    range |x̂ − x| ≤ s/2."""
    return s * (torch.clamp(torch.round(x / s) + z, c_min, c_max) - z)


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(absmax, min=1e-8) / int_range(bits, True)[1]


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an unsigned grid covering [lo, hi] (lo ≤ 0 ≤ hi enforced, so 0
    is exact, as in every int8 runtime)."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    s = torch.clamp(hi - lo, min=1e-8) / int_range(bits, False)[1]
    return s, torch.round(-lo / s)


# --- observers: values -> clipping range ------------------------------------------------------------------------------

def _minmax(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return v.min(), v.max()


def _percentile(v: torch.Tensor, bits: int, q: float = 0.9999) -> tuple[torch.Tensor, torch.Tensor]:
    v = v.flatten().float()
    return torch.quantile(v, 1 - q), torch.quantile(v, q)


def _mse(v: torch.Tensor, bits: int, grid: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunk min-max range α·[lo, hi] (α in (0, 1]) with the least quantize-dequantize MSE."""
    lo, hi = v.min(), v.max()
    best, arg = float("inf"), (lo, hi)
    for a in torch.linspace(0.3, 1.0, grid):
        s, z = affine_params(a * lo, a * hi, bits)
        err = (fake_quant(v, s, z, *int_range(bits, False)) - v).pow(2).mean().item()
        if err < best:
            best, arg = err, (a * lo, a * hi)
    return arg


OBSERVERS: dict[str, Callable] = {"minmax": _minmax, "percentile": _percentile, "mse": _mse}


def weight_scale(w: torch.Tensor, bits: int, per_channel: bool, observer: str) -> torch.Tensor:
    """Symmetric weight scale per output channel (dim 0) or per tensor; ``mse`` searches a clipping
    ratio per channel, other observers use max |w|."""
    flat = w.detach().reshape(w.shape[0], -1) if per_channel else w.detach().reshape(1, -1)
    absmax = flat.abs().amax(dim=1)
    s = symmetric_scale(absmax, bits)
    if observer == "mse":
        c_min, c_max = int_range(bits, True)
        best = torch.full_like(absmax, float("inf"))
        for a in torch.linspace(0.3, 1.0, 40):
            sa = symmetric_scale(a * absmax, bits)
            err = (fake_quant(flat, sa[:, None], 0.0, c_min, c_max) - flat).pow(2).mean(dim=1)
            better = err < best
            best, s = torch.where(better, err, best), torch.where(better, sa, s)
    return s


# --- the quantized layer wrapper ---------------------------------------------------------------------------------------

def layer_op(inner: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``inner`` (a Conv2d or Linear) applied to ``x`` with weight ``w`` in place of its own (same bias)."""
    if isinstance(inner, nn.Conv2d):
        return F.conv2d(x, w, inner.bias, inner.stride, inner.padding, inner.dilation, inner.groups)
    return F.linear(x, w, inner.bias)


class QuantLayer(nn.Module):
    """A Conv2d or Linear whose weights are fake-quantized (symmetric, per channel or per tensor, 2–8
    bits) and whose input activation is fake-quantized (affine, per tensor, 4–16 bits), with one
    activation scale per timestep group. Scales are buffers, so they save and load with the weights."""

    def __init__(self, inner: nn.Module, w_bits: int, a_bits: int, per_channel: bool, groups: int):
        super().__init__()
        self.inner = inner
        self.w_bits, self.a_bits, self.per_channel = w_bits, a_bits, per_channel
        out_ch = inner.weight.shape[0] if per_channel else 1
        self.register_buffer("w_scale", torch.ones(out_ch))
        self.register_buffer("a_scale", torch.ones(groups))
        self.register_buffer("a_zero", torch.zeros(groups))
        self.group: torch.Tensor | None = None  # per-sample timestep group, set by the network's pre-hook
        self.record: list | None = None  # during calibration: (group per sample, input) pairs

    def _qweight(self) -> torch.Tensor:
        w = self.inner.weight
        s = self.w_scale.reshape((-1,) + (1,) * (w.ndim - 1))
        return fake_quant(w, s, 0.0, *int_range(self.w_bits, True))

    def _qinput(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g is None or g.numel() != x.shape[0]:
            g = torch.zeros(x.shape[0], dtype=torch.long) if g is None else g[:1].expand(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        s, z = self.a_scale[g].reshape(shape), self.a_zero[g].reshape(shape)
        return fake_quant(x, s, z, *int_range(self.a_bits, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record is not None:  # calibration: full precision, remember the inputs
            self.record.append((self.group, _subsample(x)))
            return self.inner(x)
        return layer_op(self.inner, self._qinput(x), self._qweight())


def _subsample(x: torch.Tensor, k: int = 4096) -> torch.Tensor:
    """Per sample: its exact min and max plus ≤ k random values (bounded memory for percentile/MSE)."""
    flat = x.detach().reshape(x.shape[0], -1) if x.ndim > 1 else x.detach()[:, None]
    if flat.shape[1] > k:
        idx = torch.randint(0, flat.shape[1], (k,), generator=torch.Generator().manual_seed(flat.shape[1]))
        flat = torch.cat([flat[:, idx], flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)], dim=1)
    return flat.float().clone()


# --- configuration ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 8  # weight bits, 2..8 (symmetric, signed grid)
    a_bits: int = 8  # activation bits, 4..16 (affine, unsigned grid)
    per_channel: bool = True  # weight scale per output channel (else one per tensor)
    observer: str = "minmax"  # activation range estimator: minmax | percentile | mse
    w_observer: str = "minmax"  # weight range estimator: minmax | mse
    keep_first_last: bool = True  # conv_in and conv_out stay full precision
    keep_time: bool = True  # the time-embedding MLP stays full precision
    t_groups: int = 1  # activation scales per timestep group (1 = one scale for all t)
    w_round: str = "nearest"  # weight rounding: nearest | adaround (learned on the calibration set)
    bias_correction: bool = False  # remove each layer's mean output shift from quantization (Nagel et al. 2019)
    adaround_iters: int = 400  # AdaRound optimisation steps per layer

    def __post_init__(self):
        if not 2 <= self.w_bits <= 8:
            raise UserError(f"quant: w must be 2..8 bits, got {self.w_bits}")
        if not 4 <= self.a_bits <= 16:
            raise UserError(f"quant: a must be 4..16 bits, got {self.a_bits}")
        if self.observer not in OBSERVERS:
            raise UserError(f"quant: unknown observer {self.observer!r}; known: {', '.join(OBSERVERS)}")
        if self.w_observer not in ("minmax", "mse"):
            raise UserError(f"quant: unknown weight observer {self.w_observer!r}; known: minmax, mse")
        if self.t_groups < 1:
            raise UserError(f"quant: t_groups must be >= 1, got {self.t_groups}")
        if self.w_round not in ("nearest", "adaround"):
            raise UserError(f"quant: unknown w_round {self.w_round!r}; known: nearest, adaround")
        if self.adaround_iters < 1:
            raise UserError(f"quant: adaround_iters must be >= 1, got {self.adaround_iters}")


def quantizable(net: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the Conv2d/Linear modules to quantize under ``cfg``'s keep-in-fp32 options."""
    names = []
    for name, m in net.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if cfg.keep_first_last and name in ("conv_in", "conv_out"):
            continue
        if cfg.keep_time and name.startswith(("time_embedding", "class_embedding")):
            continue
        names.append(name)
    return names


def _set_module(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


def _group_hook(T: int, groups: int):
    def pre(net, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        x = args[0] if args else kwargs["sample"]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]) if torch.as_tensor(t).numel() == 1 \
            else torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        g = torch.clamp((t.clamp(min=0) * groups / T).long(), 0, groups - 1)
        for m in net.modules():
            if isinstance(m, QuantLayer):
                m.group = g
    return pre


def wrap_network(net: nn.Module, cfg: QuantConfig, names: list[str], T: int) -> nn.Module:
    """Replace the named layers by :class:`QuantLayer` and install the timestep-group pre-hook."""
    for name in names:
        m = net.get_submodule(name)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise UserError(f"quant record: {name} is {type(m).__name__}, not Conv2d/Linear")
        _set_module(net, name, QuantLayer(m, cfg.w_bits, cfg.a_bits, cfg.per_channel, cfg.t_groups))
    net.register_forward_pre_hook(_group_hook(T, cfg.t_groups), with_kwargs=True)
    return net


def _replay_quant(net: nn.Module, rec: dict) -> nn.Module:
    return wrap_network(net, QuantConfig(**rec["config"]), list(rec["modules"]), int(rec["T"]))


register_surgery("quant", _replay_quant)


# --- calibration-set collectors ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibConfig:
    collector: str = "ndtc"  # uniform | qdiff | ndtc | real
    n: int = 256  # calibration samples (x_t, t)
    steps: int = 50  # DDIM steps of the full-precision trajectories the samples are taken from
    spacing: str = "leading"  # their timestep spacing (uniform, qdiff; ndtc walks its own linear grid)
    interval: int = 5  # qdiff: every c-th step of the trajectory
    mu: float = 0.4  # ndtc: mean of t as a fraction of T
    sigma: float = 0.4  # ndtc: standard deviation of t as a fraction of T
    batch_size: int = 128  # trajectories run in batches of this many
    seed: int = 0


class _Recorder(nn.Module):
    """Wraps a network: every evaluation's input (x_t, t) is appended to ``calls``."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).clone()))
        return call_network(self.net, x, t)


def fp_trajectories(denoiser: Denoiser, shape, cfg: CalibConfig, n_traj: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The FP model's own DDIM trajectories (via leandiff.sample): one (x_t, t) batch per step."""
    from ..sample import SampleConfig, sample_all

    rec = _Recorder(denoiser.net)
    d = Denoiser(rec, denoiser.schedule, denoiser.parameterization)
    sample_all(d, shape, SampleConfig(solver="ddim", nfe=cfg.steps, spacing=cfg.spacing, n=n_traj, seed=cfg.seed,
                                      batch_size=cfg.batch_size))
    per_batch = [rec.calls[i:i + cfg.steps] for i in range(0, len(rec.calls), cfg.steps)]
    # step i of every batch together
    return [(torch.cat([b[i][0] for b in per_batch]), torch.cat([b[i][1] for b in per_batch])) for i in range(cfg.steps)]


def collect_uniform(denoiser, shape, cfg: CalibConfig, images=None):
    """Timesteps uniform along the FP sampling trajectories: n (sample, step) pairs drawn uniformly."""
    traj = fp_trajectories(denoiser, shape, cfg, n_traj=max(1, math.ceil(cfg.n / cfg.steps) * 4))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    m = traj[0][0].shape[0]
    steps = torch.randint(0, len(traj), (cfg.n,), generator=g)
    rows = torch.randint(0, m, (cfg.n,), generator=g)
    return torch.stack([traj[s][0][r] for s, r in zip(steps, rows)]), torch.stack([traj[s][1][r] for s, r in zip(steps, rows)])


def collect_qdiff(denoiser, shape, cfg: CalibConfig, images=None):
    """Q-Diffusion time-step-aware calibration (Li et al. 2023, §4.2): every c-th step of the FP
    sampling trajectory, the same number of samples at each selected step."""
    chosen = list(range(0, cfg.steps, cfg.interval))
    per = max(1, cfg.n // len(chosen))
    traj = fp_trajectories(denoiser, shape, cfg, n_traj=per)
    xs = torch.cat([traj[i][0][:per] for i in chosen])
    ts = torch.cat([traj[i][1][:per] for i in chosen])
    return xs[:cfg.n], ts[:cfg.n]


def ndtc_timesteps(T: int, cfg: CalibConfig, g: torch.Generator) -> torch.Tensor:
    """PTQ4DM Alg. 1 lines 3–5: t_i ~ N(μ, σ²), t_i = ⌊t_i⌋, t_i = clamp(t_i, 0, T − 1)
    (the slides write Clamp(0, T); with 0-based integer timesteps the last one is T − 1)."""
    t = torch.randn(cfg.n, generator=g) * cfg.sigma * T + cfg.mu * T
    return torch.clamp(torch.floor(t), 0, T - 1)


@torch.no_grad()
def collect_ndtc(denoiser, shape, cfg: CalibConfig, images=None):
    """PTQ4DM normally distributed time-step calibration (Shang et al. 2023, Alg. 1): each sample
    is produced by the FP model denoising from T down to its own t_i. The paper runs all ancestral
    steps T..t_i; to keep calibration cheap we take ``steps`` DDIM (η = 0) steps from T−1 to t_i,
    per sample (t is a per-sample vector, so one batch holds many different t_i)."""
    T = denoiser.schedule.T
    g = torch.Generator().manual_seed(cfg.seed)
    t_end = ndtc_timesteps(T, cfg, g)
    xs = []
    for b0 in range(0, cfg.n, cfg.batch_size):
        te = t_end[b0:b0 + cfg.batch_size]
        x = torch.randn((te.shape[0], *shape), generator=g)
        k = max(1, cfg.steps)
        grid = [(T - 1) + (te - (T - 1)) * j / k for j in range(k + 1)]  # per-sample linear t from T−1 to t_i
        for j in range(k):
            t, s = torch.round(grid[j]), torch.round(grid[j + 1])
            eps, x0 = denoiser.predict(x, t)
            a_s, s_s = alpha_sigma(denoiser.schedule, s)
            x = a_s.to(x.dtype).reshape(-1, 1, 1, 1) * x0 + s_s.to(x.dtype).reshape(-1, 1, 1, 1) * eps  # DDIM step (η = 0) to s
        xs.append(x)
    return denoiser.net_input(torch.cat(xs), t_end)


def collect_real(denoiser, shape, cfg: CalibConfig, images=None):
    """Baseline (not data-free): real training images noised by q_sample at uniform t."""
    if images is None:
        raise UserError("quant: calib=real needs training images (give --dataset)")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(0, images.shape[0], (cfg.n,), generator=g)
    t = torch.randint(0, denoiser.schedule.T, (cfg.n,), generator=g).float()
    noise = torch.randn((cfg.n, *shape), generator=g)
    return denoiser.net_input(q_sample(denoiser.schedule, images[idx], t, noise), t)


COLLECTORS: dict[str, Callable] = {"uniform": collect_uniform, "qdiff": collect_qdiff, "ndtc": collect_ndtc,
                                   "real": collect_real}


def collect(denoiser: Denoiser, shape, cfg: CalibConfig, images=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration set of collector ``cfg.collector``: the network's own inputs [N, C, H, W] and t [N]
    (x_t itself, or what :meth:`Denoiser.net_input` makes of it for a preconditioned parameterization)."""
    if cfg.collector not in COLLECTORS:
        raise UserError(f"quant: unknown calibration collector {cfg.collector!r}; known: {', '.join(COLLECTORS)}")
    if cfg.n < 1:
        raise UserError(f"quant: calibration size must be >= 1, got {cfg.n}")
    with torch.no_grad():
        return COLLECTORS[cfg.collector](denoiser, shape, cfg, images)


# --- calibrate and quantize -------------------------------------------------------------------------------------------

@torch.no_grad()
def calibrate(net: nn.Module, calib: tuple[torch.Tensor, torch.Tensor], cfg: QuantConfig, batch_size: int = 64) -> None:
    """Set every QuantLayer's weight scale and its activation scale per timestep group from the
    full-precision activations the calibration set produces."""
    layers = [m for m in net.modules() if isinstance(m, QuantLayer)]
    for m in layers:
        m.w_scale.copy_(weight_scale(m.inner.weight, m.w_bits, m.per_channel, cfg.w_observer))
        m.record = []
    xs, ts = calib
    try:
        for b0 in range(0, xs.shape[0], batch_size):
            call_network(net, xs[b0:b0 + batch_size], ts[b0:b0 + batch_size])
        obs = OBSERVERS[cfg.observer]
        for m in layers:
            groups = torch.cat([g if g is not None and g.numel() == v.shape[0] else torch.zeros(v.shape[0], dtype=torch.long)
                                for g, v in m.record])
            vals = [v for _, v in m.record]
            width = min(v.shape[1] for v in vals)
            vals = torch.cat([v[:, :width] if v.shape[1] == width else torch.cat([v[:, :width - 2], v[:, -2:]], 1) for v in vals])
            everything = obs(vals.flatten(), m.a_bits)
            for gi in range(m.a_scale.numel()):
                sel = vals[groups == gi]
                lo, hi = obs(sel.flatten(), m.a_bits) if sel.numel() else everything  # empty group: global range
                s, z = affine_params(lo, hi, m.a_bits)
                m.a_scale[gi], m.a_zero[gi] = s, z
    finally:
        for m in layers:
            m.record = None


# --- AdaRound ----------------------------------------------------------------------------------------------------------

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Nagel et al. 2020, eq. 23)


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1): a soft rounding offset in [0, 1] that can reach 0 and 1 exactly."""
    return (torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA).clamp(0, 1)


def adaround_layer(layer: "QuantLayer", inputs: torch.Tensor, iters: int = 400, batch: int = 16, lam: float = 0.01,
                   lr: float = 1e-2, seed: int = 0) -> dict:
    """Learn whether each weight rounds up or down (AdaRound, Nagel et al. 2020, eq. 21–25).

    ŵ = s·clip(⌊w/s⌋ + h(V), c_min, c_max) with V initialised so that h(V) = w/s − ⌊w/s⌋ (ŵ = w at the
    start), minimising ‖f(x; w) − f(x; ŵ)‖² over the layer's full-precision calibration inputs x plus
    λ·Σ(1 − |2h(V) − 1|^β), β annealed from 20 to 2 after a 20 % warm-up (no regulariser), which
    drives every h to 0 or 1. The result is written into the layer's weight as the rounded grid value
    s·clip(⌊w/s⌋ + 1[h ≥ ½]), which the layer's nearest rounding then reproduces exactly, so a
    checkpoint needs no extra tensors. Should the learned rounding come out worse than nearest on the
    check batch (too few iterations), nearest is kept. Returns both output MSEs and the fraction flipped."""
    inner = layer.inner
    w = inner.weight.detach()
    s = layer.w_scale.reshape((-1,) + (1,) * (w.ndim - 1))
    c_min, c_max = int_range(layer.w_bits, True)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
    v = torch.log((rest - ADAROUND_GAMMA) / (ADAROUND_ZETA - rest)).requires_grad_(True)  # h(V) = rest
    opt = torch.optim.Adam([v], lr=lr)

    g = torch.Generator().manual_seed(seed)
    warm = int(0.2 * iters)
    for it in range(iters):
        x = inputs[torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=g)]
        with torch.no_grad():
            target = layer_op(inner, x, w)
        h = _rect_sigmoid(v)
        loss = (layer_op(inner, x, s * (w_floor + h).clamp(c_min, c_max)) - target).pow(2).mean()
        if it >= warm:
            beta = 20 + (2 - 20) * (it - warm) / max(1, iters - warm)  # linear decay 20 -> 2
            loss = loss + lam * (1 - (2 * h - 1).abs().pow(beta)).sum() / w.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = s * (w_floor + (v >= 0).to(w.dtype)).clamp(c_min, c_max)  # h(V) ≥ ½ ⇔ V ≥ 0 (ζ + γ = 1)
        nearest = fake_quant(w, s, 0.0, c_min, c_max)
        x = inputs[:min(64, inputs.shape[0])]
        target = layer_op(inner, x, w)
        err = {"mse_nearest": (layer_op(inner, x, nearest) - target).pow(2).mean().item(),
               "mse_adaround": (layer_op(inner, x, hard) - target).pow(2).mean().item()}
        if err["mse_adaround"] > err["mse_nearest"]:  # too few iterations to converge: keep nearest rounding
            hard, err["mse_adaround"], err["kept_nearest"] = nearest, err["mse_nearest"], True
        err["flipped"] = float((hard != nearest).float().mean())
        inner.weight.copy_(hard)
    return err


@torch.no_grad()
def _layer_inputs(net: nn.Module, layers: list, calib, batch_size: int = 64, keep: int = 256) -> dict:
    """Each QuantLayer's full-precision input on the first ``keep`` calibration samples."""
    store: dict = {m: [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: store[mod].append(args[0].detach().clone()))
             for m in layers]
    saved = [(m, m.record) for m in layers]
    try:
        for m in layers:
            m.record = []  # calibration mode: the layers run in full precision
        xs, ts = calib
        for b0 in range(0, min(keep, xs.shape[0]), batch_size):
            call_network(net, xs[b0:b0 + batch_size][:keep - b0], ts[b0:b0 + batch_size][:keep - b0])
    finally:
        for h in hooks:
            h.remove()
        for m, r in saved:
            m.record = r
    return {m: torch.cat(v) for m, v in store.items()}


@torch.no_grad()
def correct_bias(layers: dict, inputs: dict, fp_weights: dict) -> dict:
    """Empirical bias correction (Nagel et al. 2019, "Data-free quantization", §4.2, with the expectation
    taken over calibration data): quantization shifts a layer's mean output per channel,
    E[f̂(x)] − E[f(x)]; subtract that shift from the bias. f̂ is the quantized layer as it runs (weights
    and input activations quantized), f the full-precision one (``fp_weights``: its weights before any
    AdaRound), x the layer's full-precision inputs on the calibration set (``inputs``, from
    :func:`_layer_inputs`); the mean is over samples and positions. Systematic shifts matter more than
    their size suggests in a sampler, which adds the same error at every step (a grey background).
    ``layers``: name -> QuantLayer. Layers without a bias are left as they are. Returns name -> the
    largest |shift| removed."""
    report = {}
    for name, m in layers.items():
        if m.inner.bias is None:
            continue
        x, w = inputs[m], fp_weights[m]
        saved, m.group = m.group, None  # one shift for every timestep group
        ch = 1 if isinstance(m.inner, nn.Conv2d) else -1  # the output-channel dimension
        total, count = torch.zeros_like(m.inner.bias), 0
        for b0 in range(0, x.shape[0], 64):
            xb = x[b0:b0 + 64]
            d = (m(xb) - layer_op(m.inner, xb, w)).movedim(ch, -1).reshape(-1, m.inner.bias.numel())
            total, count = total + d.sum(dim=0), count + d.shape[0]
        m.group = saved
        shift = total / count
        m.inner.bias.sub_(shift)
        report[name] = float(shift.abs().max())
    return report


def adaround(layers: dict, inputs: dict, cfg: QuantConfig, log=None) -> dict:
    """AdaRound every QuantLayer (``layers``: name -> layer), one at a time, on its full-precision
    calibration inputs (``inputs``, from :func:`_layer_inputs`)."""
    report = {}
    with torch.enable_grad():
        for i, (name, m) in enumerate(layers.items()):
            report[name] = r = adaround_layer(m, inputs[m], iters=cfg.adaround_iters, seed=i)
            if log:
                log(f"adaround {name}: output MSE {r['mse_nearest']:.3e} -> {r['mse_adaround']:.3e}")
    return report


def fake_quantize(ckpt, qcfg: QuantConfig, ccfg: CalibConfig, images=None):
    """A copy of ``ckpt`` with fake-quantized layers calibrated on collector ``ccfg`` (a simulation)."""
    from ..checkpoint import Checkpoint
    from ..models import image_shape

    fp = ckpt.net.float().eval()
    shape = image_shape(ckpt.arch)
    calib = collect(Denoiser(fp, ckpt.schedule, ckpt.parameterization), shape, ccfg, images)
    net = copy.deepcopy(fp)
    names = quantizable(net, qcfg)
    wrap_network(net, qcfg, names, ckpt.schedule.T)
    calibrate(net, calib, qcfg)  # weight scales from the observer, activation scales
    rounding = corrected = None
    if qcfg.w_round == "adaround" or qcfg.bias_correction:
        layers = {n: m for n, m in net.named_modules() if isinstance(m, QuantLayer)}
        inputs = _layer_inputs(net, list(layers.values()), calib)  # full precision, before any change
        fp_weights = {m: m.inner.weight.detach().clone() for m in layers.values()}
        if qcfg.w_round == "adaround":
            rounding = adaround(layers, inputs, qcfg)
        if qcfg.bias_correction:
            corrected = correct_bias(layers, inputs, fp_weights)
    arch = copy.deepcopy(ckpt.arch)
    arch.setdefault("surgery", []).append({"kind": "quant", "config": asdict(qcfg), "modules": names, "T": ckpt.schedule.T})
    meta = copy.deepcopy(ckpt.meta)
    meta["runtime"] = "fake-quant"
    meta["quant"] = {"mode": "fake-quant (simulation, no speed-up)", **asdict(qcfg), "calibration": asdict(ccfg)}
    if rounding is not None:
        meta["quant"]["adaround"] = rounding
    if corrected is not None:
        meta["quant"]["bias_correction_max_shift"] = corrected
    return Checkpoint(net.eval(), arch, ckpt.schedule, ckpt.parameterization, meta)


def fake_quant_runtime(ckpt) -> nn.Module:
    """The checkpoint's network as it is (its QuantLayers simulate low-bit arithmetic in fp32)."""
    if not any(isinstance(m, QuantLayer) for m in ckpt.net.modules()):
        raise UserError("runtime fake-quant needs a checkpoint quantized by quant(runtime=fake)")
    return eager(ckpt)


register_runtime("fake-quant", fake_quant_runtime,
                 "fake-quant SIMULATION in fp32 (measures quality of low-bit arithmetic; no speed-up)")


def dynamic_int8(ckpt) -> nn.Module:
    """PyTorch dynamic int8 (torch.ao quantize_dynamic: Linear layers only, weights int8, activations
    quantized per call) — the L-Diff paper's method, a baseline. Conv2d stays fp32."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(ckpt.net.float().eval()), {nn.Linear}, dtype=torch.qint8)


register_runtime("dynamic-int8", dynamic_int8, "PyTorch dynamic int8 (Linear layers only; L-Diff's baseline)")


# --- the recipe step --------------------------------------------------------------------------------------------------

QUANT_RUNTIMES = ("fake", "ort-int8")


def _check_args(args: dict) -> None:
    """The quant step's values, checked when the recipe is parsed (before earlier steps spend their time)."""
    if args["runtime"] not in QUANT_RUNTIMES:
        raise UserError(f"quant: runtime must be one of {', '.join(QUANT_RUNTIMES)}, got {args['runtime']!r} "
                        f"(dynamic int8 and ort fp32 are runtimes: --runtime dynamic-int8 / ort)")
    if args["steps"] < 0 or args["interval"] < 1 or args["n"] < 1:
        raise UserError(f"quant: steps must be >= 0 (0: the checkpoint's own), interval and n >= 1; "
                        f"got steps={args['steps']}, interval={args['interval']}, n={args['n']}")
    if args["spacing"] not in SPACINGS:  # used by the trajectory collectors (uniform, qdiff)
        raise UserError(f"quant: unknown spacing {args['spacing']!r}; expected one of {', '.join(SPACINGS)}")
    if args["calib"] not in COLLECTORS:
        raise UserError(f"quant: unknown calib {args['calib']!r}; known: {', '.join(COLLECTORS)}")
    if args["runtime"] == "ort-int8":
        if (args["w"], args["a"]) != (8, 8) or args["t_groups"] != 1 or args["w_round"] != "nearest" \
                or args["bias_correction"]:
            raise UserError("quant: runtime=ort-int8 is W8A8 with one activation scale (t_groups=1) and "
                            "ONNX Runtime's own rounding (w_round=nearest, no bias_correction)")
        if args["observer"] not in ("minmax", "percentile") or args["w_observer"] != "minmax":
            raise UserError(f"quant: runtime=ort-int8 calibrates activations with observer=minmax|percentile "
                            f"(ONNX Runtime's calibrators) and weights with minmax; got observer={args['observer']}, "
                            f"w_observer={args['w_observer']}")
    else:
        QuantConfig(w_bits=args["w"], a_bits=args["a"], per_channel=args["per_channel"], observer=args["observer"],
                    w_observer=args["w_observer"], keep_first_last=args["keep_first_last"],
                    keep_time=args["keep_time"], t_groups=args["t_groups"], w_round=args["w_round"],
                    adaround_iters=args["adaround_iters"], bias_correction=args["bias_correction"])


@register_step("quant", {"w": 8, "a": 8, "calib": "ndtc", "runtime": "fake", "n": 256, "steps": 0,
                         "spacing": "leading", "interval": 5, "mu": 0.4, "sigma": 0.4, "observer": "minmax", "w_observer": "minmax",
                         "per_channel": True, "keep_first_last": True, "keep_time": True, "t_groups": 1,
                         "w_round": "nearest", "adaround_iters": 400, "bias_correction": False},
               help="post-training quantization: fake-quant simulation (any bits) or real int8 via ONNX Runtime",
               validate=_check_args)
def quant_step(ckpt, args, ctx):
    _check_args(args)
    # steps=0: calibrate on as many DDIM steps as the model is deployed with (a distilled student
    # records its few steps; every step of so short a trajectory is used by qdiff), else 50.
    # The spacing defaults to leading even for a trailing-spaced student: the trailing grid's t=999
    # step (pure noise) stretches the min-max activation ranges (measured in docs/quantization.md).
    steps, interval = args["steps"], args["interval"]
    if steps == 0:
        steps = ckpt.sampling_defaults()[1]  # the recorded NFE, else 50
        interval = min(interval, max(1, steps // 4))
    ccfg = CalibConfig(collector=args["calib"], n=args["n"], steps=steps, spacing=args["spacing"], interval=interval,
                       mu=args["mu"], sigma=args["sigma"], seed=ctx.seed)
    images = None
    if ccfg.collector == "real":
        if not ctx.dataset:
            raise UserError("quant: calib=real needs --dataset")
        from ..data import load_dataset
        from ..models import image_shape
        images = load_dataset(ctx.dataset, "train", ctx.data_dir, shape=image_shape(ckpt.arch)).images
    if args["runtime"] == "ort-int8":
        from .onnx import quantize_ort_int8
        return quantize_ort_int8(ckpt, ccfg, ctx.step_dir, images=images, per_channel=args["per_channel"],
                                 keep_first_last=args["keep_first_last"], keep_time=args["keep_time"],
                                 observer=args["observer"])
    qcfg = QuantConfig(w_bits=args["w"], a_bits=args["a"], per_channel=args["per_channel"], observer=args["observer"],
                       w_observer=args["w_observer"], keep_first_last=args["keep_first_last"],
                       keep_time=args["keep_time"], t_groups=args["t_groups"], w_round=args["w_round"],
                       adaround_iters=args["adaround_iters"], bias_correction=args["bias_correction"])
    return fake_quantize(ckpt, qcfg, ccfg, images)


from . import onnx as _onnx  # noqa: E402,F401  (registers the ort, ort-int8 and compile runtimes)
