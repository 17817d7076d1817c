"""Cost of a network and of sampling with it: parameters (total and non-zero), MACs per
evaluation, bytes on disk, latency per evaluation, end-to-end images/s, peak memory.

Timing protocol (machines are noisy): warm up every candidate, then run ``rounds`` rounds; in
each round every (candidate, batch size) pair is timed once, in alternating order (A B A B …),
so that a slow spell hits all of them alike; report the median over rounds.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .denoiser import call_network
from .device import device_info, device_of, peak_memory_mb, reset_peak_memory, synchronize


def count_params(net: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in net.parameters())
    nonzero = sum(int((p != 0).sum()) for p in net.parameters())
    return {"params": total, "params_nonzero": nonzero}


@torch.no_grad()
def count_macs(fn: Callable, *inputs) -> int:
    """Multiply-accumulates of ``fn(*inputs)`` counted by torch's FlopCounterMode
    (convolutions, matmuls and attention exactly; MAC = FLOP / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() // 2


@torch.no_grad()
def macs_per_image(net: nn.Module, shape: tuple[int, int, int], t: float = 500.0) -> int:
    """Multiply-accumulates of one network evaluation at batch 1, counted by torch's
    FlopCounterMode (convolutions, matmuls and attention exactly; MAC = FLOP / 2)."""
    was_training = net.training
    net.eval()
    dev = device_of(net)
    x = torch.zeros(1, *shape, device=dev)
    macs = count_macs(call_network, net, x, torch.full((1,), t, device=dev))
    net.train(was_training)
    return macs


@torch.no_grad()
def macs_per_image_nonzero(net: nn.Module, shape: tuple[int, int, int], t: float = 500.0) -> int:
    """MACs of one evaluation at batch 1 if zero weights cost nothing (what unstructured pruning removes for
    a sparse kernel): :func:`macs_per_image` less, for every Conv2d / Linear, the zero weights times the
    output positions each weight is used at. Attention's activation-by-activation products stay dense."""
    saved: list[int] = []

    def hook(mod, inp, out):
        zeros = int((mod.weight == 0).sum())
        if zeros:
            positions = out[0, 0].numel() if isinstance(mod, nn.Conv2d) else out[0].numel() // out.shape[-1]
            saved.append(zeros * positions)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and getattr(m, "weight", None) is not None]
    try:
        dense = macs_per_image(net, shape, t)
    finally:
        for h in handles:
            h.remove()
    return dense - sum(saved)


def machine_load() -> dict:
    """The 1-minute load average and the cores this process may use: a figure timed while the load was
    above the cores shared them with other work."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"loadavg_1m": load, "cores": cores}


def checkpoint_bytes(ckpt) -> int:
    """Bytes on disk of a checkpoint's weights file (the safetensors file; for a leandiff
    directory ``model.safetensors``). A checkpoint never saved is serialised in memory to count."""
    from safetensors.torch import save

    p = Path(ckpt.path) if getattr(ckpt, "path", None) is not None else None
    if p is not None:
        if p.is_file():
            return p.stat().st_size
        for name in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
            if (p / name).is_file():
                return (p / name).stat().st_size
    state = {k: v.detach().contiguous().cpu() for k, v in ckpt.net.state_dict().items()}
    return len(save(state))


# --- latency -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple = (1, 16, 64)  # batch sizes timed per network evaluation
    warmup: int = 2  # untimed calls per (network, batch) before timing
    rounds: int = 5  # alternating rounds; the median over rounds is reported
    min_round_s: float = 0.05  # a round repeats a call until it has taken at least this long
    t: float = 500.0  # the timestep fed to the network (cost does not depend on it)
    seed: int = 0  # inputs are seeded noise


@torch.no_grad()
def measure_latency(networks: dict[str, Callable], shape: tuple[int, int, int],
                    cfg: LatencyConfig = LatencyConfig(), progress: bool = False,
                    device: torch.device | str = "cpu") -> dict[str, dict[int, dict]]:
    """Latency of one network evaluation for each named network and batch size, with inputs on ``device``
    (each call waits for the device to finish, so the clock measures the work, not the queueing).

    Returns ``{name: {batch: {"median_ms", "min_ms", "max_ms", "ms_per_image", "images_per_s"}}}``
    where the ms figures are per call (one network evaluation of the whole batch)."""
    g = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(device)
    inputs = {b: (torch.randn((b, *shape), generator=g).to(device), torch.full((b,), cfg.t, device=device))
              for b in cfg.batch_sizes}
    pairs = [(name, b) for b in cfg.batch_sizes for name in networks]
    for name, b in pairs:  # warm-up
        for _ in range(cfg.warmup):
            call_network(networks[name], *inputs[b])
        synchronize(device)
    times: dict[tuple, list[float]] = {p: [] for p in pairs}
    bar = None
    if progress:
        from .io import progress as tqdm
        bar = tqdm(total=cfg.rounds * len(pairs), desc="latency", unit="run", leave=False)
    for r in range(cfg.rounds):
        order = pairs if r % 2 == 0 else pairs[::-1]  # alternate the order between rounds too
        for name, b in order:
            calls, t0 = 0, time.perf_counter()
            while True:
                call_network(networks[name], *inputs[b])
                synchronize(device)
                calls += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= cfg.min_round_s:
                    break
            times[(name, b)].append(elapsed / calls)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out: dict[str, dict[int, dict]] = {name: {} for name in networks}
    for (name, b), ts in times.items():
        med = statistics.median(ts)
        out[name][b] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                        "ms_per_image": med * 1e3 / b, "images_per_s": b / med, "rounds": len(ts)}
    return out


# --- memory --------------------------------------------------------------------------------------

def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def max_rss_lifetime() -> int:
    """Peak RSS of this process since it started, in bytes (getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Context manager: the peak RSS while the block runs, sampled every ``interval`` seconds by a
    background thread (so short spikes between samples can be missed), and its rise over the RSS
    at entry. tracemalloc would miss torch's tensor memory, which is allocated outside Python.

    After the block: ``peak_bytes``, ``start_bytes``, ``delta_bytes`` (None where /proc is absent)
    and ``lifetime_peak_bytes`` (getrusage, the whole process so far)."""

    def __init__(self, interval: float = 0.005, device: torch.device | str | None = None):
        self.interval = interval
        self.device = None if device is None else torch.device(device)
        self.peak_gpu_mb = None  # on CUDA: torch's peak allocation on the device during the block
        self.peak_bytes = self.start_bytes = self.delta_bytes = None
        self.lifetime_peak_bytes = None
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss is not None and rss > self.peak_bytes:
                self.peak_bytes = rss

    def __enter__(self):
        if self.device is not None:
            reset_peak_memory(self.device)
        self.start_bytes = current_rss()
        if self.start_bytes is not None:
            self.peak_bytes = self.start_bytes
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.start_bytes is not None:
            self._stop.set()
            self._thread.join()
            end = current_rss()
            self.peak_bytes = max(self.peak_bytes, end or 0)
            self.delta_bytes = self.peak_bytes - self.start_bytes
        self.lifetime_peak_bytes = max_rss_lifetime()
        if self.device is not None:
            synchronize(self.device)
            self.peak_gpu_mb = peak_memory_mb(self.device)
        return False

    def as_dict(self) -> dict:
        mb = lambda v: None if v is None else round(v / 2**20, 1)  # noqa: E731
        out = {"peak_rss_mb": mb(self.peak_bytes), "rss_increase_mb": mb(self.delta_bytes),
               "process_peak_rss_mb": mb(self.lifetime_peak_bytes)}
        if self.peak_gpu_mb is not None:  # only where there is a GPU to measure
            out["peak_gpu_mb"] = self.peak_gpu_mb
        return out


# --- where a number was measured -----------------------------------------------------------------

def machine_info(device: torch.device | str | None = None) -> dict:
    """Platform, CPU and library versions, and (given ``device``) what the numbers were computed on: the
    device, and on CUDA the GPU's name, memory, driver and CUDA versions. Recorded with every measured number."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("leandiff")
    except PackageNotFoundError:  # a source tree that was never installed
        __version__ = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "leandiff": __version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            **(device_info(device) if device is not None else {})}
