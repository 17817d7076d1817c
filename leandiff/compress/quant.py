"""Post-training quantization of diffusion networks: the research path (fake-quant, any bit width),
AdaRound and bias correction, and the ``quant`` recipe step.

Fake quantization (quantize-dequantize in fp32) *simulates* low-bit arithmetic to measure its cost
in quality. It saves no time and is always labelled as a simulation (runtime ``fake-quant``); real
int8 execution is :mod:`leandiff.compress.onnx` (runtime ``ort-int8``).

Pieces, each a small strategy in a dict registry (the quantizer, observers and :class:`QuantLayer` live
in :mod:`leandiff.surgery.quant`, the collectors in :mod:`leandiff.compress.calibration`):

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
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..data import load_dataset
from ..denoiser import Denoiser, call_network
from ..errors import UserError
from ..models import image_shape
from ..schedule import SPACINGS
from ..surgery.quant import (OBSERVERS, QuantConfig, QuantLayer, affine_params, fake_quant, int_range,  # noqa: F401
                             check_keep, layer_op, parse_keep, quantizable, weight_scale, wrap_network)
from .adaround import adaround, adaround_layer, correct_bias, layer_inputs  # noqa: F401
from .calibration import COLLECTORS, CalibConfig, collect  # noqa: F401
from .artifacts import calibration_inputs
from .onnx import OrtNetwork, export_onnx, quantize_onnx_int8, quantize_ort_int8
from .openvino import OV_OBSERVERS, OvNetwork, check_groupnorm, check_scope, convert, quantize_ir_int8, quantize_openvino_int8, require
from .sensitivity import candidates, choose_keep



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
            groups = torch.cat([g if g is not None and g.numel() == v.shape[0]
                                else torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
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


def fake_quantize(ckpt, qcfg: QuantConfig, ccfg: CalibConfig, images=None):
    """A copy of ``ckpt`` with fake-quantized layers calibrated on collector ``ccfg`` (a simulation)."""
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
        inputs = layer_inputs(net, list(layers.values()), calib)  # full precision, before any change
        fp_weights = {m: m.inner.weight.detach().clone() for m in layers.values()}
        if qcfg.w_round == "adaround":
            rounding = adaround(layers, inputs, qcfg)
        if qcfg.bias_correction:
            corrected = correct_bias(layers, inputs, fp_weights)
    arch = copy.deepcopy(ckpt.arch)
    arch.setdefault("surgery", []).append({"kind": "quant", "config": asdict(qcfg), "modules": names, "T": ckpt.schedule.T})
    meta = copy.deepcopy(ckpt.meta)
    meta["runtime"] = {"name": "fake-quant", "args": {}}
    meta["quant"] = {"mode": "fake-quant (simulation, no speed-up)", **asdict(qcfg), "calibration": asdict(ccfg)}
    if rounding is not None:
        meta["quant"]["adaround"] = rounding
    if corrected is not None:
        meta["quant"]["bias_correction_max_shift"] = corrected
    return Checkpoint(net.eval(), arch, ckpt.schedule, ckpt.parameterization, meta)


def fake_quant_runtime(ckpt, _=None) -> nn.Module:
    """The checkpoint's network as it is (its QuantLayers simulate low-bit arithmetic in fp32)."""
    if not any(isinstance(m, QuantLayer) for m in ckpt.net.modules()):
        raise UserError("runtime fake-quant needs a checkpoint quantized by quant(runtime=fake)")
    return ckpt.net.float().eval()



def dynamic_int8(ckpt, _=None) -> nn.Module:
    """PyTorch dynamic int8 (torch.ao quantize_dynamic: Linear layers only, weights int8, activations
    quantized per call) — the L-Diff paper's method, a baseline. Conv2d stays fp32."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(ckpt.net.float().eval()), {nn.Linear}, dtype=torch.qint8)



# --- the recipe step --------------------------------------------------------------------------------------------------

QUANT_RUNTIMES = ("fake", "ort-int8", "openvino-int8")


@dataclass(frozen=True)
class QuantStep:
    """``quant(...)``: the step's arguments; checked when the recipe is parsed (before earlier steps spend
    their time)."""

    w: int = 8  # weight bits
    a: int = 8  # activation bits
    calib: str = "ndtc"  # calibration collector: uniform | qdiff | ndtc | real
    runtime: str = "fake"  # fake (simulation, any bits) | ort-int8 | openvino-int8 (real int8 kernels, W8A8)
    n: int = 256  # calibration samples
    steps: int = 0  # DDIM steps of the calibration trajectories (0: the checkpoint's own NFE, else 50)
    spacing: str = "leading"  # their timestep spacing (uniform, qdiff)
    interval: int = 5  # qdiff: every c-th step
    mu: float = 0.4  # ndtc: mean of t / T
    sigma: float = 0.4  # ndtc: standard deviation of t / T
    observer: str = "minmax"  # activation range estimator
    w_observer: str = "minmax"  # weight range estimator
    per_channel: bool = True  # weight scale per output channel
    keep_first_last: bool = True  # conv_in / conv_out stay full precision
    keep_time: bool = True  # the time-embedding MLP stays full precision
    keep: str = ""  # more modules kept full precision: paths joined by "+" (down_blocks.0+up_blocks.2), or auto
    keep_tol: float = 1e-3  # keep=auto: largest relative output error of the int8 model on held-out inputs
    keep_max: int = 3  # keep=auto: at most this many blocks kept
    scope: str = "gemm"  # openvino-int8: quantizers at the GEMM inputs only, or NNCF's own placement (nncf)
    groupnorm: str = "reduce"  # openvino-int8: GroupNorm as per-channel reductions, or OpenVINO's op (ov)
    t_groups: int = 1  # activation scales per timestep group
    w_round: str = "nearest"  # nearest | adaround
    adaround_iters: int = 400  # AdaRound steps per layer
    bias_correction: bool = False  # remove each layer's mean output shift (Nagel et al. 2019; openvino-int8: NNCF's)

    def __post_init__(self):
        if self.runtime not in QUANT_RUNTIMES:
            raise UserError(f"quant: runtime must be one of {', '.join(QUANT_RUNTIMES)}, got {self.runtime!r} "
                            f"(dynamic int8 and ort fp32 are runtimes: --runtime dynamic-int8 / ort)")
        if self.steps < 0 or self.interval < 1 or self.n < 1:
            raise UserError(f"quant: steps must be >= 0 (0: the checkpoint's own), interval and n >= 1; "
                            f"got steps={self.steps}, interval={self.interval}, n={self.n}")
        if self.spacing not in SPACINGS:  # used by the trajectory collectors (uniform, qdiff)
            raise UserError(f"quant: unknown spacing {self.spacing!r}; expected one of {', '.join(SPACINGS)}")
        if self.calib not in COLLECTORS:
            raise UserError(f"quant: unknown calib {self.calib!r}; known: {', '.join(COLLECTORS)}")
        if self.keep == "auto":
            if self.runtime == "fake":
                raise UserError("quant: keep=auto measures a real int8 backend: use runtime=ort-int8 or openvino-int8 "
                                "(or name the modules: keep=down_blocks.0+up_blocks.2)")
            if not self.keep_tol > 0 or self.keep_max < 0:
                raise UserError(f"quant: keep_tol must be > 0 and keep_max >= 0; got {self.keep_tol}, {self.keep_max}")
        else:
            parse_keep(self.keep)
        check_scope(self.scope, "quant")
        if self.scope != "gemm" and self.runtime != "openvino-int8":
            raise UserError(f"quant: scope={self.scope} places NNCF's quantizers: it needs runtime=openvino-int8")
        check_groupnorm(self.groupnorm, "quant")
        if self.groupnorm != "reduce" and self.runtime != "openvino-int8":
            raise UserError(f"quant: groupnorm={self.groupnorm} is how OpenVINO gets GroupNorm: it needs runtime=openvino-int8")
        if self.runtime == "ort-int8":
            if (self.w, self.a) != (8, 8) or self.t_groups != 1 or self.w_round != "nearest" or self.bias_correction:
                raise UserError("quant: runtime=ort-int8 is W8A8 with one activation scale (t_groups=1) and "
                                "ONNX Runtime's own rounding (w_round=nearest, no bias_correction)")
            if self.observer not in ("minmax", "percentile") or self.w_observer != "minmax":
                raise UserError(f"quant: runtime=ort-int8 calibrates activations with observer=minmax|percentile "
                                f"(ONNX Runtime's calibrators) and weights with minmax; got observer={self.observer}, "
                                f"w_observer={self.w_observer}")
        elif self.runtime == "openvino-int8":
            if (self.w, self.a) != (8, 8) or self.t_groups != 1 or self.w_round != "nearest" or not self.per_channel:
                raise UserError("quant: runtime=openvino-int8 is W8A8, per-channel weights, one activation scale "
                                "(t_groups=1) and NNCF's own rounding (w_round=nearest); bias_correction=true runs "
                                "NNCF's fast bias correction")
            if self.observer not in OV_OBSERVERS or self.w_observer != "minmax":
                raise UserError(f"quant: runtime=openvino-int8 calibrates activations with observer="
                                f"{'|'.join(OV_OBSERVERS)} and weights with minmax; got observer={self.observer}, "
                                f"w_observer={self.w_observer}")
            require("openvino", "quant(runtime=openvino-int8)")  # before earlier steps spend their time
            require("nncf", "quant(runtime=openvino-int8)")
        else:
            self.quant_config()

    def quant_config(self) -> QuantConfig:
        return QuantConfig(w_bits=self.w, a_bits=self.a, per_channel=self.per_channel, observer=self.observer,
                           w_observer=self.w_observer, keep_first_last=self.keep_first_last, keep_time=self.keep_time,
                           keep=() if self.keep == "auto" else parse_keep(self.keep), t_groups=self.t_groups, w_round=self.w_round, adaround_iters=self.adaround_iters,
                           bias_correction=self.bias_correction)


def deployed_steps(ckpt, fallback: int = 50) -> int:
    """The NFE a few-step model is bound to (a distilled student records it in meta["sampler"]), else
    ``fallback``. A sampler a model card recommends (source "card") is not a property of the network."""
    rec = ckpt.meta.get("sampler") if isinstance(ckpt.meta.get("sampler"), dict) else {}
    return int(rec["nfe"]) if rec.get("nfe") and rec.get("source") != "card" else fallback


def auto_keep(ckpt, cfg: QuantStep, ccfg: CalibConfig, images=None, log=print):
    """keep=auto: the blocks :func:`~leandiff.compress.sensitivity.choose_keep` picks by quantizing with the
    step's own backend; held out: a second draw of the collector (seed + 1, at most 64 inputs)."""
    calib = calibration_inputs(ckpt, ccfg, images)
    held_out = calibration_inputs(ckpt, replace(ccfg, n=min(64, ccfg.n), seed=ccfg.seed + 1), images)
    count = iter(range(10 ** 6))
    with tempfile.TemporaryDirectory(prefix="leandiff-keep-") as d:
        if cfg.runtime == "ort-int8":
            fp32 = export_onnx(ckpt, Path(d) / "fp32.onnx")

            def build(keep):
                return OrtNetwork(quantize_onnx_int8(fp32, Path(d) / f"q{next(count)}.onnx", calib, cfg.per_channel,
                                                     cfg.keep_first_last, cfg.keep_time, cfg.observer, keep))
        else:
            model = convert(ckpt, groupnorm=cfg.groupnorm)

            def build(keep):
                return OvNetwork(quantize_ir_int8(model, Path(d) / f"q{next(count)}.xml", calib, cfg.keep_first_last,
                                                  cfg.keep_time, cfg.observer, keep, cfg.scope, cfg.bias_correction))
        return choose_keep(build, ckpt.net.float().eval(), held_out, candidates(ckpt.net), cfg.keep_tol, cfg.keep_max, log)


def quant_step(ckpt, cfg: QuantStep, ctx):
    """Post-training quantization: fake-quant simulation (any bits) or real int8 via ONNX Runtime or
    OpenVINO (NNCF)."""
    # steps=0: calibrate on as many DDIM steps as the model is deployed with (a distilled student
    # records its few steps; every step of so short a trajectory is used by qdiff), else 50. A sampler
    # a model card recommends (source "card") is not a property of the network and does not count.
    # The spacing defaults to leading even for a trailing-spaced student: the trailing grid's t=999
    # step (pure noise) stretches the min-max activation ranges (measured in docs/quantization.md).
    steps, interval = cfg.steps, cfg.interval
    if steps == 0:
        steps = deployed_steps(ckpt)
        interval = min(interval, max(1, steps // 4))
    ccfg = CalibConfig(collector=cfg.calib, n=cfg.n, steps=steps, spacing=cfg.spacing, interval=interval,
                       mu=cfg.mu, sigma=cfg.sigma, seed=ctx.seed)
    keep = () if cfg.keep == "auto" else parse_keep(cfg.keep)
    check_keep(ckpt.net, keep)
    images = None
    if ccfg.collector == "real":
        if not ctx.dataset:
            raise UserError("quant: calib=real needs --dataset")
        images = load_dataset(ctx.dataset, "train", ctx.data_dir, shape=image_shape(ckpt.arch)).images
    if cfg.keep == "auto":
        keep, trace = auto_keep(ckpt, cfg, ccfg, images)
        out = quant_step(ckpt, replace(cfg, keep="+".join(keep)), ctx)
        out.meta["quant"]["keep_auto"] = {"tol": cfg.keep_tol, "max_keep": cfg.keep_max, "trace": trace}
        return out
    if cfg.runtime == "ort-int8":
        return quantize_ort_int8(ckpt, ccfg, ctx.step_dir, images=images, per_channel=cfg.per_channel,
                                 keep_first_last=cfg.keep_first_last, keep_time=cfg.keep_time,
                                 observer=cfg.observer, keep=keep)
    if cfg.runtime == "openvino-int8":
        return quantize_openvino_int8(ckpt, ccfg, ctx.step_dir, images=images, keep_first_last=cfg.keep_first_last,
                                      keep_time=cfg.keep_time, observer=cfg.observer, keep=keep, scope=cfg.scope,
                                      bias_correction=cfg.bias_correction, groupnorm=cfg.groupnorm)
    return fake_quantize(ckpt, cfg.quant_config(), ccfg, images)

