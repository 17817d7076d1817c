"""Evaluate one (checkpoint, solver, NFE, runtime) into one row: quality + cost + protocol.

The row is plain JSON data; ``leandiff eval`` appends it to a JSONL file, ``leandiff report``
turns many of them into tables and plots. The pieces, one home each: sampling and embedding
(:mod:`.sampling`, sharded under torchrun by :mod:`.sharding`), quality (:mod:`.quality`, registry
``METRICS``), cost (:func:`cost_of`), the protocol and the results files (:mod:`.protocol`).
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..cost import (LatencyConfig, checkpoint_bytes, count_params, machine_info, machine_load, macs_per_image,
                    macs_per_image_nonzero, measure_latency)
from ..data import load_dataset
from ..denoiser import Denoiser
from ..device import device_of, noise_rule, resolve_device
from ..distributed import rank_world
from ..errors import UserError
from ..io import save_grid
from ..models import image_shape
from ..runtime import get_runtime
from ..sample import SampleConfig
from ..schedule import DEFAULT_SPACING
from .classifier import Classifier, load_classifier
from .metrics import KIDConfig, kid_subset_size
from .protocol import SCHEMA, append_row, flatten, markdown_header, markdown_row, read_rows  # noqa: F401
from .quality import QualityInputs, pr_size, quality, small_sample_warnings
from .reference import ReferenceStats, reference_stats
from .sampling import Sampled, sample_and_embed


@dataclass(frozen=True)
class EvalConfig:
    solver: str = "ddim"  # a name in leandiff.solvers.SOLVERS
    nfe: int = 50  # network evaluations per sample
    n: int = 2048  # generated samples
    seed: int = 0  # sampling seed (see SampleConfig); also seeds KID subsets, PR subsampling, MSE noise
    spacing: str = DEFAULT_SPACING  # timestep spacing, see schedule.timesteps
    runtime: str = "eager"  # a name in leandiff.runtime.RUNTIMES
    batch_size: int = 256  # images per solver call
    clip_x0: bool = True  # clamp x̂₀ to [-1, 1] inside the solver
    opts: dict = field(default_factory=dict)  # extra solver options, e.g. {"eta": 0.5}
    dataset: str | None = None  # reference dataset; None: the checkpoint's meta["dataset"]
    data_dir: str | None = None  # where the dataset's files are, when not the default
    classifier: str | None = None  # classifier directory; None: the shipped one for the dataset
    kid: KIDConfig = KIDConfig()  # KID subsets
    pr_k: int = 3  # k of the k-NN manifolds (Kynkäänniemi et al. 2019 use 3)
    pr_max: int = 10_000  # cap on the points per set for precision/recall (seeded subsample)
    mse_n: int = 1000  # held-out images for the MiniDiff MSE (capped at the split's size)
    latency: LatencyConfig | None = LatencyConfig()  # per-evaluation latency; None skips it
    grid_n: int = 64  # samples in the saved grid
    inception: bool = False  # also standard Inception FID (only when asked: needs torch-fidelity and its weights)
    device: str | None = None  # leandiff.device spec (auto, cpu, cuda[:N], mps); None: where the checkpoint's network is

    def __post_init__(self):
        if self.n < 2:
            raise UserError(f"evaluation needs at least 2 samples, got {self.n}")
        if self.pr_k < 1:
            raise UserError(f"precision/recall k must be >= 1, got {self.pr_k}")


def resolve_dataset(ckpt, override: str | None) -> str:
    ds = override or ckpt.meta.get("dataset") or (ckpt.meta.get("train") or {}).get("dataset")
    if not ds:
        raise UserError(f"{ckpt.name}: the checkpoint does not say which dataset it models; give --dataset")
    return ds


def evaluate_checkpoint(ckpt, cfg: EvalConfig, *, classifier: Classifier | None = None,
                        reference: ReferenceStats | None = None, grid_path: str | Path | None = None,
                        progress: bool = False, log=print) -> dict | None:
    """Sample ``cfg.n`` images from ``ckpt`` (a Checkpoint or anything load_checkpoint takes) and
    return the row: ``{"schema", "checkpoint", "protocol", "quality", "cost", "grid", "machine", ...}``.

    Under torchrun (WORLD_SIZE > 1) the sampling is sharded across the processes
    (:func:`leandiff.evaluate.sharding.evaluate_shard`); rank 0 computes the metrics and returns the row,
    other ranks return None."""
    if isinstance(ckpt, (str, Path)):
        ckpt = load_checkpoint(ckpt)
    label = ckpt.name  # zoo:NAME for a shipped model, as bench, the demo and info name it
    t_start = time.perf_counter()
    device = resolve_device(cfg.device) if cfg.device is not None else device_of(ckpt.net)
    dataset = resolve_dataset(ckpt, cfg.dataset)
    shape = image_shape(ckpt.arch)
    clf = classifier or load_classifier(cfg.classifier or dataset)
    if clf.net.body[0].in_channels != shape[0]:
        raise UserError(f"classifier for {clf.dataset} takes {clf.net.body[0].in_channels}-channel images "
                        f"but the model makes {shape}; give the matching --dataset")
    held = load_dataset(dataset, "test", cfg.data_dir, shape=shape)  # reference split and MSE images
    ref = reference or reference_stats(clf, dataset, cfg.data_dir, progress=progress, data=held)
    if ref.classifier_hash != clf.hash:
        raise UserError(f"reference statistics were computed with classifier {ref.classifier_hash}, "
                        f"not with {clf.hash}: recompute them for this classifier")
    runtime = get_runtime(cfg.runtime, device)  # unknown names, or a device it does not run on, fail before any work
    clf.net.to(device)  # the classifier embeds where the images are made
    net = runtime(ckpt)
    denoiser = Denoiser(net, ckpt.schedule, ckpt.parameterization)
    inc, inc_note = _inception(cfg, log)

    # Sample and embed, batch by batch.
    scfg = SampleConfig(solver=cfg.solver, nfe=cfg.nfe, spacing=cfg.spacing, n=cfg.n, seed=cfg.seed,
                        batch_size=cfg.batch_size, clip_x0=cfg.clip_x0, opts=dict(cfg.opts), device=str(device))
    if rank_world()[1] > 1 and inc is not None:
        log("Inception FID is computed in single-process evaluation only; skipped under torchrun")
        inc, inc_note = None, "skipped: sharded evaluation (single-process only)"
    s = sample_and_embed(net, denoiser, shape, scfg, clf, cfg.grid_n, inc, progress=progress)
    if s is None:  # not rank 0: its share is with rank 0 now
        return None

    # Quality.
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.mse_n]
    mse_images = held.images[pick.sort().values]  # a seeded subset: splits may be sorted by class
    q_in = QualityInputs(s.acc, ref, cfg, denoiser, mse_images)
    qual = {**quality(q_in), "fid_inception": None}
    warnings = small_sample_warnings(q_in)
    for w in warnings:
        log(f"warning: {w}")
    if inc is not None:
        for i in range(0, len(held), 256):
            inc.add_real(held.images[i:i + 256])
        qual["fid_inception"] = inc.compute()

    cost = cost_of(ckpt, net, shape, s, cfg, progress)
    grid_file = None
    if grid_path is not None and s.grid:
        save_grid(torch.cat(s.grid), grid_path)
        grid_file = str(grid_path)

    fake = s.acc.features
    protocol = {"n": cfg.n, "seed": cfg.seed, "solver": cfg.solver, "nfe": cfg.nfe, "nfe_used": s.stats.nfe,
                "spacing": cfg.spacing, "runtime": cfg.runtime, "runtime_description": runtime.description,
                "batch_size": cfg.batch_size, "clip_x0": cfg.clip_x0, "solver_opts": dict(cfg.opts),
                "feature_net": clf.describe(), "reference": ref.describe(),
                "kid": {**asdict(cfg.kid), "subset_size_used": kid_subset_size(cfg.kid, len(ref.features), len(fake))},
                "pr": {"k": cfg.pr_k, "n": pr_size(q_in)},
                "mse": {"n": int(mse_images.shape[0]), "split": "test", "seed": cfg.seed,
                        "target": ckpt.parameterization, "t": "one uniform t in 0..T-1 per image"},
                "is_splits": 10, "pixels": "clamped to [-1, 1] and rounded to 8 bits before the classifier",
                "fid_inception": inc_note or ("torch-fidelity Inception, reference = held-out split" if inc else "off"),
                "latency": asdict(cfg.latency) if cfg.latency else None, "processes": s.world,
                "device": str(device), "noise": noise_rule(device)}
    origin, parent = lineage_origin(ckpt)
    return {"schema": SCHEMA, "checkpoint": label, "weights": ckpt.hash(), "dataset": dataset,
            "lineage": [st.get("step") for st in ckpt.lineage], "origin": origin, "parent": parent,
            "recipe": " > ".join(st["recipe"] for st in ckpt.lineage if st.get("recipe")) or None, "protocol": protocol, "quality": qual,
            "cost": cost, "grid": grid_file, "warnings": warnings, "seconds": time.perf_counter() - t_start,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(device)}


def _inception(cfg: EvalConfig, log):
    """(InceptionFID or None, a note on why not) — standard FID where torch-fidelity's weights are present."""
    if not cfg.inception:
        return None, None
    from .inception import InceptionFID, availability

    ok, note = availability()
    if ok:
        return InceptionFID(), note
    log(note)
    return None, note


def cost_of(ckpt, net, shape, s: Sampled, cfg: EvalConfig, progress: bool = False) -> dict:
    """The row's cost: parameters, MACs, bytes, sampling throughput, peak memory, and (unless
    ``cfg.latency`` is None) the runtime network's latency per evaluation."""
    load_sampling = machine_load()  # the last minute of the sampling
    params = count_params(ckpt.net)
    cost = {**params, "macs_per_image": macs_per_image(ckpt.net, shape),
            "weights_bytes": checkpoint_bytes(ckpt), "runtime_bytes": _runtime_bytes(ckpt, net),
            "nfe_used": s.stats.nfe, "sampling_images_per_s": s.stats.images_per_s,
            "sampling_seconds": s.stats.seconds, "embed_seconds": s.embed_seconds, **s.memory,
            "load": {"sampling": load_sampling}}
    if params["params_nonzero"] < params["params"]:  # unstructured sparsity: what a sparse kernel would spend
        cost["macs_per_image_nonzero"] = macs_per_image_nonzero(ckpt.net, shape)
    if s.spent is not None:  # what the sampling really spent per network evaluation, not the full net's MACs
        cost["macs_per_eval_spent"] = s.spent["macs_per_call_mean"]
        cost["cache_calls"] = {"full": s.spent["full_calls"], "shallow": s.spent["shallow_calls"]}
    if cfg.latency is not None:
        lat = measure_latency({cfg.runtime: net}, shape, cfg.latency, progress=progress,
                              device=device_of(ckpt.net))[cfg.runtime]
        cost["latency_ms"] = {str(b): v["median_ms"] for b, v in lat.items()}
        cost["latency_ms_per_image"] = {str(b): v["ms_per_image"] for b, v in lat.items()}
        cost["load"]["latency"] = machine_load()
    return cost


def _runtime_bytes(ckpt, net) -> int:
    """Bytes of what the runtime loads: its own model file where it has one (the int8 ONNX graph of
    ort-int8), else the checkpoint's weights file."""
    p = getattr(net, "path", None)
    if isinstance(p, (str, Path)) and Path(p).is_file():
        return Path(p).stat().st_size
    return checkpoint_bytes(ckpt)


def lineage_origin(ckpt) -> tuple[str, str | None]:
    """(origin, parent): the weights hash of the model the checkpoint's recipe started from (its own hash
    when it was only trained) and of the model just before its last recipe step (None when it has none)."""
    recipe = [st for st in ckpt.lineage if st.get("step") != "train" and st.get("parent")]
    if not recipe:
        return ckpt.hash(), None
    return recipe[0]["parent"], recipe[-1]["parent"]
