"""Sampling: draw x_T, run a registered solver over a timestep spacing, stream batches out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from torch import nn

from .denoiser import Denoiser, call_network
from .device import device_of, loop_generator, resolve_device, synchronize
from .errors import UserError
from .schedule import DEFAULT_SPACING, timesteps as make_timesteps
from .solvers import check_options, get_solver, nfe_per_step


@dataclass(frozen=True)
class SampleConfig:
    solver: str = "ddim"  # a name in leandiff.solvers.SOLVERS
    nfe: int = 50  # network evaluations per sample; the solver's steps are derived from it
    spacing: str = DEFAULT_SPACING  # timestep spacing, see schedule.timesteps
    n: int = 64  # number of samples
    seed: int = 0  # batch b uses a generator seeded with (seed, b): same seed, same images
    batch_size: int = 256  # images per solver call (changing it changes which noise each image gets)
    clip_x0: bool = True  # clamp x̂₀ to the data range [-1, 1] inside the solver (DDPM/DDIM practice)
    opts: dict = field(default_factory=dict)  # extra solver options, e.g. {"eta": 0.5}
    device: str | None = None  # where x_T and the solver run (leandiff.device); None: the network's device

    def __post_init__(self):
        if self.n <= 0:
            raise UserError(f"number of samples must be positive, got {self.n}")
        if self.batch_size <= 0:
            raise UserError(f"batch size must be positive, got {self.batch_size}")
        if self.nfe <= 0:
            raise UserError(f"NFE must be positive, got {self.nfe}")


def solver_timesteps(denoiser: Denoiser, cfg: SampleConfig) -> torch.Tensor:
    per = nfe_per_step(cfg.solver)
    steps = cfg.nfe // per if cfg.nfe % per == 0 else None
    if steps is None or steps < 1:
        raise UserError(f"solver {cfg.solver} spends {per} evaluations per step; NFE {cfg.nfe} is not a positive multiple")
    if steps > denoiser.schedule.T:
        raise UserError(f"NFE {cfg.nfe} needs {steps} steps but the schedule has only T={denoiser.schedule.T}")
    return make_timesteps(denoiser.schedule, steps, cfg.spacing)


@dataclass
class SampleStats:
    images: int = 0
    seconds: float = 0.0
    nfe: float = 0.0  # network evaluations per sample actually spent

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def num_batches(cfg: SampleConfig) -> int:
    return (cfg.n + cfg.batch_size - 1) // cfg.batch_size


def batch_len(cfg: SampleConfig, b: int) -> int:
    """Images in batch ``b`` (the last one may be short)."""
    if not 0 <= b < num_batches(cfg):
        raise ValueError(f"batch {b} out of range for n={cfg.n}, batch_size={cfg.batch_size}")
    return min(cfg.batch_size, cfg.n - b * cfg.batch_size)


def first_nonfinite_layer(net, x: torch.Tensor, t: torch.Tensor) -> str | None:
    """Name of the first module (in execution order) whose output holds NaN/Inf when ``net``
    runs on (x, t); None when the network is not an ``nn.Module`` or every output is finite.
    One extra forward pass, spent only after a failure."""
    if not isinstance(net, nn.Module):
        return None
    found: list[str] = []

    def hook(name):
        def check(module, inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (getattr(output, "sample", output),)
            if not found and any(torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all()
                                 for o in outs):
                found.append(name or type(module).__name__)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n]
    try:
        with torch.no_grad():
            call_network(net, x, t)
    except Exception:  # the diagnosis must never hide the real error
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class _FiniteGuard:
    """Solver callback: stop at the first step whose x is not finite, naming the step, its
    timestep and (one extra forward pass) the first layer that produced NaN/Inf."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, label: str):
        self.denoiser, self.last_x, self.label = denoiser, x, label

    def __call__(self, info: dict) -> None:
        x = info["x"]
        if torch.isfinite(x).all():
            self.last_x = x
            return
        t = info["t"]
        t_val = float(t) if not torch.is_tensor(t) or t.numel() == 1 else float(t.flatten()[0])
        where = first_nonfinite_layer(self.denoiser.net, self.last_x,
                                      torch.full((x.shape[0],), t_val, dtype=torch.float32))
        layer = f"; first non-finite layer: {where}" if where else ""
        raise UserError(f"sampling produced NaN/Inf at step {info['i'] + 1} (timestep t={t_val:g}) of "
                        f"{self.label}{layer}")


class _DeviceFiniteGuard:
    """Solver callback on an accelerator: records, on the device, the first step whose x is not finite
    (no host synchronisation per step); :meth:`check` reads it once after the batch."""

    def __init__(self, label: str):
        self.label, self.first = label, None

    def __call__(self, info: dict) -> None:
        x = info["x"]
        bad = ~torch.isfinite(x).all()
        step = torch.full((), info["i"] + 1, device=x.device, dtype=torch.long)
        if self.first is None:
            self.first = torch.zeros((), device=x.device, dtype=torch.long)
        self.first = torch.where((self.first == 0) & bad, step, self.first)

    def check(self) -> None:
        if self.first is not None and self.first.device.type != "meta" and int(self.first):
            raise UserError(f"sampling produced NaN/Inf at step {int(self.first)} of {self.label}")


def generate(denoiser: Denoiser, shape: tuple[int, int, int], cfg: SampleConfig,
             stats: SampleStats | None = None, progress: bool = False,
             batches: Iterable[int] | None = None) -> Iterator[torch.Tensor]:
    """Yield batches of samples (float, [-1, 1] when the model is good), cfg.n in all.

    ``batches`` picks a subset of the batch indices 0 .. ceil(n / batch_size) − 1 (in the order
    given); batch b is the same images whoever draws it, which is how evaluation shards sampling
    across processes."""
    solver = get_solver(cfg.solver)
    ts = solver_timesteps(denoiser, cfg)
    opts = dict(cfg.opts)
    opts.setdefault("clip_x0", cfg.clip_x0)
    check_options(cfg.solver, opts)
    stats = stats if stats is not None else SampleStats()
    batches = list(range(num_batches(cfg)) if batches is None else batches)
    bar = None
    if progress:
        from .io import progress as progress_bar
        bar = progress_bar(total=sum(batch_len(cfg, b) for b in batches), desc=f"{cfg.solver}-{cfg.nfe}", unit="img", leave=False)
    device = resolve_device(cfg.device) if cfg.device is not None else device_of(denoiser.net)
    for b in batches:
        m = batch_len(cfg, b)
        seed = cfg.seed * 1_000_003 + b
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((m, *shape), generator=g)  # x_T from the CPU generator on every device (the noise rule)
        if device.type != "cpu":
            x = x.to(device)  # once per batch
            g = loop_generator(seed, g, device)  # the steps' noise: the device's own generator
        denoiser.nfe = 0
        t0 = time.perf_counter()
        label = f"{cfg.solver}-{cfg.nfe}, batch {b}"
        # On the CPU every step is checked as it happens; on an accelerator a host check per step would
        # wait for the device, so the steps are checked on the device and read once at the end.
        guard = _FiniteGuard(denoiser, x, label) if device.type == "cpu" else _DeviceFiniteGuard(label)
        with torch.no_grad():
            out = solver(denoiser, x, ts, generator=g, callback=guard, **opts)
        synchronize(device)
        stats.seconds += time.perf_counter() - t0
        stats.nfe = denoiser.nfe  # per batch call == per sample
        stats.images += m
        if device.type != "cpu":
            guard.check()
        if not torch.isfinite(out).all():
            raise UserError(f"sampling produced NaN/Inf (solver {cfg.solver}, NFE {cfg.nfe}, batch {b})")
        if bar is not None:
            bar.update(m)
        yield out
    if bar is not None:
        bar.close()


def sample_all(denoiser: Denoiser, shape, cfg: SampleConfig, stats: SampleStats | None = None,
               progress: bool = False) -> torch.Tensor:
    return torch.cat(list(generate(denoiser, shape, cfg, stats, progress)))
