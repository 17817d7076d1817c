"""The evaluation harness's own benchmark: classifier accuracies, the real-vs-real floor of
FID-dom / KID / precision-recall at N = 2,048 and N = 10,000, degradation curves (noise, blur),
mode dropping, and the time to embed 2,048 images.

    python benchmarks/bench_metrics.py [--datasets mnist fashion-mnist]

Prints and writes benchmarks/results/metrics.{json,md} and metrics_degradation.png.

Floors. The reference is the held-out (test) split. The stand-in for a perfect generator is the
classifier's *unseen* pool: train-split images held back from classifier training (stratified;
see leandiff.evaluate.classifier.HELD_BACK). Fashion-MNIST has 10,000 of them, so N = 2,048 and
N = 10,000 are drawn without replacement. The bundled MNIST has only 5,000 digits (1,000 test,
1,000 unseen, 3,000 for the classifier): its floor is measured at N = 1,000, the largest N its
unseen pool allows. Floors are never drawn with replacement (metrics.distinct_draw): duplicates
shrink the covariance's effective rank, so a resampled "N = 2,048" floor is not a floor at 2,048
(it was 0.151 against 0.088 from the 1,000 distinct images, and flattered the models 1.7×).
Rows marked "seen" use images the classifier trained on, to show how much that biases the floor.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import RESULTS, write_results
from leandiff.evaluate.classifier import classifier_splits, embed, load_classifier
from leandiff.evaluate.degrade import add_noise, drop_class, gaussian_blur
from leandiff.evaluate.metrics import (FeatureAccumulator, KIDConfig, distinct_draw, frechet_distance, kid,
                                       precision_recall,
                                       subsample)
from leandiff.evaluate.reference import reference_stats

NOISE = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8]
BLUR = [0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
KID_CFG = KIDConfig(subsets=100, subset_size=1000, seed=0)


def score(clf, ref, images: torch.Tensor, pr: bool = True) -> dict:
    acc = FeatureAccumulator()
    for i in range(0, images.shape[0], 512):
        acc.update(*embed(clf, images[i:i + 512]))
    k, ks = kid(ref.features, acc.features, KID_CFG)
    out = {"n": acc.n, "fid_dom": frechet_distance(acc.mean, acc.cov, ref.mean, ref.cov), "kid": k, "kid_std": ks}
    if pr:
        n = min(acc.n, ref.features.shape[0])
        out["precision"], out["recall"] = precision_recall(subsample(ref.features, n, 0), subsample(acc.features, n, 0))
        out["pr_n"] = n
    return out


def draw(images: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, bool]:
    """n images, without replacement when possible (second value: drawn with replacement); for the
    embedding timing and mode dropping only: floors use metrics.distinct_draw."""
    g = torch.Generator().manual_seed(seed)
    if n <= images.shape[0]:
        return images[torch.randperm(images.shape[0], generator=g)[:n]], False
    return images[torch.randint(0, images.shape[0], (n,), generator=g)], True


FLOOR_N = (2048, 10_000)  # the N of the rows the floors are compared with


def floors(clf, ref, fit, unseen) -> list[dict]:
    """Real-vs-real floors at each N of FLOOR_N, from distinct unseen images; where the pool is smaller
    than N, at the largest N it allows (once), with ``for_n`` naming the N it stands in for."""
    rows, pool = [], unseen.images.shape[0]
    for want in FLOOR_N:
        n = min(want, pool)
        if any(r["n"] == n for r in rows):
            rows[-1]["for_n"].append(want)
            continue
        seeds = [0, 1, 2] if n < pool else [0]  # the whole pool has one draw only
        per = [score(clf, ref, distinct_draw(unseen.images, n, s)) for s in seeds]
        row = {"set": "unseen train images", "n": n, "for_n": [want], "with_replacement": False, "distinct": n,
               "draws": len(seeds), **{k: float(np.mean([p[k] for p in per])) for k in per[0] if k != "n"}}
        if len(per) > 1:
            row["fid_dom_std_over_draws"] = float(np.std([p["fid_dom"] for p in per]))
        rows.append(row)
    n = min(2048, fit.images.shape[0])
    rows.append({"set": "seen (classifier training images)", "n": n, "for_n": [2048], "with_replacement": False,
                 "distinct": n, "draws": 1,
                 **{k: v for k, v in score(clf, ref, distinct_draw(fit.images, n, 0)).items() if k != "n"}})
    return rows


def degradation(clf, ref, images: torch.Tensor) -> dict:
    curves = {"noise": [], "blur": []}
    for s in NOISE:
        curves["noise"].append({"level": s, **score(clf, ref, add_noise(images, s, seed=1), pr=False)})
    for s in BLUR:
        curves["blur"].append({"level": s, **score(clf, ref, gaussian_blur(images, s), pr=False)})
    mono = {f"{kind}_{m}_monotonic": all(a[m] < b[m] for a, b in zip(c, c[1:]))
            for kind, c in curves.items() for m in ("fid_dom", "kid")}
    return {"n": images.shape[0], **curves, **mono}


def mode_drop(clf, ref, unseen) -> dict:
    per = []
    for c in torch.unique(unseen.labels).tolist():
        dropped = drop_class(unseen.images, unseen.labels, c)
        full, _ = draw(unseen.images, dropped.shape[0], c)
        a, b = score(clf, ref, full), score(clf, ref, dropped)
        per.append({"class": c, "n": dropped.shape[0], "fid_full": a["fid_dom"], "fid_dropped": b["fid_dom"],
                    "kid_full": a["kid"], "kid_dropped": b["kid"], "recall_full": a["recall"],
                    "recall_dropped": b["recall"]})
    return {"per_class": per,
            "all_worse_fid": all(p["fid_dropped"] > p["fid_full"] for p in per),
            "all_worse_kid": all(p["kid_dropped"] > p["kid_full"] for p in per),
            "all_lower_recall": all(p["recall_dropped"] < p["recall_full"] for p in per),
            "min_fid_ratio": min(p["fid_dropped"] / p["fid_full"] for p in per)}


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 5.6), dpi=80)
    for ds, r in results.items():
        d = r["degradation"]
        floor = next(f for f in r["floors"] if f["set"] == "unseen train images" and f["n"] == d["n"])
        for j, kind in enumerate(("noise", "blur")):
            lv = [p["level"] for p in d[kind]]
            axes[0, j].plot(lv, [p["fid_dom"] for p in d[kind]], marker="o", label=f"{ds} (N={d['n']})")
            axes[1, j].errorbar(lv, [p["kid"] * 1e3 for p in d[kind]], yerr=[p["kid_std"] * 1e3 for p in d[kind]],
                                marker="o", capsize=2, label=ds)
            axes[0, j].axhline(floor["fid_dom"], ls=":", lw=0.8, color=axes[0, j].lines[-1].get_color())
    for j, kind in enumerate(("noise σ (pixels in [-1, 1])", "blur σ (pixels)")):
        axes[1, j].set_xlabel(kind)
    axes[0, 0].set_ylabel("FID-dom")
    axes[1, 0].set_ylabel("KID × 1e3")
    for ax in axes[0]:
        ax.set_yscale("log")  # FID-dom > 0
    for ax in axes[1]:
        ax.set_yscale("symlog", linthresh=1.0)  # KID's unbiased estimate can be negative near 0
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Metrics vs degradation of unseen real images (dotted: undegraded floor at the same N)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(results: dict, embed_s: dict) -> str:
    lines = ["# Evaluation harness: classifiers, real-vs-real floors, degradation", "",
             "## Classifiers (shipped in leandiff/zoo/classifiers)", "",
             "| dataset | test accuracy | unseen-train accuracy | fit accuracy | fit / unseen / test images | weights | embed 2,048 images |",
             "|---|---|---|---|---|---|---|"]
    for ds, r in results.items():
        c = r["classifier"]
        lines.append(f"| {ds} | {c['test_accuracy']:.4f} | {c['unseen_accuracy']:.4f} | {c['train_accuracy']:.4f} | "
                     f"{c['train_images']} / {c['unseen_images']} / {c['test_images']} | {c['weights_sha']} | "
                     f"{embed_s[ds]:.2f} s |")
    lines += ["", "## Real-vs-real floor (reference: held-out test split)", "",
              "| dataset | set | N | distinct | with replacement | floor for rows at N | FID-dom | KID×1e3 ± std | precision | recall |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for ds, r in results.items():
        for f in r["floors"]:
            fid = f"{f['fid_dom']:.3f}" + (f" (±{f['fid_dom_std_over_draws']:.3f}, {f['draws']} draws)"
                                           if "fid_dom_std_over_draws" in f else "")
            lines.append(f"| {ds} | {f['set']} | {f['n']} | {f['distinct']} | {'yes' if f['with_replacement'] else 'no'} | "
                         f"{', '.join(f'{m:,}' for m in f.get('for_n', [f['n']]))} | {fid} | {f['kid'] * 1e3:.3f} ± {f['kid_std'] * 1e3:.3f} | {f['precision']:.3f} | {f['recall']:.3f} |")
    lines += ["", "## Degradation (unseen real images; FID-dom and KID must grow monotonically)", "",
              "![degradation curves](metrics_degradation.png)", ""]
    for ds, r in results.items():
        d = r["degradation"]
        for kind in ("noise", "blur"):
            lines.append(f"- {ds} {kind} σ {[p['level'] for p in d[kind]]}: FID-dom "
                         f"{[round(p['fid_dom'], 2) for p in d[kind]]} (monotonic: {d[kind + '_fid_dom_monotonic']}); "
                         f"KID×1e3 {[round(p['kid'] * 1e3, 2) for p in d[kind]]} (monotonic: {d[kind + '_kid_monotonic']})")
    lines += ["", "## Mode dropping (one class removed vs the full set at equal N)", ""]
    for ds, r in results.items():
        m = r["mode_drop"]
        missed = [p["class"] for p in m["per_class"] if not p["recall_dropped"] < p["recall_full"]]
        lines.append(f"- {ds} (N={m['per_class'][0]['n']}): FID-dom worse for every dropped class: {m['all_worse_fid']} "
                     f"(smallest ratio {m['min_fid_ratio']:.2f}×); KID worse: {m['all_worse_kid']}; recall lower: "
                     f"{m['all_lower_recall']}" + (f" (not for class {missed})" if missed else ""))
    lines += ["", "## Notes", "",
              "- Floors: reference = held-out test split; the compared set = train-split images the classifier never "
              "saw (stratified held-back part), all distinct, never drawn with replacement. Bundled MNIST has only "
              "1,000 such images: its floor is measured at N = 1,000, the largest N it allows, and stands in for "
              "rows at N = 2,048 and 10,000 (not an equal-N comparison; an earlier N = 2,048 row resampled the 1,000 "
              "images with replacement and gave 0.151, inflated by the duplicates).",
              "- 'seen' rows use images the classifier trained on: the bias this introduces is small here.",
              "- FID-dom's bias shrinks with N (Fashion-MNIST 2,048 vs 10,000): compare rows at equal N only.",
              "- KID's unbiased estimate can be negative near 0; the floor KIDs lie within "
              f"{max(abs(f['kid']) / f['kid_std'] for r in results.values() for f in r['floors']):.2f} std of 0.",
              "- Precision/recall with k = 3 at these N sit near 0.9 for identical distributions, not 1.0; recall "
              "misses a dropped class whose images lie within other classes' k-NN balls, FID-dom and KID do not."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    args = ap.parse_args()
    results, embed_s = {}, {}
    t_all = time.perf_counter()
    for ds in args.datasets:
        clf = load_classifier(ds)
        fit, unseen, test = classifier_splits(ds)
        ref = reference_stats(clf, ds)
        x = draw(unseen.images, 2048, 0)[0]
        t0 = time.perf_counter()
        embed(clf, x)
        embed_s[ds] = time.perf_counter() - t0
        acc_now = float((embed(clf, test.images)[1].argmax(1) == test.labels).double().mean())
        rec = clf.record
        results[ds] = {
            "classifier": {k: rec[k] for k in ("test_accuracy", "unseen_accuracy", "train_accuracy", "train_images",
                                               "unseen_images", "test_images", "weights_sha", "train_seconds",
                                               "data_source")} | {"test_accuracy_remeasured": acc_now},
            "reference": ref.describe(),
            "floors": floors(clf, ref, fit, unseen),
            "degradation": degradation(clf, ref, subsample_images(unseen.images, 2048)),
            "mode_drop": mode_drop(clf, ref, unseen if len(unseen) <= 2000 else subset(unseen, 2000)),
        }
        print(f"{ds}: done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    plot(results, RESULTS / "metrics_degradation.png")
    md = markdown(results, embed_s)
    print(md)
    write_results("metrics", {"results": results, "embed_seconds_2048": embed_s,
                              "kid": KID_CFG.__dict__, "noise_levels": NOISE, "blur_levels": BLUR}, md)


def subsample_images(x: torch.Tensor, n: int) -> torch.Tensor:
    return draw(x, min(n, x.shape[0]), 0)[0]


def subset(s, n: int):
    from leandiff.data import ImageSet

    idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:n]
    return ImageSet(s.images[idx], s.labels[idx], s.name, s.split, s.source)


if __name__ == "__main__":
    main()
