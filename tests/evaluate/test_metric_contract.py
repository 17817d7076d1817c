"""Every metric in leandiff.evaluate.METRICS has a known-value case: generated images whose features equal
the reference's give FID 0, KID ~0, precision = recall = 1, the reference's label spread; a denoiser that
predicts x0 exactly gives denoising MSE 0."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leandiff.denoiser import Denoiser
from leandiff.evaluate import METRICS, FeatureAccumulator, KIDConfig
from leandiff.evaluate.quality import QualityInputs, quality
from leandiff.schedule import Schedule


class _Zero(torch.nn.Module):
    """An x0-predicting network for all-zero data: its x̂₀ = 0 is exact."""

    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def same():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 6, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(200, 4, generator=g), dim=1).double()
    acc = FeatureAccumulator()
    acc.update(feats, probs)
    hist = probs.argmax(1).bincount(minlength=4).double()
    ref = SimpleNamespace(features=acc.features, mean=acc.mean, cov=acc.cov, label_hist=(hist / hist.sum()).numpy())
    cfg = SimpleNamespace(seed=0, kid=KIDConfig(), pr_k=3, pr_max=10_000, batch_size=64)
    return QualityInputs(acc, ref, cfg, Denoiser(_Zero(), Schedule("linear"), "x0"), torch.zeros(8, 1, 4, 4))


KNOWN = {  # metric -> {field: (expected, absolute tolerance)}
    "fid_dom": {"fid_dom": (0.0, 1e-6)},
    "kid": {},  # unbiased MMD² of two draws of one set: 0 within its spread over subsets, checked below
    "is": {},  # exp(mean KL(p(y|x) || p(y))) >= 1: checked below
    "pr": {"precision": (1.0, 0.0), "recall": (1.0, 0.0)},
    "mse": {"mse": (0.0, 1e-12)},
    "confidence": {},  # the mean top-class probability: checked below
    "labels": {"label_tv": (0.0, 1e-9)},
}


def test_every_metric_has_a_known_value_case():
    assert set(KNOWN) == set(METRICS)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_metric_known_value(name, same):
    out = METRICS[name](same)
    assert out, name
    for field, (want, tol) in KNOWN[name].items():
        assert abs(float(out[field]) - want) <= tol, (name, field, out[field])
    if name == "kid":
        assert abs(out["kid"]) <= 3 * out["kid_std"] + 1e-12
    if name == "is":
        assert out["is"] >= 1.0
    if name == "confidence":
        assert abs(out["confidence"] - float(np.asarray(same.acc.probs).max(1).mean())) < 1e-6


def test_quality_holds_every_metrics_fields(same):
    fields = set().union(*(METRICS[m](same).keys() for m in METRICS))
    assert set(quality(same)) == fields


def test_fid_dom_interval_holds_the_estimate_and_narrows_with_n():
    """The bootstrap interval contains FID-dom and shrinks as the generated sample grows (se ~ 1/sqrt(N))."""
    from leandiff.evaluate.metrics import mean_cov

    g = np.random.default_rng(0)
    ref = g.normal(size=(2000, 6))
    ref_mean, ref_cov = mean_cov(ref)
    ses = []
    for n in (100, 1600):
        fake = g.normal(loc=0.3, size=(n, 6))
        acc = FeatureAccumulator()
        acc.update(fake)
        q = QualityInputs(acc, SimpleNamespace(features=ref, mean=ref_mean, cov=ref_cov), SimpleNamespace(seed=0))
        out = METRICS["fid_dom"](q)
        lo, hi = out["fid_dom_ci"]
        assert lo <= out["fid_dom"] <= hi and out["fid_dom_se"] > 0
        ses.append(out["fid_dom_se"])
    assert ses[1] < ses[0] / 2


def test_small_samples_are_flagged_for_kid_and_precision_recall():
    from leandiff.evaluate.quality import small_sample_warnings

    g = np.random.default_rng(0)
    ref = g.normal(size=(1000, 6))
    cfg = SimpleNamespace(seed=0, kid=KIDConfig(), pr_k=3, pr_max=10_000)

    def warnings(n):
        acc = FeatureAccumulator()
        acc.update(g.normal(size=(n, 6)))
        return small_sample_warnings(QualityInputs(acc, SimpleNamespace(features=ref), cfg))

    small = warnings(16)
    assert len(small) == 2 and "KID" in small[0] and "precision/recall" in small[1]
    assert warnings(1000) == []
