"""The quality metrics of a results row, one registry: :data:`METRICS` maps a name to a small callable
``metric(inputs) -> {field: value}`` whose fields go into the row's ``quality``. A new metric is one
function plus one line here (and a column in :data:`leandiff.evaluate.protocol.COLUMNS` to show it);
``tests/evaluate/test_metric_contract.py`` gives every entry a known-value case."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .metrics import (FeatureAccumulator, confidence, denoising_mse, fid_bootstrap_se, frechet_distance,
                      inception_score, kid, kid_subset_size, label_spread, precision_recall, subsample)

FID_CI_ROUNDS = 200  # bootstrap resamples of the generated features for FID-dom's 95 % interval
KID_MIN_SUBSET = 100  # below this many images per KID subset, KID is mostly noise (Bińkowski et al. use 1000)
PR_MIN_POINTS = 500  # below this many points per k-NN manifold, precision/recall is mostly noise


@dataclass
class QualityInputs:
    """What every metric may read: the generated images' features and class probabilities, the reference
    statistics, and (for the denoising MSE) the denoiser and held-out images."""

    acc: FeatureAccumulator  # generated images: features, probabilities, mean, covariance
    ref: object  # ReferenceStats of the held-out split (features, mean, cov, label_hist)
    cfg: object  # EvalConfig: seed, kid, pr_k, pr_max, batch_size
    denoiser: object = None  # the evaluated Denoiser (denoising MSE)
    mse_images: torch.Tensor | None = None  # held-out images for the denoising MSE


def pr_size(inputs: QualityInputs) -> int:
    """Points per set of the precision/recall manifolds (a seeded subsample of at most ``pr_max``)."""
    return min(inputs.cfg.pr_max, inputs.acc.features.shape[0], inputs.ref.features.shape[0])


def _fid_dom(q: QualityInputs) -> dict:
    """FID on the domain classifier's features (Heusel et al. 2017), with its bootstrap standard error over
    the generated features and the normal 95 % interval FID ± 1.96·se (clipped at 0)."""
    d = frechet_distance(q.acc.mean, q.acc.cov, q.ref.mean, q.ref.cov)
    se = fid_bootstrap_se(q.acc.features, q.ref.mean, q.ref.cov, rounds=FID_CI_ROUNDS, seed=q.cfg.seed)
    return {"fid_dom": d, "fid_dom_se": se, "fid_dom_ci": [max(d - 1.96 * se, 0.0), d + 1.96 * se],
            "fid_dom_ci_rounds": FID_CI_ROUNDS}


def _kid(q: QualityInputs) -> dict:
    """KID (Bińkowski et al. 2018), mean and std over subsets."""
    mean, std = kid(q.ref.features, q.acc.features, q.cfg.kid)
    return {"kid": mean, "kid_std": std}


def _is(q: QualityInputs) -> dict:
    """Inception Score-style score on the domain classifier's probabilities."""
    mean, std = inception_score(q.acc.probs)
    return {"is": mean, "is_std": std}


def _pr(q: QualityInputs) -> dict:
    """Precision / recall of k-NN manifolds (Kynkäänniemi et al. 2019)."""
    n, seed = pr_size(q), q.cfg.seed
    p, r = precision_recall(subsample(q.ref.features, n, seed), subsample(q.acc.features, n, seed), q.cfg.pr_k)
    return {"precision": p, "recall": r}


def _mse(q: QualityInputs) -> dict:
    """MiniDiff's denoising MSE on held-out images."""
    return {"mse": denoising_mse(q.denoiser, q.mse_images, seed=q.cfg.seed, batch_size=q.cfg.batch_size)}


def _confidence(q: QualityInputs) -> dict:
    """Mean top-class probability of the classifier on generated images."""
    return {"confidence": confidence(q.acc.probs)}


def _labels(q: QualityInputs) -> dict:
    """How the generated images spread over the classes, against the reference's label histogram."""
    s = label_spread(q.acc.probs, q.ref.label_hist)
    return {"label_entropy": s["entropy"], "label_tv": s["tv"], "label_min_share": s["min_share"],
            "label_hist": s["hist"]}


METRICS: dict[str, Callable[[QualityInputs], dict]] = {
    "fid_dom": _fid_dom,
    "kid": _kid,
    "is": _is,
    "pr": _pr,
    "mse": _mse,
    "confidence": _confidence,
    "labels": _labels,
}


def quality(inputs: QualityInputs) -> dict:
    """Every metric's fields, in registry order."""
    out = {}
    for fn in METRICS.values():
        out.update(fn(inputs))
    return out


def small_sample_warnings(inputs: QualityInputs) -> list[str]:
    """One line per metric whose sample is too small to mean much (KID subsets, precision/recall manifolds)."""
    n = inputs.acc.features.shape[0]
    out = []
    size = kid_subset_size(inputs.cfg.kid, inputs.ref.features.shape[0], n)
    if size < KID_MIN_SUBSET:
        out.append(f"N={n} is too small for KID: subsets of {size} images (use N >= {2 * KID_MIN_SUBSET}); "
                   "read KID as noise")
    pr = pr_size(inputs)
    if pr < PR_MIN_POINTS:
        out.append(f"N={n} is too small for precision/recall: k-NN manifolds of {pr} points (use N >= {PR_MIN_POINTS}); "
                   "read them as noise")
    return out
