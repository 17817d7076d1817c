"""Quality metrics on feature vectors and class probabilities, all in float64.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to two feature sets,
  ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½). On leandiff's per-dataset classifier features
  it is called FID-dom.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs", §4): unbiased MMD² with the cubic
  polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets (mean and std).
- IS-style score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) on the domain classifier.
- Precision / recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric"): each
  set's manifold is the union of balls reaching each point's k-th nearest neighbour (k = 3);
  precision = share of generated points inside the real manifold, recall = the converse.
- Classifier confidence and label-histogram spread (mode coverage of a class-conditional view).

Features are accumulated batch by batch (:class:`FeatureAccumulator`); only the F-dimensional
features and the K class probabilities of each image are kept, never the images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..device import device_of
from ..errors import UserError


# --- streaming statistics -------------------------------------------------------------------

class FeatureAccumulator:
    """Running mean and scatter matrix in float64 (Chan et al. 1979 pairwise update), plus the
    feature vectors and class probabilities (small: F + K floats per image) for KID, precision /
    recall and the IS-style score."""

    def __init__(self):
        self.n = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None  # Σ (x − μ)(x − μ)ᵀ
        self._features: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []

    def update(self, features, probs=None) -> None:
        f = _np64(features)
        m = f.shape[0]
        if m == 0:
            return
        mu_b = f.mean(0)
        centred = f - mu_b
        s_b = centred.T @ centred
        if self.n == 0:
            self.mean, self.scatter = mu_b, s_b
        else:
            delta = mu_b - self.mean
            total = self.n + m
            self.scatter = self.scatter + s_b + np.outer(delta, delta) * (self.n * m / total)
            self.mean = self.mean + delta * (m / total)
        self.n += m
        self._features.append(np.asarray(features, dtype=np.float32) if not torch.is_tensor(features)
                              else features.detach().float().cpu().numpy())
        if probs is not None:
            self._probs.append(_np64(probs))

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n − 1, as numpy.cov and pytorch-fid)."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.n}")
        return self.scatter / (self.n - 1)

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self._features) if self._features else np.zeros((0, 0), np.float32)

    @property
    def probs(self) -> np.ndarray:
        return np.concatenate(self._probs) if self._probs else np.zeros((0, 0))


def _np64(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def mean_cov(features) -> tuple[np.ndarray, np.ndarray]:
    f = _np64(features)
    return f.mean(0), np.cov(f, rowvar=False)


# --- FID --------------------------------------------------------------------------------------

def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition
    (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½  (float64).

    tr (Σ₁Σ₂)^½ is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix Σ₁^½ Σ₂ Σ₁^½ (same spectrum as Σ₁Σ₂), which is exact for singular covariances too,
    where scipy.linalg.sqrtm of the non-symmetric product needs an ε-offset."""
    mu1, mu2, cov1, cov2 = (_np64(a) for a in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID: shapes differ: μ {mu1.shape} vs {mu2.shape}, Σ {cov1.shape} vs {cov2.shape}")
    r1 = _sqrt_psd(cov1)
    m = r1 @ cov2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)
    return max(d2, 0.0)  # only round-off can make it negative


def fid_bootstrap_se(fake, ref_mean, ref_cov, rounds: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of FID over the generated features (Efron & Tibshirani 1993, §6): the
    standard deviation of FID over ``rounds`` resamples of the N generated feature vectors with
    replacement, each scored against the fixed reference Gaussian. FID ± 1.96·se is the normal bootstrap
    95 % interval: how much of a difference between two rows the sample alone could make. (The
    percentile interval is not used: resampling duplicates points, which biases every resampled FID
    upward, so it need not even contain the estimate.)"""
    f = _np64(fake)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"FID bootstrap needs at least 2 samples, got {n}")
    mu2, cov2 = _np64(ref_mean), _np64(ref_cov)
    r2 = _sqrt_psd(cov2)  # Σ_ref^½ once; tr (Σ_b Σ_ref)^½ = Σ √eig(Σ_ref^½ Σ_b Σ_ref^½)
    rng = np.random.default_rng(seed)
    d = np.empty(rounds)
    for i in range(rounds):
        b = f[rng.integers(0, n, n)]
        mu1 = b.mean(0)
        c = b - mu1
        cov1 = c.T @ c / (n - 1)
        m = r2 @ cov1 @ r2
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
        d[i] = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)
    return float(d.std(ddof=1))


def fid(features1, features2) -> float:
    """FID between two raw feature sets (N×F each)."""
    return frechet_distance(*mean_cov(features1), *mean_cov(features2))


# --- KID --------------------------------------------------------------------------------------

def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) with the cubic polynomial kernel."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@dataclass(frozen=True)
class KIDConfig:
    subsets: int = 100  # random subset pairs (Bińkowski et al. use 100 of size 1000)
    subset_size: int = 1000  # capped at half the smaller set, so that subsets differ (see kid_subset_size)
    seed: int = 0


def kid_subset_size(cfg: KIDConfig, n_real: int, n_fake: int) -> int:
    """The subset size actually used: ``cfg.subset_size`` or half the smaller set when that is
    less (with subsets as large as the set, every subset is the whole set and the std is 0)."""
    return min(cfg.subset_size, n_real // 2, n_fake // 2)


def kid(real, fake, cfg: KIDConfig = KIDConfig()) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD² over ``cfg.subsets`` random subsets
    of size :func:`kid_subset_size` (without replacement within a subset)."""
    x, y = _np64(real), _np64(fake)
    size = kid_subset_size(cfg, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(cfg.seed)
    vals = [mmd2_unbiased(x[rng.choice(x.shape[0], size, replace=False)],
                          y[rng.choice(y.shape[0], size, replace=False)]) for _ in range(cfg.subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# --- classifier-probability scores ------------------------------------------------------------

def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """IS-style score exp E_x KL(p(y|x) ‖ p(y)) (Salimans et al. 2016) on the domain classifier's
    softmax: mean and std over ``splits`` contiguous splits, as in the original code. Ranges from
    1 to K; a perfect K-class generator reaches K."""
    p = _np64(probs)
    n = p.shape[0]
    splits = max(1, min(splits, n))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def confidence(probs) -> float:
    """Mean top-1 probability: how sure the classifier is that a sample is *some* class."""
    return float(_np64(probs).max(1).mean())


def label_spread(probs, reference_hist=None) -> dict:
    """Histogram of predicted labels and how evenly it covers the classes.

    ``entropy``: normalised entropy of the histogram (1 = uniform over K classes, 0 = one class);
    ``tv``: total-variation distance to ``reference_hist`` (the reference split's predicted-label
    histogram) or to uniform when none is given; ``min_share``: the rarest class's share × K
    (0 when a class is missing, 1 when uniform)."""
    p = _np64(probs)
    k = p.shape[1]
    counts = np.bincount(p.argmax(1), minlength=k)
    h = counts / counts.sum()
    ref = np.full(k, 1 / k) if reference_hist is None else _np64(reference_hist) / np.sum(reference_hist)
    nz = h[h > 0]
    return {"hist": counts.tolist(), "entropy": max(0.0, float(-(nz * np.log(nz)).sum() / np.log(k))),
            "tv": float(0.5 * np.abs(h - ref).sum()), "min_share": float(h.min() * k)}


# --- precision / recall -----------------------------------------------------------------------

def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def knn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points, got {x.shape[0]}")
    out = []
    for i in range(0, x.shape[0], chunk):
        d = _sq_dists(x[i:i + chunk], x)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the point itself
    return torch.cat(out)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each point: is it within radii[j] of some centre j?"""
    out = []
    for i in range(0, points.shape[0], chunk):
        out.append((_sq_dists(points[i:i + chunk], centres) <= radii[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1–2) with k-NN manifolds."""
    r = torch.as_tensor(_np64(real))
    f = torch.as_tensor(_np64(fake))
    precision = _inside(f, r, knn_radii(r, k)).double().mean().item()
    recall = _inside(r, f, knn_radii(f, k)).double().mean().item()
    return float(precision), float(recall)


def distinct_draw(images, n: int, seed: int = 0):
    """n distinct rows of ``images`` (a seeded permutation's first n), for a real-vs-real floor. Never
    with replacement: duplicates shrink the covariance's effective rank and inflate FID at that N, so
    a pool smaller than n is refused (compare at the largest N the pool allows instead)."""
    if not 1 <= n <= images.shape[0]:
        raise UserError(f"a real-vs-real floor at N={n} needs {n} distinct images; the pool has {images.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(images.shape[0], generator=g)[:n]]


def subsample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most n rows of x, drawn without replacement with a seeded generator (all if fewer)."""
    if x.shape[0] <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(x.shape[0], n, replace=False))]


# --- the MiniDiff paper's MSE -------------------------------------------------------------------

@torch.no_grad()
def denoising_mse(denoiser, images: torch.Tensor, seed: int = 0, batch_size: int = 256) -> float:
    """The denoising loss on held-out images, the "MSE" column of Sahoo, Shah & Daber's Mini
    Diffusion Model for MNIST (Tables 1–3): for each image one t ~ U{0, …, T−1} and one
    ε ~ N(0, I), x_t = q_sample(x₀, t, ε), and the mean squared error between the network's output
    and its own training target (ε, v or x₀; DDPM's L_simple for ε-models). t and ε come from a
    generator seeded with ``seed``, so two models are scored on the same noisy inputs.

    The paper does not spell out its protocol (its values ≈ 1.1 are larger than a trained
    ε-model's loss), so this is the standard reading, not a reproduction of its numbers."""
    g = torch.Generator().manual_seed(seed)
    from ..schedule import q_sample

    # All t and ε are drawn up front, so the batch size does not change which image gets which.
    ts = torch.randint(0, denoiser.schedule.T, (images.shape[0],), generator=g)
    noises = torch.randn(images.shape, generator=g)
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        # drawn on the CPU above on every device (the same noisy inputs everywhere), moved per batch
        dev = device_of(denoiser.net)
        x0, t, noise = (v.to(dev) for v in (images[i:i + batch_size].float(), ts[i:i + batch_size],
                                             noises[i:i + batch_size]))
        xt = q_sample(denoiser.schedule, x0, t, noise)
        out = denoiser(xt, t).float()
        total += (out - denoiser.target(x0, noise, t)).double().pow(2).sum().item()
        count += out.numel()
    return total / count
