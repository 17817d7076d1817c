"""The deployment path: ONNX export and runtimes that really run faster (or not — measure).

- :func:`export_onnx` writes the network as ONNX (inputs ``x`` [B, C, H, W], ``t`` [B]; dynamic batch).
- runtime ``ort``: ONNX Runtime fp32.
- runtime ``ort-int8``: ONNX Runtime with real int8 kernels, from ``quantize_static`` (QDQ format,
  QUInt8 activations, per-channel QInt8 weights, op types Conv/MatMul/Gemm only — the settings
  measured fastest on these machines, see DESIGN.md), calibrated by any collector of
  :mod:`leandiff.compress.calibration`.
- runtime ``compile``: ``torch.compile`` of the eager fp32 network.

ONNX files are side files of the checkpoint directory (``model.int8.onnx``; ``model.onnx`` where one was
exported there); when a
checkpoint has none, ``ort`` exports on the fly into a cache directory keyed by the weights hash, and
``ort-int8`` is an error unless it names a collector to calibrate with (``ort-int8(calib=qdiff)``). ONNX Runtime uses as many threads as
torch (``torch.get_num_threads()``), so ``OMP_NUM_THREADS=1`` comparisons are fair.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..denoiser import call_network
from ..errors import UserError
from ..models import image_shape
from ..spec import NoArgs
from ..surgery.quant import QuantLayer, in_kept
from .artifacts import cache_dir, calibration_inputs, side_file
from .calibration import COLLECTORS

FP32_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"


class TensorNet(nn.Module):
    """(x, t) -> tensor (no diffusers output object), t as a float vector: what ONNX export, OpenVINO conversion
    and torch.compile trace."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return call_network(self.net, x, t)


def export_onnx(ckpt, out: str | Path, opset: int = 17) -> Path:
    """Write the checkpoint's network as ONNX with a dynamic batch dimension."""
    if any(isinstance(m, QuantLayer) for m in ckpt.net.modules()):
        raise UserError("export: fake-quant checkpoints are simulations; export the full-precision checkpoint "
                        "and use quant(runtime=ort-int8) for real int8")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, *image_shape(ckpt.arch))
    t = torch.full((2,), 500.0)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(TensorNet(copy.deepcopy(ckpt.net).cpu().float().eval()), (x, t), str(tmp), input_names=["x", "t"],
                          output_names=["out"], dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "out": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    os.replace(tmp, out)
    return out


class OrtNetwork:
    """An ONNX Runtime session as a network ``(x, t) -> output`` (torch tensors in and out)."""

    def __init__(self, path: str | Path, threads: int | None = None, device: torch.device | str = "cpu"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        n = threads or torch.get_num_threads()
        so.intra_op_num_threads, so.inter_op_num_threads = n, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = str(path)
        self.device = torch.device(device)
        if self.device.type == "cuda":  # onnxruntime-gpu: tensors stay on the GPU (IO binding, no copies)
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(self.path, so, providers=providers)

    def _call_cuda(self, x: torch.Tensor, t) -> torch.Tensor:
        x = x.detach().float().contiguous()
        t = (t.to(x.device, torch.float32) if torch.is_tensor(t) else torch.full((), float(t), device=x.device))
        t = t.reshape(-1).expand(x.shape[0]).contiguous()
        out = torch.empty_like(x)
        io = self.session.io_binding()
        i = x.device.index or 0
        for name, v in (("x", x), ("t", t)):
            io.bind_input(name, "cuda", i, np.float32, tuple(v.shape), v.data_ptr())
        io.bind_output("out", "cuda", i, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(io)
        return out

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._call_cuda(x, t)
        x = x.detach().float().contiguous()
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        out = self.session.run(None, {"x": x.numpy(), "t": t.numpy()})[0]
        return torch.from_numpy(out)


class _Reader:
    """onnxruntime CalibrationDataReader over a calibration set (x_t, t), in batches of one size: ORT's
    histogram calibrators (Percentile) stack every batch's activations into one array, which fails on a
    shorter last batch (250 samples in batches of 32). The batch is the largest divisor of n up to
    ``batch_size``; MinMax ranges do not depend on it."""

    def __init__(self, xs: torch.Tensor, ts: torch.Tensor, batch_size: int = 32):
        batch_size = max(d for d in range(1, min(batch_size, xs.shape[0]) + 1) if xs.shape[0] % d == 0)
        xs, ts = xs.cpu(), ts.cpu()  # a calibration set collected on an accelerator feeds ONNX Runtime on the CPU
        self.items = [{"x": xs[i:i + batch_size].numpy().astype(np.float32), "t": ts[i:i + batch_size].numpy().astype(np.float32)}
                      for i in range(0, xs.shape[0], batch_size)]
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.items):
            return None
        self.pos += 1
        return self.items[self.pos - 1]

    def rewind(self):
        self.pos = 0


def excluded_nodes(model_path: str | Path, keep_first_last: bool, keep_time: bool, keep: tuple[str, ...] = ()) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes kept in fp32: conv_in/conv_out and the time-embedding MLP,
    as the fake-quant path keeps them (the UNet's output ε̂ is multiplied by σ/α in x̂₀ at high t, so
    an 8-bit grid on it is costly), and those under the modules ``keep``."""
    import onnx

    kept = (("conv_in", "conv_out") if keep_first_last else ()) + (("time_embedding",) if keep_time else ()) + tuple(keep)
    return [n.name for n in onnx.load(str(model_path)).graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and in_kept(n.name, kept)]


# leandiff observer -> ONNX Runtime calibration method; percentile cuts the same 0.01 % from each side
# as the fake-quant ``percentile`` observer (quantiles 1e-4 and 1 − 1e-4): ORT's asymmetric Percentile
# cuts the fraction (100 − p)/200 from each side, so p = 99.98.
ORT_OBSERVERS = {"minmax": ("MinMax", {}), "percentile": ("Percentile", {"CalibPercentile": 99.98})}


def quantize_onnx_int8(fp32: str | Path, out: str | Path, calib: tuple[torch.Tensor, torch.Tensor],
                       per_channel: bool = True, keep_first_last: bool = True, keep_time: bool = True,
                       observer: str = "minmax", keep: tuple[str, ...] = (),
                       op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")) -> Path:
    """Static int8: QDQ, QUInt8 activations, QInt8 weights (per channel), Conv/MatMul/Gemm only;
    first/last convolutions and the time embedding optionally kept in fp32; activation ranges by
    ONNX Runtime's MinMax or Percentile calibrator (``observer``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method, extra = ORT_OBSERVERS[observer]
    fp32, out = Path(fp32).resolve(), Path(out).resolve()  # absolute: the work below runs in a temp dir
    with tempfile.TemporaryDirectory() as d:  # quant_pre_process and the calibrator leave files behind
        cwd = os.getcwd()
        os.chdir(d)
        try:
            pre = Path(d) / "pre.onnx"
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            tmp = Path(d) / "int8.onnx"
            quantize_static(str(pre), str(tmp), _Reader(*calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                            op_types_to_quantize=list(op_types), calibrate_method=getattr(CalibrationMethod, method),
                            nodes_to_exclude=excluded_nodes(pre, keep_first_last, keep_time, keep),
                            extra_options=dict(extra))
        finally:
            os.chdir(cwd)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out) if tmp.stat().st_dev == out.parent.stat().st_dev else out.write_bytes(tmp.read_bytes())
    return out


def quantize_ort_int8(ckpt, ccfg, out_dir: str | Path, images=None, per_channel: bool = True,
                      keep_first_last: bool = True, keep_time: bool = True, observer: str = "minmax",
                      keep: tuple[str, ...] = ()):
    """The quant(runtime=ort-int8) step: export, calibrate on collector ``ccfg``, write the int8 ONNX model
    into ``out_dir``; the returned checkpoint (same weights) records its runtime and calibration.

    The fp32 ONNX graph is only the input of the quantizer: it is made in a temporary directory and not
    kept (the ``ort`` runtime exports one on the fly when asked). The fp32 safetensors weights stay:
    they are the checkpoint (eager/bf16 runtimes, later recipe steps, the weights hash of the lineage)."""
    out_dir = Path(out_dir)
    calib = calibration_inputs(ckpt, ccfg, images)
    (out_dir / FP32_NAME).unlink(missing_ok=True)  # left by an older version of this step
    with tempfile.TemporaryDirectory(prefix="leandiff-fp32-") as d:
        fp32 = export_onnx(ckpt, Path(d) / FP32_NAME)
        quantize_onnx_int8(fp32, out_dir / INT8_NAME, calib, per_channel, keep_first_last, keep_time, observer, keep)
    meta = copy.deepcopy(ckpt.meta)
    meta["runtime"] = {"name": "ort-int8", "args": {}}
    meta["quant"] = {"mode": "ONNX Runtime static int8 (real int8 kernels)", "w_bits": 8, "a_bits": 8,
                     "format": "QDQ", "activations": "QUInt8 per tensor", "weights": "QInt8 per channel" if per_channel else "QInt8 per tensor",
                     "op_types": ["Conv", "MatMul", "Gemm"],
                     "keep_first_last": keep_first_last, "keep_time": keep_time, "keep": list(keep), "files": [INT8_NAME], "calibration": asdict(ccfg),
                     "files_note": f"{INT8_NAME} is what the ort-int8 runtime runs; model.safetensors keeps the "
                                   "fp32 weights for the eager/bf16 runtimes and later recipe steps; no fp32 ONNX "
                                   "is kept (runtime ort exports one into a cache when asked)"}
    return Checkpoint(ckpt.net, copy.deepcopy(ckpt.arch), ckpt.schedule, ckpt.parameterization, meta)


@dataclass(frozen=True)
class OrtInt8Spec:
    """``ort-int8(calib=C)``: the checkpoint's own int8 model (written by ``quant(runtime=ort-int8)``); with
    ``calib`` a collector name, one calibrated on the fly by that collector (cached by weights hash)
    where the checkpoint has none. Without either it is an error, never a silent default calibration."""

    calib: str = ""  # collector for an on-the-fly calibration ("" = the checkpoint's own int8 model only)

    def __post_init__(self):
        if self.calib and self.calib not in COLLECTORS:
            raise UserError(f"ort-int8: unknown calib {self.calib!r}; known: {', '.join(COLLECTORS)}")


def onnx_file(ckpt, int8: OrtInt8Spec | None = None) -> Path:
    """The checkpoint's ONNX side file (fp32, or int8 when ``int8`` is given), else one exported (and, for
    int8 with a ``calib``, calibrated) into the cache."""
    name = INT8_NAME if int8 is not None else FP32_NAME
    found = side_file(ckpt, name)
    if found is not None:
        return found
    d = cache_dir(ckpt, "ort-int8", int8.calib if int8 is not None else None)
    if (d / name).is_file():
        return d / name
    fp32 = d / FP32_NAME if (d / FP32_NAME).is_file() else export_onnx(ckpt, d / FP32_NAME)
    if int8 is None:
        return fp32
    return quantize_onnx_int8(fp32, d / INT8_NAME, calibration_inputs(ckpt, int8.calib))


def ort_cuda_available() -> bool:
    """Whether onnxruntime-gpu's CUDA execution provider is installed (an optional extra)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_fp32(ckpt, _: NoArgs) -> OrtNetwork:
    """ONNX Runtime fp32 (CPU; CUDA execution provider where onnxruntime-gpu is installed and the network is
    on a GPU)."""
    dev = next((p.device for p in ckpt.net.parameters()), torch.device("cpu"))
    return OrtNetwork(onnx_file(ckpt), device=dev if dev.type == "cuda" else "cpu")


def ort_int8(ckpt, spec: OrtInt8Spec) -> OrtNetwork:
    """ONNX Runtime static int8 (QDQ, real int8 kernels)."""
    return OrtNetwork(onnx_file(ckpt, spec))


def compiled(ckpt, _: NoArgs) -> nn.Module:
    """torch.compile, fp32 (compiles per input shape)."""
    return torch.compile(TensorNet(ckpt.net.float().eval()))
