"""One readable training loop (nanoGPT-style). Fine-tuning, KD and progressive distillation plug
in a different loss function; nothing subclasses the loop.

Determinism and resume: everything random in step s (batch positions, t, ε, dropout) comes from
generators seeded by (seed, s, rank), and the data order is a fixed permutation per epoch, so a
run killed after its last saved state and resumed with ``resume=True`` ends with bit-identical
weights on CPU. Under ``torchrun`` the global batch is split across ranks and DDP averages the
gradients (gloo on CPU ranks, NCCL where each rank has its GPU, ``LOCAL_RANK``). On an accelerator the
data set is moved there once and the step's randomness comes from a generator on the device seeded by the
same (seed, step, rank) (the noise rule of :mod:`leandiff.device`): no tensor crosses between host and
device inside the loop but the loss and gradient-norm scalars of the divergence guard.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import META_NAME, Checkpoint, load_checkpoint, save_checkpoint
from .denoiser import Denoiser
from .device import device_of, generator, resolve_device
from .distributed import init_group, rank_world as _rank_world
from .errors import UserError
from .io import atomic_path, save_grid
from .schedule import log_snr, q_sample, t_of_edm_sigma

NOISE_LEVELS = ("auto", "uniform", "lognormal")
LR_SCHEDULES = ("cosine", "constant", "cosine-restarts")
STATE_NAME = "train_state.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"  # a name from leandiff.data (or folder:PATH)
    data_dir: str | None = None  # where the dataset's files are, when not the default
    model: str = "mnist-tiny"  # a name from leandiff.models.MODEL_CONFIGS (ignored when fine-tuning)
    schedule: str = "linear"  # forward process: linear-β (DDPM) or cosine
    parameterization: str = "eps"  # what the network predicts: eps, v or x0
    weighting: str = "plain"  # a name of WEIGHTINGS: plain, truncated-snr, snr+1, min-snr
    min_snr_gamma: float = 5.0  # min-snr only: γ of min(SNR, γ) (Hang et al. 2023 use 5)
    noise_levels: str = "auto"  # how t is drawn: uniform integer t, or lognormal EDM σ; auto: lognormal for edm
    p_mean: float = -1.2  # lognormal only: ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1)
    p_std: float = 1.2
    x0_weight: float = 0.0  # plain only: adds x0_weight·‖x̂₀ − x₀‖² (for an ε-model (1/SNR)·‖ε̂ − ε‖²)
    steps: int = 10_000  # optimizer steps
    batch_size: int = 128  # global batch (split across DDP ranks)
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_frac: float = 0.05  # cosine decays to lr·min_lr_frac
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup: int = 200  # linear warm-up steps
    lr_schedule: str = "cosine"  # cosine, constant, or cosine-restarts (SGDR, Loshchilov & Hutter 2017)
    restart_period: int = 1000  # cosine-restarts only: steps per cycle
    ema_decay: float = 0.999  # EMA of the weights; the EMA is what the checkpoint holds
    ema_decays: tuple = ()  # more EMA decays kept side by side, each written to out/ema/<decay>/ (pick: leandiff ema)
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    bf16: bool = False  # bf16 autocast for forward/backward (opt-in speed; fp32 master weights)
    seed: int = 0  # everything random derives from it
    log_every: int = 50  # progress-bar refresh
    sample_every: int = 1000  # write a DDIM-50 grid of the EMA model every N steps (0: never)
    checkpoint_every: int = 500  # write checkpoint + resumable state every N steps
    snapshot_every: int = 0  # also keep a copy of the checkpoint(s) every N steps in out/snapshots/ (0: never)
    device: str | None = None  # leandiff.device spec (auto, cpu, cuda[:N], mps); None: where the init network is

    def __post_init__(self):
        from .denoiser import parse_parameterization

        parse_parameterization(self.parameterization)
        object.__setattr__(self, "ema_decays", tuple(float(d) for d in self.ema_decays))
        checks = [(self.weighting in WEIGHTINGS, f"weighting must be one of {', '.join(WEIGHTINGS)}"),
                  (self.min_snr_gamma > 0, f"min_snr_gamma must be positive, got {self.min_snr_gamma}"),
                  (self.noise_levels in NOISE_LEVELS, f"noise_levels must be one of {', '.join(NOISE_LEVELS)}"),
                  (self.p_std > 0, f"p_std must be positive, got {self.p_std}"),
                  (all(0 <= d < 1 for d in self.ema_decays), f"every EMA decay must be in [0, 1), got {self.ema_decays}"),
                  (self.snapshot_every >= 0, f"snapshot_every must be >= 0, got {self.snapshot_every}"),
                  (self.x0_weight >= 0, f"x0_weight must be >= 0, got {self.x0_weight}"),
                  (self.x0_weight == 0 or self.weighting == "plain", "x0_weight adds to the plain loss only"),
                  (self.lr_schedule in LR_SCHEDULES, f"lr schedule must be one of {LR_SCHEDULES}"),
                  (self.steps > 0, f"steps must be positive, got {self.steps}"),
                  (self.batch_size > 0, f"batch size must be positive, got {self.batch_size}"),
                  (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
                  (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
                  (0 <= self.ema_decay < 1, f"EMA decay must be in [0, 1), got {self.ema_decay}"),
                  (self.checkpoint_every > 0, "checkpoint_every must be positive"),
                  (self.restart_period > 0, "restart_period must be positive")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


# Fields that may change between a run and its resumption without changing the result.
_RESUMABLE_CHANGES = {"steps", "log_every", "sample_every", "checkpoint_every", "data_dir", "snapshot_every"}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine (optionally with warm restarts)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    else:
        frac = ((step - cfg.warmup) % cfg.restart_period) / cfg.restart_period
    lo = cfg.lr * cfg.min_lr_frac
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(frac, 1.0)))


# Loss weightings as one table: each maps (SNR, parameterization) to the weight w(SNR) that multiplies
# the per-sample ‖x̂₀ − x₀‖². The loss is computed on the network's own target (its MSE is k·‖x̂₀ − x₀‖²
# with k = target_scale(SNR)), so a weighting costs nothing where w = k and stays well conditioned.
WEIGHTINGS: dict[str, Callable] = {
    # MSE on the network's own target (ε, v, x₀, or EDM's F, whose MSE is EDM's λ(σ)-weighted loss)
    "plain": lambda snr, k, gamma: k,
    # Salimans & Ho 2022, §4 (eq. 9): max(SNR, 1)
    "truncated-snr": lambda snr, k, gamma: snr.clamp(min=1.0),
    # Salimans & Ho 2022, §4 (eq. 10): SNR + 1, equal to v-MSE
    "snr+1": lambda snr, k, gamma: snr + 1,
    # Hang et al. 2023 (Min-SNR-γ): min(SNR, γ) on x₀-MSE, i.e. min(SNR, γ)/SNR on ε-MSE, min(SNR, γ)/(SNR + 1) on v-MSE
    "min-snr": lambda snr, k, gamma: snr.clamp(max=gamma),
}


def loss_weight(weighting: str, snr: torch.Tensor, parameterization: str, gamma: float = 5.0) -> torch.Tensor:
    """Weight on the MSE of the network's own target for ``weighting`` at ``snr`` (see WEIGHTINGS)."""
    from .denoiser import target_scale

    if weighting not in WEIGHTINGS:
        raise UserError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    k = target_scale(parameterization, snr)
    return WEIGHTINGS[weighting](snr, k, gamma) / k


def draw_timesteps(schedule, n: int, g: torch.Generator, noise_levels: str = "uniform",
                   p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """Training timesteps: uniform integers 0..T-1 (DDPM), or EDM's log-normal σ (Karras et al. 2022,
    §5: ln σ ~ N(P_mean, P_std²)) mapped to the fractional VP t with σ_t/α_t = σ, clamped to the schedule."""
    if noise_levels == "lognormal":
        sigma = (torch.randn(n, generator=g, dtype=torch.float64, device=g.device) * p_std + p_mean).exp()
        return t_of_edm_sigma(schedule, sigma).float()
    return torch.randint(0, schedule.T, (n,), generator=g, device=g.device)


class DiffusionLoss:
    """The denoising loss: t drawn by ``noise_levels``, x_t = α x₀ + σ ε, and the MSE of the network's
    output against its own target weighted by ``weighting`` (the WEIGHTINGS table).

    ``x0_weight`` = λ > 0 (plain only) adds λ·‖x₀ − x̂₀‖²: for an ε-model that is λ/SNR·‖ε − ε̂‖², a
    bounded boost of the high-noise steps, whose ε error the plain loss barely sees (at t = 999 of the
    linear schedule 1/SNR ≈ 2.5e4) although the sampler divides it by √ᾱ_t. snr+1 is the λ = 1 case
    plus the plain term; on a pruned mnist-tiny it fixed t > 800 and broke t < 500 (docs/pruning.md)."""

    def __init__(self, weighting: str = "plain", x0_weight: float = 0.0, *, gamma: float = 5.0,
                 noise_levels: str = "uniform", p_mean: float = -1.2, p_std: float = 1.2):
        if weighting not in WEIGHTINGS:
            raise UserError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.weighting, self.x0_weight, self.gamma = weighting, float(x0_weight), float(gamma)
        self.noise_levels, self.p_mean, self.p_std = noise_levels, p_mean, p_std

    @classmethod
    def from_config(cls, cfg: "TrainConfig", parameterization: str) -> "DiffusionLoss":
        levels = cfg.noise_levels
        if levels == "auto":
            levels = "lognormal" if parameterization.startswith("edm") else "uniform"
        return cls(cfg.weighting, cfg.x0_weight, gamma=cfg.min_snr_gamma, noise_levels=levels,
                   p_mean=cfg.p_mean, p_std=cfg.p_std)

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = draw_timesteps(denoiser.schedule, x0.shape[0], g, self.noise_levels, self.p_mean, self.p_std)
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        xt = q_sample(denoiser.schedule, x0, t, noise)
        out = denoiser(xt, t).float()
        per = (out - denoiser.target(x0, noise, t)).pow(2).flatten(1).mean(1)
        if self.weighting != "plain":
            snr = log_snr(denoiser.schedule, t).exp().float()
            per = per * loss_weight(self.weighting, snr, denoiser.parameterization, self.gamma)
        loss = per.mean()
        if self.x0_weight:
            loss = loss + self.x0_weight * (denoiser.convert(out, xt, t)[1] - x0).pow(2).mean()
        return loss


def _batch_indices(n: int, step: int, cfg: TrainConfig, rank: int, world: int) -> torch.Tensor:
    """Positions [step·B, (step+1)·B) of an endless sequence of per-epoch permutations; rank r
    takes its contiguous slice."""
    B = cfg.batch_size
    pos = torch.arange(step * B, (step + 1) * B)
    per = B // world
    pos = pos[rank * per:(rank + 1) * per]
    out = torch.empty_like(pos)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        sel = pos.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[pos[sel] % n]
    return out


class _DeviceBatches:
    """:func:`_batch_indices` computed on an accelerator: each epoch's permutation (drawn on the CPU, as
    there) is copied to the device once, so a step's indices need no host-device copy. Same indices."""

    def __init__(self, n: int, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.n, self.cfg, self.rank, self.world, self.device = n, cfg, rank, world, device
        self.perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self.perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self.perms = {e: p for e, p in self.perms.items() if e >= epoch - 1}  # keep at most two
            self.perms[epoch] = torch.randperm(self.n, generator=g).to(self.device)
        return self.perms[epoch]

    def __call__(self, step: int) -> torch.Tensor:
        B, n = self.cfg.batch_size, self.n
        per = B // self.world
        lo = step * B + self.rank * per  # this rank's positions [lo, lo + per) of the endless sequence
        pos = torch.arange(lo, lo + per, device=self.device)
        out = torch.empty_like(pos)
        for epoch in range(lo // n, (lo + per - 1) // n + 1):
            sel = pos.div(n, rounding_mode="floor") == epoch
            out = torch.where(sel, self._perm(epoch)[pos % n], out)
        return out


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def _as_saved(cfg: TrainConfig) -> dict:
    """The config as its JSON metadata reads back (tuples become lists), so a checkpoint written now and
    the same checkpoint loaded later carry equal records."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _ema_name(decay: float) -> str:
    """The folder (under out/ema/) and state prefix of an extra EMA: its decay as written, e.g. 0.9999."""
    return repr(float(decay))


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict:
    """An optimizer's per-parameter state as flat tensors ``{prefix}{i}.{name}`` (a safetensors-able dict)."""
    return {f"{prefix}{i}.{k}": torch.as_tensor(v) for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict, prefix: str) -> None:
    """The inverse of :func:`optimizer_tensors` (the param groups stay the optimizer's own)."""
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            i, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _save_state(path: Path, step: int, seconds: tuple[float, float], cfg: TrainConfig, net, ema, opt,
                extra=None, loss_fn=None) -> None:
    from safetensors.torch import save_file

    def host(v):  # a CPU copy: the state file is the same whatever device trained
        return torch.as_tensor(v).detach().to("cpu", copy=True)

    tensors = {f"net.{k}": host(v) for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": host(v) for k, v in ema.state_dict().items()})
    for d, e in (extra or {}).items():
        tensors.update({f"ema@{_ema_name(d)}.{k}": host(v) for k, v in e.state_dict().items()})
    tensors.update({k: host(v) for k, v in optimizer_tensors(opt, "opt.").items()})
    if hasattr(loss_fn, "state_dict"):  # a loss with state of its own (consistency distillation's target network)
        tensors.update({f"loss.{k}": host(v) for k, v in loss_fn.state_dict().items()})
    meta = {"step": str(step), "seconds": repr(seconds[0]), "cpu_seconds": repr(seconds[1]), "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_state(path: Path, cfg: TrainConfig, net, ema, opt, extra=None,
                loss_fn=None) -> tuple[int, tuple[float, float]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        saved = json.loads(meta["config"])
        step = int(meta["step"])
        seconds = (float(meta.get("seconds", 0.0)), float(meta.get("cpu_seconds", 0.0)))
    except Exception as e:
        raise UserError(f"{path}: unreadable training state ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    now = _as_saved(cfg)
    saved.setdefault("device", "cpu")  # written before devices were recorded: a CPU run
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise UserError(f"cannot resume: settings differ from the saved run in {', '.join(changed)}")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for d, e in (extra or {}).items():
        pre = f"ema@{_ema_name(d)}."
        e.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    if hasattr(loss_fn, "load_state_dict"):
        loss_fn.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})
    load_optimizer_tensors(opt, tensors, "opt.")
    return step, seconds


LossFn = Callable[[Denoiser, torch.Tensor, torch.Generator], torch.Tensor]


def train(cfg: TrainConfig, out_dir: str | Path, *, init: Checkpoint, images: torch.Tensor,
          loss_fn: LossFn | None = None, resume: bool = False, lineage_step: dict | None = None,
          progress: bool = True) -> Checkpoint:
    """Train ``init.net`` on ``images`` (N×C×H×W in [-1, 1]); write the EMA checkpoint to out_dir.

    ``loss_fn(denoiser, x0_batch, generator) -> scalar`` defaults to :class:`DiffusionLoss`;
    fine-tuning, KD and distillation pass their own.
    """
    out_dir = Path(out_dir)
    rank, world = _rank_world()
    if world > 1:
        init_group()  # gloo for CPU tensors, NCCL for this rank's GPU
    device = resolve_device(cfg.device) if cfg.device is not None else device_of(init.net)
    cfg = dataclasses.replace(cfg, device=str(device))  # the run records where it ran
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    loss_fn = loss_fn or DiffusionLoss.from_config(cfg, init.parameterization)

    net = init.net.to(device)
    net.train()
    images = images.to(device)  # once: no host-device copy per step
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # Several EMA decays side by side (the profile is chosen after training: `leandiff ema`)
    extra = {d: copy.deepcopy(net).eval().requires_grad_(False) for d in cfg.ema_decays if d != cfg.ema_decay}
    model = net
    # DDP under torchrun, and in any process group a caller set up (one GPU, world size 1, included)
    if world > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    denoiser = Denoiser(model, init.schedule, init.parameterization)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    state_path = out_dir / STATE_NAME
    start, seconds_before = 0, (0.0, 0.0)  # (wall, CPU time of this process: core-seconds)
    if resume and state_path.is_file():
        start, seconds_before = _load_state(state_path, cfg, net, ema, opt, extra, loss_fn)
    elif resume and rank == 0:
        print(f"no saved state in {out_dir}; starting from step 0")

    def as_checkpoint(weights: nn.Module, decay: float, step: int, seconds: tuple[float, float]) -> Checkpoint:
        ck = Checkpoint(net=weights, arch=init.arch, schedule=init.schedule, parameterization=init.parameterization,
                        meta=copy.deepcopy(init.meta))
        ck.meta["train"] = {**_as_saved(cfg), "completed_steps": step, "world_size": world,
                            "wall_seconds": round(seconds[0], 1), "cpu_seconds": round(seconds[1], 1),
                            "num_images": n}
        ck.meta["ema"] = {"profile": "exponential", "decay": decay,
                          "warmup": "min(decay, (1 + step)/(10 + step))"}
        if step == cfg.steps:
            ck.lineage.append({"step": "train", "parent": init.hash() if init.path else None,
                               "settings": lineage_step or _as_saved(cfg)})
        return ck

    def write_checkpoint(step: int, seconds: tuple[float, float], where: Path = out_dir, state: bool = True):
        if state:
            _save_state(state_path, step, seconds, cfg, net, ema, opt, extra, loss_fn)
        for d, e in extra.items():
            save_checkpoint(as_checkpoint(e, d, step, seconds), where / "ema" / _ema_name(d))
        ck = as_checkpoint(ema, cfg.ema_decay, step, seconds)
        save_checkpoint(ck, where)
        ck.path = out_dir
        return ck

    n = images.shape[0]
    bar = None
    if progress and rank == 0:
        from .io import progress as progress_bar
        bar = progress_bar(total=cfg.steps, initial=start, desc="train", unit="step")
    smooth, seen, t_start, t_mark = None, 0, time.perf_counter(), time.perf_counter()
    cpu_start = time.process_time()

    def elapsed() -> tuple[float, float]:
        return (seconds_before[0] + time.perf_counter() - t_start, seconds_before[1] + time.process_time() - cpu_start)

    ck = None
    on_device = _DeviceBatches(n, cfg, rank, world, device) if device.type != "cpu" else None
    for step in range(start, cfg.steps):
        # All randomness of this step comes from (seed, step, rank): resumable and rank-distinct.
        g = generator((cfg.seed * 1_000_003 + step) * 64 + rank, device)
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank + 17)  # dropout
        x0 = images[_batch_indices(n, step, cfg, rank, world) if on_device is None else on_device(step)]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = loss_fn(denoiser, x0, g)
        if on_device is None and not torch.isfinite(loss):  # on an accelerator: checked with the gradient, below
            raise UserError(f"training diverged: loss is {loss.item()} at step {step}{_first_nonfinite(net, 'weight')}; "
                            f"the last good checkpoint in {out_dir} is left as it was")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The global gradient norm (clipped when grad_clip > 0) also guards the update: a NaN/Inf
        # gradient must not reach the weights, the EMA or the next checkpoint.
        gnorm = nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if on_device is not None:
            # One host read per step on an accelerator (the loss, for the guard and the progress line): a
            # NaN loss gives a NaN gradient norm, so checking both here still stops before the update.
            loss_value, gnorm_value = torch.stack([loss.detach().float(), gnorm.detach().float()]).tolist()
            if not math.isfinite(loss_value):
                raise UserError(f"training diverged: loss is {loss_value} at step {step}{_first_nonfinite(net, 'weight')}; "
                                f"the last good checkpoint in {out_dir} is left as it was")
            gnorm = torch.tensor(gnorm_value)
        if not torch.isfinite(gnorm):
            raise UserError(f"training diverged: gradient is NaN/Inf at step {step}{_first_nonfinite(net, 'gradient')}; "
                            f"the last good checkpoint in {out_dir} is left as it was")
        opt.step()
        # EMA with the usual warm-up so that early checkpoints are usable.
        _ema_update(ema, net, min(cfg.ema_decay, (1 + step) / (10 + step)))
        for d, e in extra.items():
            _ema_update(e, net, min(d, (1 + step) / (10 + step)))

        done = step + 1
        seen += x0.shape[0] * world
        loss_now = loss.item() if on_device is None else loss_value
        smooth = loss_now if smooth is None else 0.98 * smooth + 0.02 * loss_now
        if bar is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{seen / (now - t_mark):.0f}", lr=f"{lr_at(cfg, step):.1e}")
            bar.update(done - bar.n)
            seen, t_mark = 0, now
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            ck = write_checkpoint(done, elapsed())
            if bar is not None and bar.disable:  # not a terminal: one plain log line per checkpoint
                print(f"step {done}/{cfg.steps} loss {smooth:.4f} "
                      f"elapsed {elapsed()[0]:.0f}s", flush=True)
        if rank == 0 and cfg.snapshot_every and done % cfg.snapshot_every == 0:
            write_checkpoint(done, elapsed(),
                             out_dir / "snapshots" / f"step_{done:07d}", state=False)
        if rank == 0 and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            _write_grid(ema, init, out_dir / "samples" / f"step_{done:07d}.png")
    if bar is not None:
        bar.close()
    if world > 1:
        torch.distributed.barrier()
        if rank != 0:  # every rank returns what rank 0 wrote (its metadata included)
            ck = load_checkpoint(out_dir, device)
        # rank 0 may write out_dir again next (a recipe saves its step's checkpoint there): not before every
        # rank has read it (rank 1 once read a new weights file beside the old metadata and stopped)
        torch.distributed.barrier()
    if ck is None and (out_dir / META_NAME).is_file():
        # resumed a run that had already finished: what it wrote (its train record and lineage
        # included), not the init's metadata
        ck = load_checkpoint(out_dir, device)
    if ck is None:
        ck = Checkpoint(net=ema, arch=init.arch, schedule=init.schedule,
                        parameterization=init.parameterization, meta=copy.deepcopy(init.meta), path=out_dir)
    net.eval()
    return ck


def _first_nonfinite(net: nn.Module, what: str) -> str:
    """' (first non-finite <what>: <parameter name>)' or '' — names the layer at fault."""
    for name, p in net.named_parameters():
        v = p if what == "weight" else p.grad
        if v is not None and not torch.isfinite(v).all():
            return f" (first non-finite {what}: {name})"
    return ""


def _write_grid(ema: nn.Module, init: Checkpoint, path: Path) -> None:
    """A DDIM-50 grid of 64 EMA samples with a fixed seed, to watch training progress."""
    from .models import image_shape
    from .sample import SampleConfig, sample_all

    d = Denoiser(ema, init.schedule, init.parameterization)
    x = sample_all(d, image_shape(init.arch), SampleConfig("ddim", 50, n=64, seed=0, batch_size=64))
    save_grid(x, path, nrow=8)


def init_checkpoint(cfg: TrainConfig, init_path: str | None = None) -> Checkpoint:
    """The starting point of a run: a given checkpoint (fine-tuning) or a fresh ``cfg.model``
    initialised from ``cfg.seed``."""
    from .checkpoint import load_checkpoint
    from .denoiser import canonical_parameterization
    from .models import architecture, build_network
    from .schedule import Schedule

    if init_path:
        return load_checkpoint(init_path)
    arch = architecture(cfg.model)
    torch.manual_seed(cfg.seed)
    return Checkpoint(net=build_network(arch), arch=arch, schedule=Schedule(cfg.schedule),
                      parameterization=canonical_parameterization(cfg.parameterization), meta={"dataset": cfg.dataset})


def training_images(cfg: TrainConfig, init: Checkpoint) -> torch.Tensor:
    from .data import load_dataset
    from .models import image_shape

    return load_dataset(cfg.dataset, "train", cfg.data_dir, shape=image_shape(init.arch)).images
