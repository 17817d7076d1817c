"""Sample and embed: the images of one evaluation are generated batch by batch
(:func:`leandiff.sample.generate`) and only the classifier's features and probabilities of each image are
kept, with the first ``grid_n`` images for the sample grid; under torchrun the batches are sharded
(:mod:`.sharding`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..cost import PeakMemory
from ..distributed import rank_world
from ..sample import SampleStats, generate
from .classifier import Classifier, embed
from .metrics import FeatureAccumulator
from .sharding import evaluate_shard


@dataclass
class Sampled:
    """What one evaluation's sampling produced."""

    acc: FeatureAccumulator  # features and class probabilities of every image
    grid: list  # the first grid_n images, in batches
    stats: SampleStats  # images, seconds, NFE
    embed_seconds: float = 0.0
    memory: dict = field(default_factory=dict)  # PeakMemory.as_dict()
    spent: dict | None = None  # what a call-counting runtime (feature caching) really spent
    world: int = 1  # processes that sampled


def sample_and_embed(net, denoiser, shape, scfg, clf: Classifier, grid_n: int, inception=None,
                     progress: bool = False) -> Sampled | None:
    # Peak memory: RSS, and on a GPU torch's peak allocation there (scfg.device: where the sampling runs).
    """Generate ``scfg.n`` images with ``denoiser`` (over runtime network ``net``) and embed them; feeds
    ``inception`` (an InceptionFID) the fakes when given. Under torchrun only rank 0 gets the result
    (None elsewhere); Inception FID is then the caller's to skip."""
    rank, world = rank_world()
    device = torch.device(scfg.device) if scfg.device is not None else None
    if world > 1:
        with PeakMemory(device=device) as mem:
            shard = evaluate_shard(denoiser, shape, scfg, clf, grid_n, progress=progress and rank == 0)
        if shard is None:  # not rank 0: its share is with rank 0 now
            return None
        acc, grid, stats, t_embed = shard
        return Sampled(acc, grid, stats, t_embed, mem.as_dict(), None, world)
    stats, acc, grid, t_embed = SampleStats(), FeatureAccumulator(), [], 0.0
    counter = _call_counter(net)
    if counter is not None:
        counter.calls.clear()
    with PeakMemory(device=device) as mem:
        for x in generate(denoiser, shape, scfg, stats, progress=progress):
            t0 = time.perf_counter()
            acc.update(*embed(clf, x))
            t_embed += time.perf_counter() - t0
            if inception is not None:
                inception.add_fake(x.cpu())
            if sum(g.shape[0] for g in grid) < grid_n:
                grid.append(x[:grid_n - sum(g.shape[0] for g in grid)].clone())
    spent = counter.macs_spent(shape) if counter is not None else None  # evaluations that differ in cost
    return Sampled(acc, grid, stats, t_embed, mem.as_dict(), spent, 1)


def _call_counter(net):
    """The module of a runtime network that logs its calls and prices them (``calls``, ``macs_spent``)."""
    mods = net.modules() if isinstance(net, torch.nn.Module) else ()
    return next((m for m in mods if hasattr(m, "macs_spent") and hasattr(m, "calls")), None)
