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
from .denoiser import Denoiser
from .errors import UserError
from .precision import Autocast  # noqa: F401  (re-exported: the bf16 wrapper)
from .spec import NoArgs, RecipeError, Spec, arguments, bind, fmt_value, parse, values


def eager(ckpt, _: NoArgs) -> nn.Module:
    """PyTorch eager in fp32: the reference every other runtime is compared against."""
    return ckpt.net.float().eval()


def bf16(ckpt, _: NoArgs) -> nn.Module:
    """fp32 weights, bf16 autocast on CPU (matmuls and convolutions in bf16, fp32 outputs)."""
    return Autocast(ckpt.net.float().eval(), "cpu", torch.bfloat16)


# name -> Spec(fn(ckpt, config) -> network, config dataclass, description)
RUNTIMES: dict[str, Spec] = {
    "eager": Spec(eager, NoArgs, "PyTorch eager, fp32 (reference)"),
    "bf16": Spec(bf16, NoArgs, "PyTorch eager, bf16 autocast (CPU)"),
    "compile": Spec(onnx.compiled, NoArgs, "torch.compile, fp32 (compiles per input shape)"),
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


def get_runtime(text: str | dict) -> Callable:
    """``ckpt -> network`` for a runtime spec (checked now: an unknown name or argument fails before any
    work); its ``description`` says what it is."""
    name, cfg = parse_runtime(text)
    spec = RUNTIMES[name]

    def run(ckpt):
        return spec.fn(ckpt, cfg)

    run.description = spec.description + (cfg.describe() if hasattr(cfg, "describe") else "")
    run.label = runtime_label(text)
    return run


def runtime_network(ckpt, name: str | dict = "eager") -> Callable:
    """The checkpoint's network prepared for execution by runtime ``name``."""
    return get_runtime(name)(ckpt)


def runtime_denoiser(ckpt, name: str | dict = "eager") -> Denoiser:
    """A Denoiser over the checkpoint's network executed by runtime ``name``."""
    return Denoiser(runtime_network(ckpt, name), ckpt.schedule, ckpt.parameterization)
