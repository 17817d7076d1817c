"""Sharded sampling under torchrun: rank r of W samples and embeds batches r, r + W, ... and rank 0
gathers every share in batch order, so the row equals the single-process row."""
from __future__ import annotations

import time

import torch

from ..device import device_of
from ..distributed import init_group
from ..sample import SampleStats, batch_len, generate, num_batches
from .classifier import Classifier, embed
from .metrics import FeatureAccumulator


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

    created = init_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    nb = num_batches(scfg)
    mine = list(range(rank, nb, world))
    rows = lambda b: batch_len(scfg, b)  # noqa: E731
    grid_rows = lambda b: max(0, min(rows(b), grid_n - b * scfg.batch_size))  # noqa: E731
    with torch.no_grad():
        f0, p0 = embed(clf, torch.zeros((1, *shape), device=device_of(clf.net)))  # the feature and class sizes, even on an idle rank
    feats, probs, grids = {}, {}, {}
    stats, t_embed = SampleStats(), 0.0
    for b, x in zip(mine, generate(denoiser, shape, scfg, stats, progress=progress, batches=mine)):
        t0 = time.perf_counter()
        with torch.no_grad():
            f, p = embed(clf, x)
        t_embed += time.perf_counter() - t0
        feats[b], probs[b], grids[b] = f.detach().cpu(), p.detach().cpu(), x[:grid_rows(b)].to("cpu", copy=True)  # gathered over gloo
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
