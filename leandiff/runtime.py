"""Runtimes: how a checkpoint's network is executed — every runtime, registered here in one place.

A runtime is a function ``(checkpoint, config) -> network``, where the network is any callable
``(x, t) -> output`` that a :class:`~leandiff.denoiser.Denoiser` can wrap, and ``config`` is the
runtime's frozen config dataclass (:class:`~leandiff.spec.NoArgs` when it takes none). A runtime is
named by a *spec* in the recipe grammar (:mod:`leandiff.spec`): ``eager``, ``ort-int8(calib=qdiff)``,
``openvino-int8(calib=ndtc)``,
``cache(interval=3,schedule=nonuniform,bf16=true)``. Checkpoints store theirs as ``{name, args}``;
the old names ``cache:K``, ``cache-nu:K``, ``cache-bf16:K`` and ``cache-nu-bf16:K`` still read.

Each registry entry carries a one-line description, so reports can label speed-ups (and fake-quant
simulation, which saves no time) honestly. A new runtime is one function plus one line in
:data:`RUNTIMES`.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from .compress import cache, onnx, openvino, quant
from .denoiser import Denoiser, call_network
from .device import device_of, resolve_device
from .errors import UserError
from .precision import Autocast  # noqa: F401  (re-exported: the bf16 wrapper)
from .spec import NoArgs, RecipeError, Spec, arguments, bind, fmt_value, parse, values


def eager(ckpt, _: NoArgs) -> nn.Module:
    """PyTorch eager in fp32: the reference every other runtime is compared against."""
    return ckpt.net.float().eval()


def bf16(ckpt, _: NoArgs) -> nn.Module:
    """fp32 weights, bf16 autocast on the network's device (matmuls and convolutions in bf16, fp32 outputs)."""
    return Autocast(ckpt.net.float().eval(), dtype=torch.bfloat16)


def fp16(ckpt, _: NoArgs) -> nn.Module:
    """fp32 weights, fp16 autocast (GPUs: tensor cores; fp32 outputs)."""
    return Autocast(ckpt.net.float().eval(), dtype=torch.float16)


class _ChannelsLast(nn.Module):
    """fp32 in NHWC memory order: weights and inputs channels-last (cuDNN's preferred layout), NCHW out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return call_network(self.net, x.contiguous(memory_format=torch.channels_last), t).contiguous()


def channels_last(ckpt, _: NoArgs) -> nn.Module:
    """fp32 eager with channels-last (NHWC) weights and activations."""
    return _ChannelsLast(ckpt.net.float().eval())


def compile_bf16(ckpt, _: NoArgs) -> nn.Module:
    """torch.compile over bf16 autocast (the fastest torch path on GPUs and bf16 CPUs)."""
    return torch.compile(Autocast(ckpt.net.float().eval(), dtype=torch.bfloat16))


# name -> Spec(fn(ckpt, config) -> network, config dataclass, description)
RUNTIMES: dict[str, Spec] = {
    "eager": Spec(eager, NoArgs, "PyTorch eager, fp32 (reference)"),
    "bf16": Spec(bf16, NoArgs, "PyTorch eager, bf16 autocast"),
    "fp16": Spec(fp16, NoArgs, "PyTorch eager, fp16 autocast (GPU)"),
    "channels-last": Spec(channels_last, NoArgs, "PyTorch eager, fp32, channels-last (NHWC) memory format"),
    "compile": Spec(onnx.compiled, NoArgs, "torch.compile, fp32 (compiles per input shape)"),
    "compile-bf16": Spec(compile_bf16, NoArgs, "torch.compile over bf16 autocast (compiles per input shape)"),
    "ort": Spec(onnx.ort_fp32, NoArgs, "ONNX Runtime fp32 (CPU)"),
    "ort-int8": Spec(onnx.ort_int8, onnx.OrtInt8Spec, "ONNX Runtime static int8 (QDQ, real int8 kernels)"),
    "openvino": Spec(openvino.openvino_fp32, openvino.OvSpec, "OpenVINO fp32 (CPU; optional extra leandiff[openvino])"),
    "openvino-bf16": Spec(openvino.openvino_bf16, openvino.OvSpec, "OpenVINO bf16 precision hint (CPU with bf16)"),
    "openvino-int8": Spec(openvino.openvino_int8, openvino.OvInt8Spec,
                          "OpenVINO int8 from NNCF post-training quantization (real int8 kernels)"),
    "dynamic-int8": Spec(quant.dynamic_int8, NoArgs, "PyTorch dynamic int8 (Linear layers only; L-Diff's baseline)"),
    "fake-quant": Spec(quant.fake_quant_runtime, NoArgs,
                       "fake-quant SIMULATION in fp32 (measures quality of low-bit arithmetic; no speed-up)"),
    "cache": Spec(cache.cached_network, cache.CacheSpec, "DeepCache-style feature caching"),
}

# The device types each runtime runs on. A runtime missing here (one registered from outside) is taken to
# run on the CPU only. Real int8 stays ONNX Runtime on the CPU; fp16 autocast on a CPU is slower than fp32.
ALL_DEVICES = ("cpu", "cuda", "mps")
RUNTIME_DEVICES: dict[str, tuple] = {
    "eager": ALL_DEVICES, "bf16": ALL_DEVICES, "fp16": ("cuda", "mps"), "channels-last": ALL_DEVICES,
    "compile": ("cpu", "cuda"), "compile-bf16": ("cpu", "cuda"), "ort": ("cpu",), "ort-int8": ("cpu",),
    "dynamic-int8": ("cpu",), "fake-quant": ALL_DEVICES, "cache": ALL_DEVICES,
}


def runtime_devices(name: str) -> tuple:
    """The device types runtime ``name`` runs on (``ort`` also on CUDA where onnxruntime-gpu is installed)."""
    devices = RUNTIME_DEVICES.get(name, ("cpu",))
    if name == "ort" and onnx.ort_cuda_available():
        devices = devices + ("cuda",)
    return devices


def check_device(name: str, device: torch.device) -> None:
    """UserError when runtime ``name`` does not run on ``device`` (``meta``: shapes only, any torch runtime)."""
    devices = runtime_devices(name)
    if device.type == "meta" and devices != ("cpu",):
        return
    if device.type not in devices:
        raise UserError(f"runtime {name} runs on {', '.join(devices)}, not on {device}; "
                        f"choose --device {devices[0]} or another runtime (leandiff runtimes)")


_OLD_CACHE = re.compile(r"cache(-nu)?(-bf16)?:(\d+)")  # cache-nu-bf16:3 = cache(interval=3,schedule=nonuniform,bf16=true)


def register_runtime(name: str, fn: Callable, description: str | None = None) -> None:
    """Add a runtime ``fn(ckpt) -> network`` that takes no arguments, from outside the package (a test, a
    user's script); leandiff's own are the lines of :data:`RUNTIMES`."""
    if name in RUNTIMES and getattr(RUNTIMES[name].fn, "__wrapped__", None) is not fn:
        raise ValueError(f"runtime {name!r} is already registered")

    def run(ckpt, _: NoArgs):
        return fn(ckpt)

    run.__wrapped__ = fn
    RUNTIMES[name] = Spec(run, NoArgs, description or (fn.__doc__ or name).strip().splitlines()[0])


def parse_runtime(text: str | dict) -> tuple[str, object]:
    """(name, config) of a runtime spec: ``NAME``, ``NAME(key=value,...)``, a checkpoint's ``{name, args}``
    record, or an old name (``cache-nu:3``)."""
    if isinstance(text, dict):
        name, args = text.get("name"), dict(text.get("args") or {})
    else:
        old = _OLD_CACHE.fullmatch(str(text).strip())
        if old:
            name, args = "cache", {"interval": int(old[3]), "schedule": "nonuniform" if old[1] else "uniform",
                                   "bf16": bool(old[2])}
        else:
            try:
                steps = parse(str(text))
            except RecipeError:
                steps = []
            if len(steps) != 1:
                raise UserError(f"runtime {text!r}: expected NAME or NAME(key=value,...)")
            name, args = steps[0].name, steps[0].args
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; known: {', '.join(sorted(RUNTIMES))}")
    return name, bind(RUNTIMES[name].config, args, f"runtime {name}")


def runtime_label(text: str | dict) -> str:
    """The canonical spec of a runtime: its name, and the arguments that differ from their defaults."""
    name, cfg = parse_runtime(text)
    defaults = arguments(type(cfg))
    args = {k: v for k, v in values(cfg).items() if v != defaults[k][0]}
    return name + ("(" + ",".join(f"{k}={fmt_value(v)}" for k, v in args.items()) + ")" if args else "")


def get_runtime(text: str | dict, device: str | torch.device | None = None) -> Callable:
    """``ckpt -> network`` for a runtime spec on ``device`` (checked now: an unknown name or argument, or a
    device the runtime does not run on, fails before any work); its ``description`` says what it is.
    ``device`` None: where the checkpoint's network is. A torch runtime moves ``ckpt.net`` there first
    (runtimes work on the checkpoint's network in place, as ``eager`` always did)."""
    name, cfg = parse_runtime(text)
    spec = RUNTIMES[name]
    dev = None if device is None else resolve_device(device)
    if dev is not None:
        check_device(name, dev)

    def run(ckpt):
        where = dev if dev is not None else device_of(ckpt.net)
        check_device(name, where)
        if isinstance(ckpt.net, nn.Module) and device_of(ckpt.net) != where:
            ckpt.net.to(where)
        return spec.fn(ckpt, cfg)

    run.description = spec.description + (cfg.describe() if hasattr(cfg, "describe") else "")
    run.label = runtime_label(text)
    run.devices = runtime_devices(name)
    return run


def row_device(text: str | dict, device: str | torch.device) -> torch.device:
    """The device a grid's row (demo, study) runs on: ``device`` where runtime ``text`` runs there, else the
    CPU (real int8 runs on the CPU); the row's protocol records which."""
    dev = resolve_device(device)
    name, _ = parse_runtime(text)
    return dev if dev.type in runtime_devices(name) else torch.device("cpu")


def runtime_network(ckpt, name: str | dict = "eager", device: str | torch.device | None = None) -> Callable:
    """The checkpoint's network prepared for execution by runtime ``name`` on ``device``."""
    return get_runtime(name, device)(ckpt)


def runtime_denoiser(ckpt, name: str | dict = "eager", device: str | torch.device | None = None) -> Denoiser:
    """A Denoiser over the checkpoint's network executed by runtime ``name`` on ``device``."""
    return Denoiser(runtime_network(ckpt, name, device), ckpt.schedule, ckpt.parameterization)
