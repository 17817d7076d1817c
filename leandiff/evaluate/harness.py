"""Evaluate one (checkpoint, solver, NFE, runtime) into one row: quality + cost + protocol.

The row is plain JSON data; ``leandiff eval`` appends it to a JSONL file, ``leandiff report``
turns many of them into tables and plots. Samples are generated and embedded batch by batch
(:func:`leandiff.sample.generate`): only the classifier's features and probabilities of each
image are kept, and the first ``grid_n`` images for the sample grid.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cost import LatencyConfig, PeakMemory, checkpoint_bytes, count_params, machine_info, macs_per_image, measure_latency
from ..errors import UserError
from ..schedule import DEFAULT_SPACING
from .classifier import Classifier, embed, load_classifier
from .metrics import (FeatureAccumulator, KIDConfig, confidence, denoising_mse, frechet_distance, inception_score, kid,
                      kid_subset_size, label_spread, precision_recall, subsample)
from .reference import ReferenceStats, reference_stats

SCHEMA = "leandiff-eval/1"


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
    inception: bool = True  # standard Inception FID when torch-fidelity's weights are present

    def __post_init__(self):
        if self.n < 2:
            raise UserError(f"evaluation needs at least 2 samples, got {self.n}")
        if self.pr_k < 1:
            raise UserError(f"precision/recall k must be >= 1, got {self.pr_k}")


def resolve_dataset(ckpt, override: str | None) -> str:
    ds = override or ckpt.meta.get("dataset") or (ckpt.meta.get("train") or {}).get("dataset")
    if not ds:
        raise UserError(f"{ckpt.path}: the checkpoint does not say which dataset it models; give --dataset")
    return ds


def evaluate_checkpoint(ckpt, cfg: EvalConfig, *, classifier: Classifier | None = None,
                        reference: ReferenceStats | None = None, grid_path: str | Path | None = None,
                        progress: bool = False, log=print) -> dict | None:
    """Sample ``cfg.n`` images from ``ckpt`` (a Checkpoint or anything load_checkpoint takes) and
    return the row: ``{"schema", "checkpoint", "protocol", "quality", "cost", "grid", "machine", ...}``.

    Under torchrun (WORLD_SIZE > 1) the sampling is sharded across the processes
    (:func:`evaluate_shard`); rank 0 computes the metrics and returns the row, other ranks return None."""
    from ..checkpoint import load_checkpoint
    from ..data import load_dataset
    from ..io import save_grid
    from ..models import image_shape
    from ..runtime import get_runtime, runtime_network
    from ..denoiser import Denoiser
    from ..sample import SampleConfig, SampleStats, generate

    label = str(ckpt) if isinstance(ckpt, (str, Path)) else str(ckpt.path)
    if isinstance(ckpt, (str, Path)):
        ckpt = load_checkpoint(ckpt)
    t_start = time.perf_counter()
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
    get_runtime(cfg.runtime)  # unknown names fail before any work
    net = runtime_network(ckpt, cfg.runtime)
    denoiser = Denoiser(net, ckpt.schedule, ckpt.parameterization)

    inc, inc_note = None, None
    if cfg.inception:
        from .inception import InceptionFID, availability

        ok, inc_note = availability()
        if ok:
            inc = InceptionFID()
        else:
            log(inc_note)

    # Sample and embed, batch by batch.
    scfg = SampleConfig(solver=cfg.solver, nfe=cfg.nfe, spacing=cfg.spacing, n=cfg.n, seed=cfg.seed,
                        batch_size=cfg.batch_size, clip_x0=cfg.clip_x0, opts=dict(cfg.opts))
    stats, acc, grid = SampleStats(), FeatureAccumulator(), []
    spent = None
    t_embed = 0.0
    rank, world = process_rank_world()
    if world > 1:  # sharded over torchrun processes: see evaluate_shard
        if inc is not None:
            log("Inception FID is computed in single-process evaluation only; skipped under torchrun")
            inc, inc_note = None, "skipped: sharded evaluation (single-process only)"
        with PeakMemory() as mem:
            shard = evaluate_shard(denoiser, shape, scfg, clf, cfg.grid_n, progress=progress and rank == 0)
        if shard is None:  # not rank 0: its share is with rank 0 now
            return None
        acc, grid, stats, t_embed = shard
    else:
        counter = _call_counter(net)
        if counter is not None:
            counter.calls.clear()
        with PeakMemory() as mem:
            for x in generate(denoiser, shape, scfg, stats, progress=progress):
                t0 = time.perf_counter()
                acc.update(*embed(clf, x))
                t_embed += time.perf_counter() - t0
                if inc is not None:
                    inc.add_fake(x)
                if sum(g.shape[0] for g in grid) < cfg.grid_n:
                    grid.append(x[:cfg.grid_n - sum(g.shape[0] for g in grid)].clone())
        if counter is not None:  # a runtime whose evaluations differ in cost (feature caching)
            spent = counter.macs_spent(shape)

    # Quality.
    fake = acc.features
    kid_mean, kid_std = kid(ref.features, fake, cfg.kid)
    n_pr = min(cfg.pr_max, fake.shape[0], ref.features.shape[0])
    precision, recall = precision_recall(subsample(ref.features, n_pr, cfg.seed), subsample(fake, n_pr, cfg.seed), cfg.pr_k)
    is_mean, is_std = inception_score(acc.probs)
    spread = label_spread(acc.probs, ref.label_hist)
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.mse_n]
    mse_images = held.images[pick.sort().values]  # a seeded subset: splits may be sorted by class
    mse = denoising_mse(denoiser, mse_images, seed=cfg.seed, batch_size=cfg.batch_size)
    quality = {"fid_dom": frechet_distance(acc.mean, acc.cov, ref.mean, ref.cov),
               "kid": kid_mean, "kid_std": kid_std, "is": is_mean, "is_std": is_std,
               "precision": precision, "recall": recall, "mse": mse,
               "confidence": confidence(acc.probs), "label_entropy": spread["entropy"],
               "label_tv": spread["tv"], "label_min_share": spread["min_share"], "label_hist": spread["hist"],
               "fid_inception": None}
    if inc is not None:
        for i in range(0, len(held), 256):
            inc.add_real(held.images[i:i + 256])
        quality["fid_inception"] = inc.compute()

    # Cost.
    cost = {**count_params(ckpt.net), "macs_per_image": macs_per_image(ckpt.net, shape),
            "weights_bytes": checkpoint_bytes(ckpt), "nfe_used": stats.nfe,
            "sampling_images_per_s": stats.images_per_s, "sampling_seconds": stats.seconds,
            "embed_seconds": t_embed, **mem.as_dict()}
    if spent is not None:  # what the sampling really spent per network evaluation, not the full net's MACs
        cost["macs_per_eval_spent"] = spent["macs_per_call_mean"]
        cost["cache_calls"] = {"full": spent["full_calls"], "shallow": spent["shallow_calls"]}
    if cfg.latency is not None:
        lat = measure_latency({cfg.runtime: net}, shape, cfg.latency, progress=progress)[cfg.runtime]
        cost["latency_ms"] = {str(b): v["median_ms"] for b, v in lat.items()}
        cost["latency_ms_per_image"] = {str(b): v["ms_per_image"] for b, v in lat.items()}

    grid_file = None
    if grid_path is not None and grid:
        save_grid(torch.cat(grid), grid_path)
        grid_file = str(grid_path)

    runtime_desc = getattr(get_runtime(cfg.runtime), "description", cfg.runtime)
    protocol = {"n": cfg.n, "seed": cfg.seed, "solver": cfg.solver, "nfe": cfg.nfe, "nfe_used": stats.nfe,
                "spacing": cfg.spacing, "runtime": cfg.runtime, "runtime_description": runtime_desc,
                "batch_size": cfg.batch_size, "clip_x0": cfg.clip_x0, "solver_opts": dict(cfg.opts),
                "feature_net": clf.describe(), "reference": ref.describe(),
                "kid": {**asdict(cfg.kid), "subset_size_used": kid_subset_size(cfg.kid, len(ref.features), len(fake))},
                "pr": {"k": cfg.pr_k, "n": n_pr},
                "mse": {"n": int(mse_images.shape[0]), "split": "test", "seed": cfg.seed,
                        "target": ckpt.parameterization, "t": "one uniform t in 0..T-1 per image"},
                "is_splits": 10, "pixels": "clamped to [-1, 1] and rounded to 8 bits before the classifier",
                "fid_inception": inc_note or ("torch-fidelity Inception, reference = held-out split" if inc else "off"),
                "latency": asdict(cfg.latency) if cfg.latency else None, "processes": world}
    return {"schema": SCHEMA, "checkpoint": label, "weights": ckpt.hash(), "dataset": dataset,
            "lineage": [s.get("step") for s in ckpt.lineage], "protocol": protocol, "quality": quality,
            "cost": cost, "grid": grid_file, "seconds": time.perf_counter() - t_start,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info()}


# --- sharding across processes (torchrun) -----------------------------------------------------------

def _call_counter(net):
    """The module of a runtime network that logs its calls and prices them (``calls``, ``macs_spent``)."""
    mods = net.modules() if isinstance(net, torch.nn.Module) else ()
    return next((m for m in mods if hasattr(m, "macs_spent") and hasattr(m, "calls")), None)


def process_rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def evaluate_shard(denoiser, shape, scfg, clf: Classifier, grid_n: int, progress: bool = False):
    """Sample and embed this process's share of the batches, gather every share to rank 0.

    Rank r of W draws batches r, r + W, r + 2W, ... of :func:`leandiff.sample.generate`; batch b is
    seeded by (seed, b) whoever draws it, so the union over ranks is exactly the single-process
    sample set. Features, class probabilities and the grid's first ``grid_n`` images travel to rank 0
    (torch.distributed over gloo: CPU tensors), which feeds them to a FeatureAccumulator in batch
    order, as one process would. Returns (accumulator, grid batches, SampleStats, embed seconds)
    on rank 0 and None elsewhere. Sampling throughput is that of the group: images / the slowest
    rank's seconds."""
    import torch.distributed as dist

    from ..sample import SampleStats, batch_len, generate, num_batches

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    nb = num_batches(scfg)
    mine = list(range(rank, nb, world))
    rows = lambda b: batch_len(scfg, b)  # noqa: E731
    grid_rows = lambda b: max(0, min(rows(b), grid_n - b * scfg.batch_size))  # noqa: E731
    with torch.no_grad():
        f0, p0 = embed(clf, torch.zeros((1, *shape)))  # the feature and class sizes, even on an idle rank
    feats, probs, grids = {}, {}, {}
    stats, t_embed = SampleStats(), 0.0
    for b, x in zip(mine, generate(denoiser, shape, scfg, stats, progress=progress, batches=mine)):
        t0 = time.perf_counter()
        with torch.no_grad():
            f, p = embed(clf, x)
        t_embed += time.perf_counter() - t0
        feats[b], probs[b], grids[b] = f.detach(), p.detach(), x[:grid_rows(b)].clone()
    F = _gather_batches(feats, nb, world, rows, f0.shape[1:], f0.dtype)
    P = _gather_batches(probs, nb, world, rows, p0.shape[1:], p0.dtype)
    G = _gather_batches(grids, nb, world, grid_rows, tuple(shape), torch.float32)
    totals = _gather_batches({rank: torch.tensor([[stats.seconds, stats.images, t_embed, stats.nfe]],
                                                 dtype=torch.float64)}, world, world, lambda r: 1, (4,), torch.float64)
    if created:
        dist.destroy_process_group()
    if rank != 0:
        return None
    acc = FeatureAccumulator()
    for b in range(nb):
        acc.update(F[b], P[b])
    t = torch.cat(totals)
    stats = SampleStats(images=int(t[:, 1].sum()), seconds=float(t[:, 0].max()), nfe=float(t[:, 3].max()))
    return acc, [g for g in G if g.shape[0]], stats, float(t[:, 2].max())


def _gather_batches(parts: dict, nb: int, world: int, rows, tail: tuple, dtype) -> list:
    """Every rank holds ``parts[b]`` (``rows(b)`` rows) for its batches b ≡ rank (mod world);
    returns, on every rank, the list of all ``nb`` batches in order (one padded all_gather)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    owned = [list(range(r, nb, world)) for r in range(world)]
    counts = [sum(rows(b) for b in own) for own in owned]
    buf = torch.zeros((max(counts), *tail), dtype=dtype)
    if counts[rank]:
        buf[:counts[rank]] = torch.cat([parts[b].to(dtype) for b in owned[rank]])
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    out = [None] * nb
    for r, own in enumerate(owned):
        i = 0
        for b in own:
            out[b], i = bufs[r][i:i + rows(b)], i + rows(b)
    return out


# --- tables ----------------------------------------------------------------------------------------

COLUMNS = [  # (header, getter, format)
    ("checkpoint", lambda r: r["checkpoint"], "{}"),
    ("solver", lambda r: r["protocol"]["solver"], "{}"),
    ("NFE", lambda r: r["protocol"]["nfe_used"], "{:g}"),
    ("runtime", lambda r: r["protocol"]["runtime"], "{}"),
    ("N", lambda r: r["protocol"]["n"], "{}"),
    ("FID-dom", lambda r: r["quality"]["fid_dom"], "{:.3f}"),
    ("KID×1e3", lambda r: r["quality"]["kid"] * 1e3, "{:.3f}"),
    ("±", lambda r: r["quality"]["kid_std"] * 1e3, "{:.3f}"),
    ("IS", lambda r: r["quality"]["is"], "{:.2f}"),
    ("prec", lambda r: r["quality"]["precision"], "{:.3f}"),
    ("recall", lambda r: r["quality"]["recall"], "{:.3f}"),
    ("MSE", lambda r: r["quality"]["mse"], "{:.4f}"),
    ("conf", lambda r: r["quality"]["confidence"], "{:.3f}"),
    ("label H", lambda r: r["quality"]["label_entropy"], "{:.3f}"),
    ("img/s", lambda r: r["cost"]["sampling_images_per_s"], "{:.1f}"),
    ("ms/eval@16", lambda r: (r["cost"].get("latency_ms") or {}).get("16"), "{:.2f}"),
    ("MMAC", lambda r: r["cost"].get("macs_per_eval_spent", r["cost"]["macs_per_image"]) / 1e6, "{:.1f}"),
    ("params", lambda r: r["cost"]["params"], "{:,}"),
]


def _fmt(fmt: str, v) -> str:
    if v is None:
        return "—"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown_header() -> str:
    heads = [c[0] for c in COLUMNS]
    return "| " + " | ".join(heads) + " |\n|" + "|".join("---" for _ in heads) + "|"


def markdown_row(row: dict) -> str:
    return "| " + " | ".join(_fmt(fmt, _safe(get, row)) for _, get, fmt in COLUMNS) + " |"


def _safe(get, row):
    try:
        return get(row)
    except (KeyError, TypeError):
        return None


def flatten(row: dict, prefix: str = "") -> dict:
    """Nested row -> flat {"quality.fid_dom": …} for CSV (lists become ';'-joined strings)."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ";".join(str(x) for x in v)
        else:
            out[key] = v
    return out


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_row(path: str | Path, row: dict) -> None:
    """Append one row to a JSONL results file (one line, flushed and fsynced)."""
    import json
    import os

    path = Path(path)
    line = json.dumps(row, default=_json_default, sort_keys=True) + "\n"
    size = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if size is not None:  # a full disk may have taken half the line: cut it off, keep the earlier rows
            try:
                os.truncate(path, size)
            except OSError:
                pass
        raise UserError(f"cannot append to {path}: {e.strerror or e}") from None


def read_rows(paths) -> list[dict]:
    """Rows from one or more JSONL results files (blank lines skipped; a bad line is an error)."""
    import json

    rows = []
    for p in paths:
        p = Path(p)
        try:
            lines = p.read_text().splitlines()
        except OSError as e:
            raise UserError(f"{p}: cannot read results ({e.strerror or e})") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: not a JSON row ({e.msg})") from None
            if not isinstance(row, dict) or row.get("schema") != SCHEMA:
                raise UserError(f"{p}:{i}: not a leandiff eval row (schema {SCHEMA})")
            row.setdefault("_source", str(p))
            rows.append(row)
    return rows
