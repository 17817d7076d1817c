"""Checkpoints are data: safetensors weights + JSON metadata, written atomically.

A leandiff checkpoint is a directory::

    DIR/leandiff.json       format, architecture (as it actually is), schedule, parameterization,
                            training config, lineage, metrics
    DIR/model.safetensors   the weights (the JSON is also embedded in its header, so the file
                            alone is a complete checkpoint)

Also accepted: a single ``.safetensors`` file written by leandiff; a diffusers model directory
(``config.json`` + ``diffusion_pytorch_model.safetensors``, or a pipeline directory with
``unet/`` and ``scheduler/``); a foreign ``.pt/.pth/.ckpt`` state dict, read with
``torch.load(weights_only=True)`` and only beside a ``leandiff.json`` or ``config.json`` that
describes the architecture. Nothing is ever unpickled with code execution.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .denoiser import Denoiser, canonical_parameterization
from .device import resolve_device
from .errors import UserError
from .io import atomic_path, read_json, write_json
from .models import UNET, build_network
from .schedule import Schedule
from .solvers import DEFAULT_NFE, DEFAULT_SOLVER, DEFAULT_SOLVER_SPACING
from .spec import Step

FORMAT = "leandiff-checkpoint"
VERSION = 1
META_NAME = "leandiff.json"
WEIGHTS_NAME = "model.safetensors"
ZOO_DIR = Path(__file__).parent / "zoo"


@dataclass
class Checkpoint:
    """A network with everything needed to use it as a diffusion model."""

    net: nn.Module
    arch: dict  # architecture record, see models.build_network
    schedule: Schedule
    parameterization: str = "eps"
    meta: dict = field(default_factory=dict)  # train config, lineage, metrics, sampler defaults
    path: Path | None = None  # where it was loaded from

    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, self.parameterization)

    @property
    def lineage(self) -> list:
        return self.meta.setdefault("lineage", [])

    def metadata(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "architecture": self.arch,
                "schedule": self.schedule.to_dict(), "parameterization": self.parameterization,
                **{k: v for k, v in self.meta.items() if k not in ("format", "version")}}

    def sampling_defaults(self, solver: str | None = None, nfe: int | None = None,
                          runtime: str | None = None) -> tuple[str, int, str]:
        """(solver, NFE, runtime) to use when the user names none: what the checkpoint records
        (a distilled model its intended NFE, a shipped base the best sampler its card measured at a
        modest NFE, a quantized model its runtime), else solvers.DEFAULT_SOLVER/DEFAULT_NFE on eager."""
        rec = self._sampler()
        rt = self.meta.get("runtime")
        if isinstance(rt, dict):  # {name, args} (older checkpoints hold a name string)
            rt = str(Step(str(rt.get("name")), dict(rt.get("args") or {}), 0)) if rt.get("args") else rt.get("name")
        # `is None`, not `or`: an explicit NFE 0 or solver "" is the user's, to be refused downstream
        return (solver if solver is not None else rec.get("solver") or DEFAULT_SOLVER,
                int(nfe if nfe is not None else rec.get("nfe") or DEFAULT_NFE),
                runtime if runtime is not None else (rt if isinstance(rt, str) else None) or "eager")

    def default_spacing(self, spacing: str | None = None, solver: str | None = None) -> str:
        """Timestep spacing when the user names none: the recorded one (a progressively distilled
        student is trained on trailing steps and is only right on them), else the schedule's default
        (schedule.DEFAULT_SPACINGS: logsnr for linear β, trailing for cosine). A sampler a model card
        recommends (source "card") brings its spacing only to its own solver: ``solver`` is the one
        that will run (None: the recorded one, else solvers.DEFAULT_SOLVER, whose spacing is
        DEFAULT_SOLVER_SPACING)."""
        if spacing is not None:
            return spacing
        rec = self._sampler()
        if rec.get("source") == "card" and solver is not None and solver != rec.get("solver"):
            rec = {}
        if not rec and (solver or DEFAULT_SOLVER) == DEFAULT_SOLVER:  # the default sampler is a triple
            return DEFAULT_SOLVER_SPACING
        return str(rec.get("spacing") or self.schedule.default_spacing)

    def _sampler(self) -> dict:
        """The sampler a compression step recorded (meta["sampler"]: solver, nfe, spacing), or {}."""
        rec = self.meta.get("sampler")
        return rec if isinstance(rec, dict) else {}

    @property
    def name(self) -> str:
        """The one name shown for this checkpoint everywhere: ``zoo:NAME`` for a shipped model, else its
        path as given (``(in memory)`` when it was never saved)."""
        return display_name(self.path) if self.path is not None else "(in memory)"

    def hash(self) -> str:
        """Short content hash of the weights (sha256 over names, shapes and bytes)."""
        return weights_hash(self.net.state_dict())


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().contiguous().cpu()
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(ckpt: Checkpoint, out_dir: str | Path) -> Path:
    """Write DIR/model.safetensors then DIR/leandiff.json, each atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in ckpt.net.state_dict().items()}
    meta = ckpt.metadata()
    meta["weights_sha"] = weights_hash(state)
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"leandiff": json.dumps(meta, sort_keys=True)})
    write_json(out_dir / META_NAME, meta)
    ckpt.path = out_dir
    return out_dir


def display_name(path: str | Path) -> str:
    """``zoo:NAME`` for a shipped model's directory (or a file in it), else the path as given."""
    p = Path(path)
    try:
        zoo = ZOO_DIR.resolve()
        r = p.resolve()
        rel = r.relative_to(zoo)
    except (OSError, ValueError):
        return str(path)
    return f"zoo:{rel.parts[0]}" if rel.parts else str(path)


def resolve(path: str | Path) -> Path:
    """``zoo:NAME`` -> the shipped model directory; anything else as a path."""
    s = str(path)
    if s.startswith("zoo:"):
        name = s[4:]
        p = ZOO_DIR / name
        if not (p / META_NAME).is_file():
            known = sorted(d.name for d in ZOO_DIR.iterdir() if (d / META_NAME).is_file()) if ZOO_DIR.is_dir() else []
            raise UserError(f"no shipped model {name!r} in the zoo; shipped: {', '.join(known) or 'none'}")
        return p
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device | None = None) -> Checkpoint:
    """Load any supported checkpoint form (see module docstring) onto ``device`` (None: the CPU; the files
    are device-free); user errors raise UserError."""
    ck = _load_any(path)
    if device is not None:
        ck.net.to(resolve_device(device))
    return ck


def _load_any(path: str | Path) -> Checkpoint:
    p = resolve(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint file or directory")
    if p.is_dir():
        if (p / META_NAME).is_file():
            return _load_leandiff(p / WEIGHTS_NAME, read_json(p / META_NAME), p)
        if (p / "unet" / "config.json").is_file():
            return _load_diffusers(p / "unet", p / "scheduler" / "scheduler_config.json")
        if (p / "config.json").is_file():
            return _load_diffusers(p, p.parent / "scheduler" / "scheduler_config.json")
        raise UserError(f"{p}: not a checkpoint directory (expected {META_NAME} or a diffusers config.json)")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        meta = _safetensors_meta(p)
        if meta is None:
            side = p.parent / META_NAME
            if not side.is_file():
                raise UserError(f"{p}: safetensors file without leandiff metadata and no {META_NAME} beside it")
            meta = read_json(side)
        return _load_leandiff(p, meta, p)
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _load_torch_file(p)
    raise UserError(f"{p}: unknown checkpoint type (expected a directory, .safetensors, .pt/.pth/.ckpt)")


def _safetensors_meta(p: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("leandiff")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{p}: not a readable safetensors file ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"{p}: corrupt leandiff metadata in the safetensors header") from None


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not p.is_file():
        raise UserError(f"{p}: weights file missing")
    try:
        return load_file(str(p))
    except Exception as e:
        raise UserError(f"{p}: not a readable safetensors file ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None


def _load_leandiff(weights: Path, meta: dict, origin: Path) -> Checkpoint:
    if meta.get("format") != FORMAT:
        raise UserError(f"{origin}: not a leandiff checkpoint (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise UserError(f"{origin}: unsupported checkpoint version {meta.get('version')!r} (this leandiff reads {VERSION})")
    try:
        param = canonical_parameterization(meta.get("parameterization", "eps"))
    except UserError as e:
        raise UserError(f"{origin}: {e}") from None
    arch = meta.get("architecture")
    net = build_network(arch)
    _load_state(net, _read_safetensors(weights), origin)
    rest = {k: v for k, v in meta.items() if k not in ("format", "version", "architecture", "schedule",
                                                       "parameterization", "weights_sha")}
    return Checkpoint(net=net, arch=arch, schedule=Schedule.from_dict(meta.get("schedule") or {}),
                      parameterization=param, meta=rest, path=origin)


def _load_state(net: nn.Module, state: dict[str, torch.Tensor], origin: Path) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{origin}: weight {k} contains NaN or Inf")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        detail = " ".join(s.strip() for s in first[:3])[:240]
        raise UserError(f"{origin}: weights do not fit the architecture: {detail}") from None
    net.eval()


def _load_diffusers(unet_dir: Path, scheduler_cfg: Path) -> Checkpoint:
    cfg = read_json(unet_dir / "config.json")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{unet_dir}: diffusers model {cfg.get('_class_name')!r} is not a UNet2DModel")
    arch = {"type": UNET, "config": {k: v for k, v in cfg.items() if not k.startswith("_")}}
    net = build_network(arch)
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{unet_dir}: expected diffusion_pytorch_model.safetensors (pickled .bin weights are not loaded)")
    _load_state(net, _read_safetensors(weights), unet_dir)
    schedule, param = Schedule("linear"), "eps"
    if scheduler_cfg.is_file():
        s = read_json(scheduler_cfg)
        kind = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(s.get("beta_schedule", "linear"))
        if kind is None:
            raise UserError(f"{scheduler_cfg}: unsupported beta_schedule {s.get('beta_schedule')!r}")
        schedule = Schedule(kind, int(s.get("num_train_timesteps", 1000)),
                            float(s.get("beta_start", 1e-4)), float(s.get("beta_end", 0.02)))
        param = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(s.get("prediction_type", "epsilon"), "eps")
    return Checkpoint(net=net, arch=arch, schedule=schedule, parameterization=param,
                      meta={"lineage": [{"step": "import", "settings": {"diffusers": str(unet_dir)}}]},
                      path=unet_dir)


def _load_torch_file(p: Path) -> Checkpoint:
    """A foreign torch file: tensors only (weights_only=True), architecture from a JSON beside it."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only unpickling of arbitrary bytes fails in many ways (IndexError, EOFError, ...)
        raise UserError(f"{p}: refused to load (only plain tensor state dicts are read, with weights_only=True): "
                        f"{(str(e).splitlines() or [type(e).__name__])[0][:120]}") from None
    for key in ("ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{p}: expected a state dict of tensors")
    if (p.parent / META_NAME).is_file():
        meta = read_json(p.parent / META_NAME)
        ck = _load_leandiff_meta_only(meta, p)
    elif (p.parent / "config.json").is_file():
        cfg = read_json(p.parent / "config.json")
        arch = {"type": UNET, "config": {k: v for k, v in cfg.items() if not k.startswith("_")}}
        ck = Checkpoint(net=build_network(arch), arch=arch, schedule=Schedule("linear"), path=p)
    else:
        raise UserError(f"{p}: foreign checkpoint with no {META_NAME} or config.json beside it to describe the architecture")
    _load_state(ck.net, obj, p)
    ck.lineage.append({"step": "import", "settings": {"torch_file": str(p)}})
    return ck


def _load_leandiff_meta_only(meta: dict, origin: Path) -> Checkpoint:
    arch = meta.get("architecture")
    return Checkpoint(net=build_network(arch), arch=arch, schedule=Schedule.from_dict(meta.get("schedule") or {}),
                      parameterization=meta.get("parameterization", "eps"),
                      meta=copy.deepcopy({k: v for k, v in meta.items() if k in ("lineage", "train")}), path=origin)
