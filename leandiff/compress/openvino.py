"""OpenVINO runtimes and NNCF post-training int8: the tool a CPU user would pick first, on equal terms.

- runtime ``openvino``: the OpenVINO CPU plugin in fp32 (its precision hint pinned to f32: on a CPU
  with bf16 the plugin otherwise runs fp32 models in bf16 by default);
- runtime ``openvino-bf16``: the same model with the bf16 precision hint (refused on a CPU without bf16);
- runtime ``openvino-int8``: the model quantized by NNCF's post-training quantization
  (``nncf.quantize``: MIXED preset = asymmetric 8-bit activations, symmetric per-channel 8-bit weights;
  NNCF's bias correction off unless ``bias_correction=true``, see :func:`quantize_ir_int8`) from leandiff's own calibration collectors
  (:mod:`leandiff.compress.calibration`), with the same layers kept in full precision as the ONNX
  Runtime path (conv_in / conv_out, the time-embedding MLP); ``bf16=true`` runs the operations left
  unquantized in bf16 instead of fp32 (mixed int8/bf16). Where the quantizers go is the ``scope``
  (:data:`OV_SCOPES`): by default only at the inputs of the GEMMs (Convolution, MatMul), as leandiff's
  fake-quant path simulates; ``scope=nncf`` keeps NNCF's own placement, which also quantizes the inputs
  of Add, GroupNormalization, Concat, ... (an int8 residual stream: 6.6× the output error on
  ``zoo:mnist-small-v2``, benchmarks/results/int8_error.md, and no faster, cpu_runtimes_small.md).

Models are converted directly from the PyTorch network by ``openvino.convert_model`` (``source=torch``,
the default: SiLU and attention stay whole OpenVINO ops, measured faster than converting the ONNX export,
whose GroupNorm is a Reshape/InstanceNorm chain: benchmarks/results/cpu_runtimes.md; GroupNorm itself is
written as per-channel reductions, :class:`ReducedGroupNorm`, unless ``groupnorm=ov``), or
from the same ONNX export as the ONNX Runtime runtimes (``source=onnx``), and saved as OpenVINO IR
(``.xml`` + ``.bin``, weights kept in fp32): side files of the checkpoint (``openvino.int8.xml`` written
by ``quant(runtime=openvino-int8)``), else converted (and, for int8 with a ``calib``, calibrated) once
into the cache keyed by the weights hash. OpenVINO uses as many threads as torch (``torch.get_num_threads()``), one stream, the latency
hint. ``openvino`` and ``nncf`` are an optional extra (``pip install 'leandiff[openvino]'``); without
them these runtimes are one clear error.
"""
from __future__ import annotations

import copy
import importlib
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import MissingExtra, UserError
from ..models import image_shape
from .calibration import COLLECTORS, CalibConfig
from ..surgery.quant import QuantLayer, in_kept
from .artifacts import cache_dir, calibration_inputs, side_file
from .onnx import TensorNet, onnx_file

OV_FP32_NAME = "openvino.xml"
OV_INT8_NAME = "openvino.int8.xml"
EXTRA = "pip install 'leandiff[openvino]'"
SOURCES = ("torch", "onnx")
# modules kept in full precision (as excluded_nodes does for ORT); OpenVINO op names hold the module path,
# "__module.net.conv_in/aten::_convolution/..." from PyTorch, "/net/conv_in/Conv/..." from ONNX
_KEEP_FIRST_LAST, _KEEP_TIME = ("conv_in", "conv_out"), ("time_embedding",)
# how GroupNorm reaches OpenVINO (the ``groupnorm`` argument of the runtimes and of quant): "reduce" writes
# it as per-channel reductions (:class:`ReducedGroupNorm`), "ov" as OpenVINO's GroupNormalization op
GROUPNORMS = {"reduce": "per-channel ReduceMean + one scale/shift (no reshape of the activations)",
              "ov": "OpenVINO's GroupNormalization op"}


class ReducedGroupNorm(torch.nn.Module):
    """GroupNorm written so that OpenVINO's CPU plugin keeps the activations in the convolutions' layout.

    In bf16 and int8 models the plugin lowers GroupNormalization to Reshape [N, G, -1] → MVN → Reshape,
    which needs the planar (nchw) layout, while its convolutions run in nhwc: every GroupNorm was wrapped in
    two layout Reorders (``benchmarks/results/ov_profile.md``). Here the statistics come from per-channel
    means over the spatial axes (ReduceMean keeps any layout), averaged over each group on the small
    [N, C] tensor, and the normalisation is one per-channel scale and shift, which the plugin fuses with the
    SiLU and the quantizer that follow. The variance is the centred one (mean of (x - group mean)²), not
    E[x²] - E[x]², which cancels badly in bf16. Equal to ``torch.nn.GroupNorm`` up to rounding."""

    def __init__(self, gn: torch.nn.GroupNorm):
        super().__init__()
        self.groups, self.eps, self.affine = gn.num_groups, gn.eps, gn.affine
        self.weight, self.bias = gn.weight, gn.bias

    def _group_mean(self, m: torch.Tensor) -> torch.Tensor:  # [N, C, 1, ...] -> its group means, per channel
        n, c = m.shape[:2]
        g = m.reshape(n, self.groups, c // self.groups).mean(-1, keepdim=True)
        return g.expand(n, self.groups, c // self.groups).reshape(m.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        mean = self._group_mean(x.mean(dims, keepdim=True))
        d = x - mean
        scale = torch.rsqrt(self._group_mean((d * d).mean(dims, keepdim=True)) + self.eps)
        if self.affine:
            view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            scale = scale * self.weight.view(view)
            return d * scale + self.bias.view(view)
        return d * scale


def reduced_groupnorm(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with every ``torch.nn.GroupNorm`` replaced by a :class:`ReducedGroupNorm` sharing its
    parameters (in place; pass a copy)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(parent, name, ReducedGroupNorm(child))
    return net


def check_groupnorm(groupnorm: str, what: str = "openvino") -> str:
    if groupnorm not in GROUPNORMS:
        raise UserError(f"{what}: groupnorm must be one of {', '.join(GROUPNORMS)}, got {groupnorm!r}")
    return groupnorm


def require(module: str = "openvino", what: str = "runtime openvino"):
    """Import ``openvino`` or ``nncf``; when it is missing, one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the {module} package, which is not installed: {EXTRA}") from None


def has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels on this machine (AVX-512 BF16 or AMX)."""
    ov = require()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _save_ir(model, out: Path) -> Path:
    """Write an OpenVINO model as IR ``out`` (.xml) + its .bin, fp32 weights, atomically: both files are
    written in a temp dir beside it under their final names (the .xml finds its .bin by name), then the
    .bin and last the .xml are renamed into place (a reader checks for the .xml)."""
    ov = require()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ov-") as d:
        tmp = Path(d) / out.name
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp, out)
    return out


def convert(ckpt, source: str = "torch", groupnorm: str = "reduce"):
    """The checkpoint's network as an OpenVINO model (inputs ``x`` [B, C, H, W], ``t`` [B], dynamic batch):
    ``ov.convert_model`` of the PyTorch network itself (its GroupNorms as ``groupnorm`` says:
    :data:`GROUPNORMS`), or of its ONNX export."""
    ov = require()
    if source not in SOURCES:
        raise UserError(f"openvino: source must be one of {', '.join(SOURCES)}, got {source!r}")
    check_groupnorm(groupnorm)
    if any(isinstance(m, QuantLayer) for m in ckpt.net.modules()):
        raise UserError("openvino: fake-quant checkpoints are simulations; convert the full-precision checkpoint "
                        "and use quant(runtime=openvino-int8) for real int8")
    shape = image_shape(ckpt.arch)
    if source == "onnx":
        model = ov.convert_model(str(onnx_file(ckpt)))
    else:
        example = (torch.randn(2, *shape), torch.full((2,), 500.0))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracing warnings of diffusers' shape checks
            net = copy.deepcopy(ckpt.net).float().eval()
            model = ov.convert_model(TensorNet(reduced_groupnorm(net) if groupnorm == "reduce" else net),
                                     example_input=example)
        for port, name in zip(model.inputs, ("x", "t")):
            port.get_tensor().set_names({name})
    model.reshape({model.inputs[0]: ov.PartialShape([-1, *shape]), model.inputs[1]: ov.PartialShape([-1])})
    return model


# where NNCF puts quantizers: "gemm" ignores every op type but the GEMMs (their inputs are the only
# quantized activations; the residual adds, normalizations, concatenations and attention stay in the
# unquantized precision); "nncf" is NNCF's own pattern-based placement (MIXED preset)
OV_SCOPES = {"gemm": "inputs of Convolution/MatMul only", "nncf": "NNCF's placement (also Add, GroupNormalization, Concat, ... inputs)"}
_GEMMS = {"Convolution", "GroupConvolution", "MatMul", "Parameter", "Result", "Constant"}  # not ignored by "gemm"


def check_scope(scope: str, what: str = "openvino-int8") -> str:
    if scope not in OV_SCOPES:
        raise UserError(f"{what}: scope must be one of {', '.join(OV_SCOPES)}, got {scope!r}")
    return scope


# leandiff observer -> NNCF activation range estimator: min/max over the whole calibration set (as ORT's
# MinMax), or NNCF's quantile estimator cutting the same 0.01 % from each side as the fake-quant percentile.
OV_OBSERVERS = ("minmax", "percentile")


def quantize_ir_int8(model, out: str | Path, calib: tuple[torch.Tensor, torch.Tensor],
                     keep_first_last: bool = True, keep_time: bool = True, observer: str = "minmax",
                     keep: tuple[str, ...] = (), scope: str = "gemm", bias_correction: bool = False) -> Path:
    """NNCF post-training int8 of the OpenVINO ``model`` (:func:`convert`), calibrated on ``calib`` (the
    network's inputs x [N, C, H, W] and t [N], fed one sample at a time: NNCF's subset is counted in
    dataset items), quantizers placed by ``scope`` (:data:`OV_SCOPES`), written as OpenVINO IR ``out``.
    ``bias_correction`` runs NNCF's fast bias correction (its default; off by default here: on
    ``zoo:mnist-small-v2`` it shifts the mean of the int8 model's output by −5e-2 at t < 50, where without
    it the shift is −5e-3 — one static correction per layer does not fit activations whose mean moves
    with t)."""
    nncf = require("nncf", "quantization to openvino-int8")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if observer not in OV_OBSERVERS:
        raise UserError(f"openvino-int8: observer must be one of {', '.join(OV_OBSERVERS)}, got {observer!r}")
    xs, ts = calib
    items = [{"x": xs[i:i + 1].numpy().astype(np.float32), "t": ts[i:i + 1].numpy().astype(np.float32)}
             for i in range(xs.shape[0])]
    kept = (_KEEP_FIRST_LAST if keep_first_last else ()) + (_KEEP_TIME if keep_time else ()) + tuple(keep)
    ignored = sorted({op.get_friendly_name() for op in model.get_ops() if in_kept(op.get_friendly_name(), kept)})
    types = sorted({op.get_type_name() for op in model.get_ops()} - _GEMMS) if check_scope(scope) == "gemm" else []
    ranges = RangeEstimatorParametersSet.MINMAX if observer == "minmax" else RangeEstimatorParametersSet.MEAN_QUANTILE
    nncf.set_log_level(40)  # errors only: NNCF logs every stage at INFO
    q = nncf.quantize(model, nncf.Dataset(items), preset=nncf.QuantizationPreset.MIXED, subset_size=len(items),
                      ignored_scope=nncf.IgnoredScope(names=ignored, types=types, validate=False),
                      advanced_parameters=AdvancedQuantizationParameters(activations_range_estimator_params=ranges,
                                                                         disable_bias_correction=not bias_correction))
    return _save_ir(q, Path(out))


def quantize_openvino_int8(ckpt, ccfg: CalibConfig, out_dir: str | Path, images=None, keep_first_last: bool = True,
                           keep_time: bool = True, observer: str = "minmax", keep: tuple[str, ...] = (),
                           scope: str = "gemm", bias_correction: bool = False, groupnorm: str = "reduce"):
    """The quant(runtime=openvino-int8) step: export (GroupNorm as ``groupnorm``), calibrate on collector
    ``ccfg``, quantize with NNCF, write ``openvino.int8.xml/.bin`` into ``out_dir``; the returned checkpoint
    (same weights) records its runtime."""
    out_dir = Path(out_dir)
    calib = calibration_inputs(ckpt, ccfg, images)
    quantize_ir_int8(convert(ckpt, groupnorm=groupnorm), out_dir / OV_INT8_NAME, calib, keep_first_last, keep_time, observer, keep, scope, bias_correction)
    meta = copy.deepcopy(ckpt.meta)
    meta["runtime"] = {"name": "openvino-int8", "args": {}}
    meta["quant"] = {"mode": "OpenVINO int8 from NNCF post-training quantization (real int8 kernels)", "w_bits": 8,
                     "a_bits": 8, "source": "torch", "preset": "mixed", "activations": "asymmetric 8-bit per tensor",
                     "weights": "symmetric 8-bit per channel", "scope": scope, "groupnorm": groupnorm, "observer": observer, "bias_correction": bias_correction,
                     "keep_first_last": keep_first_last, "keep_time": keep_time, "keep": list(keep),
                     "files": [OV_INT8_NAME, Path(OV_INT8_NAME).with_suffix(".bin").name], "calibration": asdict(ccfg)}
    return Checkpoint(ckpt.net, copy.deepcopy(ckpt.arch), ckpt.schedule, ckpt.parameterization, meta)


class OvNetwork:
    """An OpenVINO model as a network ``(x, t) -> output`` (torch tensors in and out). With ``static`` (the
    default) the model is compiled once per input shape with that shape fixed (a sampler uses one or two
    batch sizes; each compile takes well under a second for these models), else once with a dynamic batch
    (measured slower per call: benchmarks/results/cpu_runtimes.md)."""

    def __init__(self, path: str | Path, precision: str = "f32", static: bool = True, threads: int | None = None,
                 hint: str = "LATENCY", streams: int = 1):
        self.ov = require()
        self.path, self.precision, self.static = str(path), precision, static
        self.core = self.ov.Core()
        # ENABLE_CPU_PINNING off: with pinning (OpenVINO's default on Linux) a one-thread model pinned the calling
        # Python thread to core 0 for the rest of the process (seen in `leandiff eval`), so two such processes on
        # a 2-core machine shared core 0 while core 1 idled, and torch work after it ran on one core
        self.config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                       "PERFORMANCE_HINT": hint, "NUM_STREAMS": streams, "ENABLE_CPU_PINNING": False}
        self.model = self.core.read_model(self.path)
        self.requests: dict[tuple, object] = {}  # input shape (or None: dynamic) -> infer request

    def _request(self, shape: tuple):
        key = shape if self.static else None
        if key not in self.requests:
            model = self.model
            if self.static:
                model = model.clone()
                model.reshape({model.inputs[0]: self.ov.PartialShape(list(shape)), model.inputs[1]: self.ov.PartialShape([shape[0]])})
            self.requests[key] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.requests[key]

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        x = x.detach().float().contiguous()
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        request = self._request(tuple(x.shape))
        request.infer({"x": x.numpy(), "t": t.numpy()})
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))


@dataclass(frozen=True)
class OvSpec:
    """``openvino(static=B,source=S)``, ``openvino-bf16(...)``."""

    static: bool = True  # compile per input shape with that shape fixed (else one dynamic-batch model)
    source: str = "torch"  # convert the PyTorch network (torch) or its ONNX export (onnx)
    groupnorm: str = "reduce"  # how a conversion from torch writes GroupNorm (GROUPNORMS)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UserError(f"openvino: source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        check_groupnorm(self.groupnorm)

    def describe(self) -> str:
        return (("" if self.static else ", dynamic batch") + ("" if self.source == "torch" else f", from {self.source}")
                + ("" if self.groupnorm == "reduce" else f", GroupNorm {self.groupnorm}"))


@dataclass(frozen=True)
class OvInt8Spec:
    """``openvino-int8(calib=C,bf16=B)``: the checkpoint's own int8 model (written by
    ``quant(runtime=openvino-int8)``); with ``calib`` a collector name, one calibrated on the fly by that
    collector (cached by weights hash) where the checkpoint has none. Without either it is an error."""

    calib: str = ""  # collector for an on-the-fly calibration ("" = the checkpoint's own int8 model only)
    bf16: bool = False  # the operations left unquantized run in bf16 (mixed int8/bf16) instead of fp32
    static: bool = True  # compile per input shape with that shape fixed (else one dynamic-batch model)
    source: str = "torch"  # an on-the-fly calibration converts the PyTorch network (torch) or its ONNX export
    scope: str = "gemm"  # an on-the-fly calibration's quantizer placement (OV_SCOPES)
    groupnorm: str = "reduce"  # how an on-the-fly conversion from torch writes GroupNorm (GROUPNORMS)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UserError(f"openvino-int8: source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        check_scope(self.scope)
        check_groupnorm(self.groupnorm, "openvino-int8")
        if self.calib and self.calib not in COLLECTORS:
            raise UserError(f"openvino-int8: unknown calib {self.calib!r}; known: {', '.join(COLLECTORS)}")

    def describe(self) -> str:
        return ((", unquantized operations in bf16" if self.bf16 else "") + ("" if self.static else ", dynamic batch")
                + ("" if self.source == "torch" else f", from {self.source}") + ("" if self.scope == "gemm" else f", scope {self.scope}")
                + ("" if self.groupnorm == "reduce" else f", GroupNorm {self.groupnorm}"))


def _check_own_model(ckpt, spec: OvInt8Spec) -> None:
    """A checkpoint's own int8 model wins over an on-the-fly calibration; a placement or GroupNorm form asked
    for that it was not built with is an error, never silently ignored."""
    rec = ckpt.meta.get("quant") or {}
    asked = [f"{f.name}={getattr(spec, f.name)}" for f in fields(OvInt8Spec) if f.name in ("scope", "groupnorm")
             and getattr(spec, f.name) != f.default and rec.get(f.name) != getattr(spec, f.name)]
    if asked:
        raise UserError(f"runtime openvino-int8({','.join(asked)}): this checkpoint has its own int8 model, built "
                        + ", ".join(f"{k}={rec.get(k, '?')}" for k in ("scope", "groupnorm"))
                        + "; these options apply to an on-the-fly calibration of a checkpoint without one")


def ir_file(ckpt, source: str = "torch", int8: OvInt8Spec | None = None, groupnorm: str = "reduce") -> Path:
    """The checkpoint's OpenVINO IR side file (fp32, or int8 when ``int8`` is given), else one converted
    from ``source`` (GroupNorm as ``groupnorm``; for int8 the spec's) and, for int8 with a ``calib``,
    calibrated as ``ort-int8(calib=...)`` is, into the cache."""
    require()
    name = OV_INT8_NAME if int8 is not None else OV_FP32_NAME
    found = side_file(ckpt, name) if source == "torch" else None
    if found is not None:
        if int8 is not None:
            _check_own_model(ckpt, int8)
        return found
    d = cache_dir(ckpt, "openvino-int8", int8.calib if int8 is not None else None)
    path = d / (name if source == "torch" else name.replace("openvino", f"openvino-{source}", 1))
    if int8 is not None:  # the placement is part of the cached model's name (models cached before it had NNCF's)
        path = path.with_name(path.name.replace(".int8", f".int8-{int8.scope}"))
        groupnorm = int8.groupnorm
    if source == "torch":  # and so is the GroupNorm form (models cached before it had OpenVINO's op)
        path = path.with_name(path.name.replace(".xml", f".gn-{groupnorm}.xml"))
    if path.is_file():
        return path
    if int8 is None:
        return _save_ir(convert(ckpt, source, groupnorm), path)
    require("nncf", "runtime openvino-int8")
    return quantize_ir_int8(convert(ckpt, source, groupnorm), path, calibration_inputs(ckpt, int8.calib), scope=int8.scope)


def openvino_fp32(ckpt, spec: OvSpec) -> OvNetwork:
    """OpenVINO fp32 (CPU)."""
    return OvNetwork(ir_file(ckpt, spec.source, groupnorm=spec.groupnorm), "f32", spec.static)


def openvino_bf16(ckpt, spec: OvSpec) -> OvNetwork:
    """OpenVINO with the bf16 precision hint (CPU with AVX-512 BF16 or AMX)."""
    if not has_bf16():
        raise UserError("runtime openvino-bf16: this CPU has no bf16 kernels in OpenVINO (use openvino)")
    return OvNetwork(ir_file(ckpt, spec.source, groupnorm=spec.groupnorm), "bf16", spec.static)


def openvino_int8(ckpt, spec: OvInt8Spec) -> OvNetwork:
    """OpenVINO int8 quantized by NNCF (real int8 kernels)."""
    if spec.bf16 and not has_bf16():
        raise UserError("runtime openvino-int8(bf16=true): this CPU has no bf16 kernels in OpenVINO")
    return OvNetwork(ir_file(ckpt, spec.source, spec), "bf16" if spec.bf16 else "f32", spec.static)
