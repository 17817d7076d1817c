"""Reference statistics of a dataset's held-out split in a classifier's feature space.

Computed once and cached as data (safetensors + JSON header): beside the classifier when its
directory is writable, else in the user cache (``$LEANDIFF_CACHE`` or
``$XDG_CACHE_HOME/leandiff``, default ``~/.cache/leandiff``). The cache key is the classifier's
weight hash, the dataset and split, and a hash of the split's pixels, so new weights or other
data files never reuse stale statistics.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_path
from .classifier import Classifier, embed
from .metrics import FeatureAccumulator, subsample

FORMAT = "leandiff-reference-stats"
SAMPLE_CAP = 5000  # feature vectors kept for KID / precision-recall (seeded subsample)


@dataclass(frozen=True)
class ReferenceStats:
    dataset: str
    split: str  # which split the statistics describe ("test" = held-out)
    n: int  # images in the split (all used for μ, Σ)
    source: str  # where the data came from
    data_hash: str  # sha256 prefix over the split's pixels
    classifier_hash: str  # weights hash of the feature network
    mean: np.ndarray  # F, float64
    cov: np.ndarray  # F×F, float64, unbiased
    features: np.ndarray  # ≤ SAMPLE_CAP × F float32, for KID and precision/recall
    label_hist: np.ndarray  # K, predicted-label counts of the split
    probs_mean: np.ndarray  # K, mean softmax of the split

    def describe(self) -> dict:
        """What a metric row records about its reference set."""
        return {"dataset": self.dataset, "split": self.split, "n": self.n, "source": self.source,
                "data_hash": self.data_hash, "feature_sample": int(self.features.shape[0])}


def data_hash(images: torch.Tensor) -> str:
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    h = hashlib.sha256(str(tuple(u8.shape)).encode())
    h.update(u8.numpy().tobytes())
    return h.hexdigest()[:16]


def compute_reference_stats(clf: Classifier, images: torch.Tensor, *, dataset: str, split: str, source: str,
                            sample_cap: int = SAMPLE_CAP, seed: int = 0, batch_size: int = 512,
                            progress: bool = False) -> ReferenceStats:
    """Statistics of ``images`` (N×C×H×W in [-1, 1]) in ``clf``'s feature space, streamed in batches."""
    acc = FeatureAccumulator()
    steps = range(0, images.shape[0], batch_size)
    if progress:
        from ..io import progress as tqdm
        steps = tqdm(steps, desc=f"reference {dataset}/{split}", unit="batch", leave=False)
    for i in steps:
        acc.update(*embed(clf, images[i:i + batch_size], batch_size))
    probs = acc.probs
    return ReferenceStats(dataset=dataset, split=split, n=acc.n, source=source, data_hash=data_hash(images),
                          classifier_hash=clf.hash, mean=acc.mean, cov=acc.cov,
                          features=subsample(acc.features, sample_cap, seed).astype(np.float32),
                          label_hist=np.bincount(probs.argmax(1), minlength=probs.shape[1]).astype(np.float64),
                          probs_mean=probs.mean(0))


# --- files ----------------------------------------------------------------------------------

_ARRAYS = ("mean", "cov", "features", "label_hist", "probs_mean")


def save_reference(stats: ReferenceStats, path: str | Path) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    meta = {k: getattr(stats, k) for k in ("dataset", "split", "n", "source", "data_hash", "classifier_hash")}
    arrays = {k: np.ascontiguousarray(getattr(stats, k)) for k in _ARRAYS}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={"leandiff": json.dumps({"format": FORMAT, **meta}, sort_keys=True)})
    return path


def load_reference(path: str | Path) -> ReferenceStats:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("leandiff", "{}"))
            arrays = {k: f.get_tensor(k) for k in _ARRAYS}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: unreadable reference statistics ({str(e).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not leandiff reference statistics")
    meta.pop("format")
    return ReferenceStats(**meta, **arrays)


def cache_dir() -> Path:
    env = os.environ.get("LEANDIFF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leandiff"


def _file_name(dataset: str, split: str, clf_hash: str, dhash: str) -> str:
    return f"reference-{dataset.replace('/', '_').replace(':', '_')}-{split}-{clf_hash}-{dhash}.safetensors"


def reference_stats(clf: Classifier, dataset: str | None = None, data_dir: str | None = None, split: str = "test",
                    progress: bool = False, data=None) -> ReferenceStats:
    """The cached reference statistics of ``dataset``'s ``split`` for ``clf``; computed and stored
    on first use (see the module docstring for where). ``data``: the split's ImageSet when the
    caller has already loaded it."""
    from ..data import load_dataset

    dataset = dataset or clf.dataset
    data = data if data is not None else load_dataset(dataset, split, data_dir)
    dhash = data_hash(data.images)
    name = _file_name(dataset, split, clf.hash, dhash)
    places = ([clf.path] if clf.path is not None else []) + [cache_dir() / "reference"]
    for d in places:
        if (Path(d) / name).is_file():
            return load_reference(Path(d) / name)
    stats = compute_reference_stats(clf, data.images, dataset=dataset, split=split, source=data.source,
                                    progress=progress)
    for d in places:
        try:
            save_reference(stats, Path(d) / name)
            break
        except UserError:  # not writable: try the next place
            continue
    return stats
