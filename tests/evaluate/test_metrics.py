"""Quality metrics: exact properties on synthetic features, and on real data (the bundled 5k
MNIST and the shipped classifier) that FID-dom / KID see noise, blur and a missing class."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from leandiff.evaluate.metrics import (FeatureAccumulator, KIDConfig, confidence, denoising_mse, fid,
                                       frechet_distance, inception_score, kid, label_spread, mean_cov, mmd2_unbiased,
                                       precision_recall)


def _gauss(n, d, seed, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


# --- FID ----------------------------------------------------------------------------------------

def test_fid_of_identical_sets_is_zero():
    x = _gauss(600, 24, 0) @ _gauss(24, 24, 1)  # correlated features
    assert fid(x, x) <= 1e-6
    assert fid(x.astype(np.float32), x.astype(np.float32)) <= 1e-6


def test_fid_of_singular_covariance_identical_sets_is_zero():
    x = np.concatenate([_gauss(300, 8, 0), np.zeros((300, 4))], axis=1)  # 4 dead features, as after ReLU
    assert fid(x, x) <= 1e-6


def test_frechet_distance_equals_closed_form_for_gaussian_pair():
    rng = np.random.default_rng(3)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Diagonal covariances: tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σ (√a − √b)².
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    # Full, non-commuting covariances: the textbook formula with scipy's sqrtm.
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    textbook = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(textbook, rel=1e-9)


def test_fid_from_samples_approaches_closed_form():
    # N(0, I) vs N(m, diag(s²)) in 4-D: FID = |m|² + Σ (1 − s)².
    m, s = np.array([0.5, -0.2, 0.0, 0.3]), np.array([1.0, 0.5, 2.0, 1.5])
    closed = (m ** 2).sum() + ((1 - s) ** 2).sum()
    x = _gauss(40_000, 4, 0)
    y = m + s * _gauss(40_000, 4, 1)
    assert fid(x, y) == pytest.approx(closed, rel=0.02)


def test_fid_agrees_with_torchmetrics_custom_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(nn.Module):
        num_features = 12

        def forward(self, x):
            return x

    x = torch.from_numpy(_gauss(800, 12, 0) @ _gauss(12, 12, 5))
    y = torch.from_numpy(_gauss(700, 12, 1, shift=0.3) @ _gauss(12, 12, 6))
    tm = FrechetInceptionDistance(feature=Identity(), normalize=True)
    tm.set_dtype(torch.float64)
    tm.update(x, real=True)
    tm.update(y, real=False)
    assert fid(x, y) == pytest.approx(float(tm.compute()), rel=1e-6)


def test_accumulator_streams_exact_mean_and_covariance():
    x = _gauss(1000, 10, 0, shift=100.0)  # a large mean tests the numerically careful update
    acc = FeatureAccumulator()
    for i in range(0, 1000, 137):
        acc.update(torch.from_numpy(x[i:i + 137]))
    mu, cov = mean_cov(x)
    assert acc.n == 1000
    np.testing.assert_allclose(acc.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(acc.cov, cov, rtol=1e-9, atol=1e-12)
    assert acc.features.shape == (1000, 10)


# --- KID ----------------------------------------------------------------------------------------

def test_kid_same_distribution_is_zero_within_std_and_grows_with_shift():
    x, y = _gauss(1000, 16, 0), _gauss(1000, 16, 1)
    cfg = KIDConfig(subsets=50, subset_size=500)
    m, s = kid(x, y, cfg)
    assert abs(m) <= 2 * s
    m_shift, s_shift = kid(x, _gauss(1000, 16, 2, shift=0.5), cfg)
    assert m_shift > m + 5 * s_shift


def test_kid_agrees_with_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    x, y = torch.from_numpy(_gauss(300, 8, 0)), torch.from_numpy(_gauss(300, 8, 1, shift=0.4))
    tm = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=300, normalize=True)
    tm.update(x, real=True)
    tm.update(y, real=False)
    # torchmetrics on the full sets (one subset of all 300) against our unbiased MMD² on the same sets.
    assert mmd2_unbiased(x.numpy(), y.numpy()) == pytest.approx(float(tm.compute()[0]), rel=1e-5)


# --- classifier-probability scores -------------------------------------------------------------

def test_inception_score_bounds():
    k = 10
    onehot = np.eye(k)[np.arange(1000) % k]
    assert inception_score(onehot, splits=10)[0] == pytest.approx(k, rel=1e-9)
    assert inception_score(np.full((1000, k), 1 / k))[0] == pytest.approx(1.0)
    assert inception_score(np.eye(k)[np.zeros(1000, int)])[0] == pytest.approx(1.0)


def test_label_spread_and_confidence():
    k = 10
    full = np.eye(k)[np.arange(1000) % k]
    missing = np.eye(k)[np.arange(1000) % (k - 1)]
    assert label_spread(full)["entropy"] == pytest.approx(1.0)
    assert label_spread(full)["tv"] == pytest.approx(0.0)
    assert label_spread(missing)["min_share"] == 0.0
    assert label_spread(missing)["entropy"] < 1.0
    assert confidence(full) == 1.0
    assert confidence(np.full((5, k), 1 / k)) == pytest.approx(0.1)


# --- precision / recall -------------------------------------------------------------------------

def test_precision_recall_properties():
    x = _gauss(400, 8, 0)
    assert precision_recall(x, x) == (1.0, 1.0)
    p, r = precision_recall(x, x + 100.0)  # disjoint supports
    assert (p, r) == (0.0, 0.0)
    # Two modes in the real set, one in the generated set: precision stays high, recall halves.
    real = np.concatenate([_gauss(300, 8, 1), _gauss(300, 8, 2, shift=20.0)])
    fake = _gauss(600, 8, 3)
    p, r = precision_recall(real, fake)
    assert p > 0.8 and 0.35 < r < 0.55, (p, r)


# --- MiniDiff MSE --------------------------------------------------------------------------------

def test_denoising_mse_of_zero_predictor_is_noise_variance():
    from leandiff.denoiser import Denoiser
    from leandiff.schedule import Schedule

    class Zero(nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    d = Denoiser(Zero(), Schedule("linear"), "eps")
    x0 = torch.rand(200, 1, 8, 8) * 2 - 1
    mse = denoising_mse(d, x0, seed=0, batch_size=64)
    assert mse == pytest.approx(1.0, abs=0.03)  # E ε² = 1
    assert denoising_mse(d, x0, seed=0, batch_size=200) == pytest.approx(mse, rel=1e-12)  # batch-size invariant


# --- real data: the shipped MNIST classifier ------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    from leandiff.evaluate.classifier import classifier_splits, load_classifier
    from leandiff.evaluate.reference import reference_stats

    clf = load_classifier("mnist")
    _, unseen, _ = classifier_splits("mnist")
    return clf, reference_stats(clf, "mnist"), unseen


def _scores(clf, ref, images):
    from leandiff.evaluate.classifier import embed

    f, p = embed(clf, images)
    acc = FeatureAccumulator()
    acc.update(f, p)
    k, ks = kid(ref.features, acc.features, KIDConfig(subsets=20, subset_size=500))
    return frechet_distance(acc.mean, acc.cov, ref.mean, ref.cov), k, ks, acc


def test_real_splits_kid_is_zero_within_std(mnist):
    clf, ref, unseen = mnist
    _, k, ks, _ = _scores(clf, ref, unseen.images)
    assert abs(k) <= 2 * ks


@pytest.mark.parametrize("kind,levels", [("noise", [0.0, 0.1, 0.2, 0.4, 0.8]), ("blur", [0.0, 0.5, 1.0, 1.5, 2.0])])
def test_fid_and_kid_grow_monotonically_with_degradation(mnist, kind, levels):
    from leandiff.evaluate.degrade import add_noise, gaussian_blur

    clf, ref, unseen = mnist
    fids, kids = [], []
    for level in levels:
        x = add_noise(unseen.images, level, seed=1) if kind == "noise" else gaussian_blur(unseen.images, level)
        f, k, _, _ = _scores(clf, ref, x)
        fids.append(f)
        kids.append(k)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids


def test_missing_class_scores_worse_than_full_set(mnist):
    from leandiff.evaluate.degrade import drop_class

    clf, ref, unseen = mnist
    for cls in (0, 7):
        dropped = drop_class(unseen.images, unseen.labels, cls)
        full = unseen.images[torch.randperm(len(unseen), generator=torch.Generator().manual_seed(cls))[:len(dropped)]]
        f_full, k_full, _, a_full = _scores(clf, ref, full)
        f_drop, k_drop, _, a_drop = _scores(clf, ref, dropped)
        assert f_drop > f_full and k_drop > k_full
        _, r_full = precision_recall(ref.features, a_full.features)
        _, r_drop = precision_recall(ref.features, a_drop.features)
        assert r_drop < r_full
        assert label_spread(a_drop.probs)["min_share"] < 0.1 < label_spread(a_full.probs)["min_share"]


# --- classifier and reference files ----------------------------------------------------------------

def test_feature_scale_fold_keeps_logits_and_gives_unit_rms():
    from leandiff.evaluate.classifier import FeatureCNN, embed, normalise_feature_scale

    torch.manual_seed(0)
    net = FeatureCNN(1).eval()
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        before = net(x)
    normalise_feature_scale(net, x)
    with torch.no_grad():
        after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    f, _ = embed(net, x)
    assert f.double().pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=2e-3)  # 8-bit rounding of x


def test_reference_stats_cache_falls_back_to_user_cache(tmp_path, monkeypatch):
    from leandiff.evaluate.classifier import Classifier, FeatureCNN
    from leandiff.evaluate.reference import load_reference, reference_stats
    from leandiff.data import ImageSet

    torch.manual_seed(0)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    clf = Classifier(FeatureCNN(1).eval(), {"weights_sha": "abc", "dataset": "toy"}, path=blocked / "sub")
    monkeypatch.setenv("LEANDIFF_CACHE", str(tmp_path / "cache"))
    data = ImageSet(torch.rand(50, 1, 28, 28) * 2 - 1, None, "toy", "test", "synthetic")
    a = reference_stats(clf, "toy", data=data)
    files = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(files) == 1 and "abc" in files[0].name
    b = load_reference(files[0])
    assert b.n == 50 and b.classifier_hash == "abc" and b.features.shape == (50, 64)
    np.testing.assert_array_equal(a.cov, b.cov)
    assert b.cov.dtype == np.float64
    c = reference_stats(clf, "toy", data=data)  # now read from the cache
    np.testing.assert_array_equal(c.mean, a.mean)
    other = ImageSet(data.images.flip(0)[:40], None, "toy", "test", "synthetic")
    assert reference_stats(clf, "toy", data=other).n == 40  # other pixels, other key


def test_classifier_train_command_and_roundtrip(tmp_path):
    from click.testing import CliRunner

    from leandiff.cli import main
    from leandiff.evaluate.classifier import load_classifier

    out = tmp_path / "clf"
    r = CliRunner().invoke(main, ["classifier", "train", "--dataset", "mnist", "--epochs", "3", "--out", str(out),
                                  "--no-reference"])
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    clf = load_classifier(out)
    rec = clf.record
    assert rec["train_images"] == 3000 and rec["unseen_images"] == 1000 and rec["test_images"] == 1000
    assert 0.5 < rec["test_accuracy"] <= 1.0  # three epochs (72 steps) already learn digits
    assert (out / "classifier.safetensors").stat().st_size < 1_000_000
    # A tampered weight file is refused.
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "classifier.safetensors"))
    state["head.bias"] = state["head.bias"] + 1
    save_file(state, str(out / "classifier.safetensors"))
    from leandiff.errors import UserError

    with pytest.raises(UserError, match="hash"):
        load_classifier(out)
    with pytest.raises(UserError, match="no classifier"):
        load_classifier("no-such-dataset")
