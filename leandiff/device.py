"""Where a stage computes: the one device option of every command and config, and the machine block.

A device spec is ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``. ``auto`` picks CUDA, then Apple MPS,
then the CPU; under ``torchrun`` a CUDA choice without an index is this rank's GPU (``LOCAL_RANK``). A
device that is not there is a :class:`~leandiff.errors.UserError` (one line, exit 2), never a traceback.

Noise rule (what a seed means on each device):

- CPU: every draw is exactly as before devices existed — CPU generators, same order, same images.
- Accelerators: the starting noise x_T of each sampling batch is still drawn from the CPU generator
  seeded (seed, batch) and moved to the device once per batch, so deterministic (ODE) solvers give the
  CPU's images up to float error. Noise drawn *inside* a loop (SDE/ancestral solver steps, training t and
  ε) comes from a generator on the device seeded with the same integer: no host↔device copy per step,
  the same images for the same seed on the same device, but not the CPU's stream.

Checkpoints are device-free: weights are written from CPU copies and loaded onto any device.
"""
from __future__ import annotations

import os

import torch

from .errors import UserError

DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device for a spec (see module docstring); unavailable devices raise UserError."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            text = "cuda"
        elif _mps_available():
            text = "mps"
        else:
            return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind == "meta" and not index:  # shapes only: the plumbing tests' device
        return torch.device("meta")
    if kind == "mps" and not index:
        if not _mps_available():
            raise UserError("device mps is not available here (no Apple Metal GPU); use --device cpu or auto")
        return torch.device("mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {text} is not available here (torch {torch.__version__} sees no CUDA GPU); "
                            f"use --device cpu or auto")
        n = torch.cuda.device_count()
        if not index:
            i = int(os.environ.get("LOCAL_RANK", 0))  # torchrun: one GPU per rank
            if i >= n:
                raise UserError(f"LOCAL_RANK {i} has no GPU of its own: this machine has {n}")
            return torch.device("cuda", i)
        if not index.isdigit() or int(index) >= n:
            raise UserError(f"device {text} is not available here: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", int(index))
    raise UserError(f"unknown device {spec!r}; expected {DEVICE_HELP}")


def device_of(net) -> torch.device:
    """The device of a network's first parameter or buffer; the CPU for parameter-free networks and for
    networks that are no ``nn.Module`` (an ONNX Runtime session)."""
    if isinstance(net, torch.nn.Module):
        for t in net.parameters():
            return t.device
        for t in net.buffers():
            return t.device
    return torch.device(getattr(net, "device", "cpu"))


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` on ``device`` (a CPU generator for the CPU and for ``meta``)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return torch.Generator().manual_seed(seed)
    return torch.Generator(device).manual_seed(seed)


def loop_generator(seed: int, g_cpu: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator for the noise drawn inside a loop on ``device`` (the noise rule): on the CPU the given
    CPU generator itself, continuing its stream as before; on an accelerator a fresh one on the device."""
    return g_cpu if device.type in ("cpu", "meta") else generator(seed, device)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for honest wall-clock timing on an accelerator); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on ``device`` since the last reset, in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def device_info(device: torch.device | str) -> dict:
    """The machine block's device part: what the stage ran on, and on CUDA the GPU's name, memory,
    compute capability, driver and CUDA versions."""
    device = torch.device(device)
    info = {"device": str(device), "device_type": device.type}
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        info.update(gpu=p.name, gpu_memory_mb=round(p.total_memory / 2**20), gpu_capability=f"{p.major}.{p.minor}",
                    gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda, driver=_driver_version(),
                    cudnn=torch.backends.cudnn.version())
    elif device.type == "mps":
        info.update(gpu="Apple MPS")
    return info


def _driver_version() -> str | None:
    """The NVIDIA driver version (NVML through torch when present, else /proc), None if unknown."""
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
        words = [w for w in first.split() if w[:1].isdigit() and "." in w]
        return words[0] if words else None
    except OSError:
        return None


def noise_rule(device: torch.device | str) -> str:
    """The noise rule of the module docstring in one line, recorded in every results row's protocol."""
    if torch.device(device).type in ("cpu", "meta"):
        return "cpu generators (seed, batch): the images of every earlier leandiff CPU run"
    return ("x_T from the cpu generator (seed, batch), moved once per batch; step noise from a "
            f"{torch.device(device).type} generator with the same seed")


def device_option(fn):
    """The ``--device`` option of every computing command (click is imported only by the CLI's callers)."""
    import click

    return click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)(fn)
