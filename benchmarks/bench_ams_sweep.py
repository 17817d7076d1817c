"""Sweep the adaptive momentum sampler's (a, b, c) on a trained model; the defaults in
leandiff/solvers/ams.py (AMS_DEFAULTS) come from this sweep.

    .venv/bin/python benchmarks/bench_ams_sweep.py --ckpt runs/mnist-tiny --n 256 --nfe 10 20 \
        --out runs/bench/ams_sweep.json

Every setting samples the same N images from the same x_T and seeds (sample.SampleConfig), so the rows
differ only by (a, b, c). The quality numbers, chosen to need nothing but the model and the data:

- ``ode_rms`` (ams-ddim only): RMS distance, per image, to the 1000-step DDIM sample from the same x_T —
  the MiniDiff paper's "distance to the reference" without its MSE-to-noise loss; it measures how well a
  few-step deterministic sampler reproduces what the model's own ODE produces.
- ``mmd``: unbiased MMD² between the samples and N held-out real images (the dataset's test split),
  Gaussian kernel on pixels with the bandwidth set to the median real-real distance. Distributional,
  so it also judges stochastic samplers. ``mmd_floor`` rows give the 1000-step DDPM/DDIM samples and a
  second set of real images (real vs real) on the same scale.
- ``fid_dom`` when the evaluation harness (leandiff.evaluate, issue 3) exposes ``fid_dom(images, ...)``;
  until then the column is absent. Compare rows as ratios to a = 0, b = 1, c = 0 (the plain sampler).

``--smoke`` runs the whole flow on a random tiny network and random "data" in seconds (no checkpoint).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from leandiff.sample import SampleConfig, SampleStats, sample_all


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) with k(u, v) = exp(−|u − v|² / (2·bandwidth²))."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth ** 2))  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * k(x, y).mean()).item()


def median_distance(x: torch.Tensor) -> float:
    d = torch.cdist(x.flatten(1).double(), x.flatten(1).double())
    return d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)].median().item()


def fid_dom_fn(dataset: str):
    """The harness's FID-dom, if it exists yet (None otherwise)."""
    try:
        from leandiff import evaluate
    except ImportError:
        return None
    fn = getattr(evaluate, "fid_dom", None)
    return (lambda x: float(fn(x, dataset=dataset))) if callable(fn) else None


def load(args):
    """(denoiser, image shape, real images for the metric, a second real set for the floor)."""
    if args.smoke:
        from diffusers import UNet2DModel

        from leandiff.denoiser import Denoiser
        from leandiff.schedule import Schedule

        torch.manual_seed(0)
        net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        real = torch.rand(2 * args.n, 1, 8, 8) * 2 - 1
        return Denoiser(net.eval(), Schedule("linear")), (1, 8, 8), real[:args.n], real[args.n:]
    from leandiff.checkpoint import load_checkpoint
    from leandiff.data import load_dataset
    from leandiff.models import image_shape

    ck = load_checkpoint(args.ckpt)
    test = load_dataset(args.dataset, "test").images
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(test), generator=g)[: 2 * args.n]
    return ck.denoiser(), image_shape(ck.arch), test[idx[:args.n]], test[idx[args.n:]]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/mnist-tiny")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--n", type=int, default=256, help="images per setting (same x_T for all)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    p.add_argument("--spacing", default="leading")
    p.add_argument("--a", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--b", nargs="+", default=["1-a", "1"], help="'1-a' (moving average) and/or numbers")
    p.add_argument("--c", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    p.add_argument("--ref-nfe", type=int, default=1000, help="steps of the DDIM/DDPM reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/ams_sweep.json")
    p.add_argument("--smoke", action="store_true", help="random tiny network and data: checks the flow only")
    args = p.parse_args()
    if args.smoke:
        args.n, args.nfe, args.ref_nfe, args.a, args.c = 32, [5], 20, [0.0, 0.2], [0.0, 1e-2]

    denoiser, shape, real, real2 = load(args)
    bandwidth = median_distance(real)
    fid = None if args.smoke else fid_dom_fn(args.dataset)

    def run(solver: str, nfe: int, **opts) -> tuple[torch.Tensor, dict]:
        cfg = SampleConfig(solver=solver, nfe=nfe, spacing=args.spacing, n=args.n, seed=args.seed, opts=opts)
        stats = SampleStats()
        x = sample_all(denoiser, shape, cfg, stats)
        row = {"solver": solver, "nfe": stats.nfe, **opts, "mmd": mmd2(x, real, bandwidth),
               "seconds": round(stats.seconds, 2)}
        if fid is not None:
            row["fid_dom"] = fid(x)
        return x, row

    rows = []
    t0 = time.perf_counter()
    ref = {}
    for base in ("ddim", "ddpm"):
        ref[base], row = run(base, args.ref_nfe)
        rows.append({**row, "role": "mmd_floor"})
    rows.append({"solver": "real", "role": "mmd_floor", "mmd": mmd2(real2, real, bandwidth)})
    for row in rows:
        print(json.dumps(row))

    for base, nfe in itertools.product(("ddim", "ddpm"), args.nfe):
        for a, b_rule, c in itertools.product(args.a, args.b, args.c):
            b = 1 - a if b_rule == "1-a" else float(b_rule)
            if b_rule != "1-a" and abs(b - (1 - a)) < 1e-12:
                continue  # the same setting twice (a = 0)
            x, row = run(f"ams-{base}", nfe, a=a, b=b, c=c)
            if base == "ddim":
                row["ode_rms"] = (x - ref["ddim"]).flatten(1).pow(2).mean(1).sqrt().mean().item()
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"ckpt": None if args.smoke else str(args.ckpt), "dataset": args.dataset, "n": args.n,
              "seed": args.seed, "spacing": args.spacing, "bandwidth": bandwidth,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out.write_text(json.dumps(record, indent=1))
    # The best setting per (base, NFE) by each metric, next to the plain sampler.
    for base, nfe in itertools.product(("ddim", "ddpm"), args.nfe):
        cand = [r for r in rows if r["solver"] == f"ams-{base}" and r["nfe"] == nfe]
        plain = next(r for r in cand if r["a"] == 0 and r["b"] == 1 and r["c"] == 0)
        for metric in ("mmd", "ode_rms", "fid_dom"):
            if metric in plain:
                best = min(cand, key=lambda r: r[metric])
                print(f"ams-{base} NFE {nfe} {metric}: plain {plain[metric]:.4g}, best {best[metric]:.4g} "
                      f"at a={best['a']}, b={best['b']:.3g}, c={best['c']}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
