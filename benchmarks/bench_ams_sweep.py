"""Sweep the adaptive momentum sampler's (a, b, c) on a trained model; the defaults in
leandiff/solvers/ams.py (AMS_DEFAULTS) come from this sweep.

    .venv/bin/python benchmarks/bench_ams_sweep.py --ckpt runs/mnist-tiny --n 512 --nfe 10 20 \
        --out runs/bench/ams_sweep.json

Every setting samples the same N images from the same x_T and seeds (sample.SampleConfig), so the rows
differ only by (a, b, c). Quality, from the evaluation harness (leandiff.evaluate, the same feature
network and reference statistics as ``leandiff eval``):

- ``fid_dom`` and ``kid``: FID and KID in the shipped classifier's feature space against the held-out split.
  At small N FID is biased upwards; compare rows as ratios to a = 0, b = 1, c = 0 (the plain sampler).
- ``ode_rms`` (ams-ddim only): RMS distance per image to the 1000-step DDIM sample from the same x_T —
  the MiniDiff paper's "distance to a reference", without a trained metric; it measures how well a
  few-step deterministic sampler reproduces what the model's own probability-flow ODE produces.

The ``floor`` rows give the 1000-step DDIM sample (and with ``--ddpm-ref`` 1000-step DDPM) on the same
N and seed. ``--smoke`` runs the whole flow on a random tiny network in seconds (no checkpoint).
"""
from __future__ import annotations

import argparse
import sys
import itertools
import json
import time
from pathlib import Path

import torch

from leandiff.evaluate import FeatureAccumulator, KIDConfig, embed, frechet_distance, kid, load_classifier, reference_stats
from leandiff.sample import SampleConfig, SampleStats, generate


def load(args):
    """(denoiser, image shape)."""
    if args.smoke:
        from diffusers import UNet2DModel

        from leandiff.denoiser import Denoiser
        from leandiff.schedule import Schedule

        torch.manual_seed(0)
        net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        return Denoiser(net.eval(), Schedule("linear")), (1, 28, 28)
    from leandiff.checkpoint import load_checkpoint
    from leandiff.models import image_shape

    ck = load_checkpoint(args.ckpt)
    return ck.denoiser(), image_shape(ck.arch)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/mnist-tiny")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--n", type=int, default=512, help="images per setting (same x_T for all)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    p.add_argument("--spacing", default="leading")
    p.add_argument("--a", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--b", nargs="+", default=["1-a", "1"], help="'1-a' (moving average) and/or numbers")
    p.add_argument("--c", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    p.add_argument("--ref-nfe", type=int, default=1000, help="steps of the DDIM/DDPM reference")
    p.add_argument("--ddpm-ref", action="store_true", help="also the 1000-step DDPM floor row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/ams_sweep.json")
    p.add_argument("--smoke", action="store_true", help="random tiny network: checks the flow only")
    p.add_argument("--publish", nargs="+", metavar="SWEEP.json",
                   help="only write benchmarks/results/ams_sweep.{json,md} from finished sweep files")
    args = p.parse_args()
    if args.publish:
        return publish([Path(f) for f in args.publish])
    if args.smoke:
        args.n, args.nfe, args.ref_nfe, args.a, args.c = 32, [5], 20, [0.0, 0.2], [0.0, 1e-2]

    denoiser, shape = load(args)
    clf = load_classifier(args.dataset)
    ref_stats = reference_stats(clf, args.dataset)
    kid_cfg = KIDConfig(subsets=50, subset_size=min(1000, args.n), seed=args.seed)

    def run(solver: str, nfe: int, **opts) -> tuple[torch.Tensor, dict]:
        cfg = SampleConfig(solver=solver, nfe=nfe, spacing=args.spacing, n=args.n, seed=args.seed, opts=opts)
        stats, acc, xs = SampleStats(), FeatureAccumulator(), []
        for x in generate(denoiser, shape, cfg, stats):
            acc.update(*embed(clf, x))
            xs.append(x)
        row = {"solver": solver, "nfe": stats.nfe, **opts,
               "fid_dom": frechet_distance(acc.mean, acc.cov, ref_stats.mean, ref_stats.cov),
               "kid": kid(ref_stats.features, acc.features, kid_cfg)[0], "seconds": round(stats.seconds, 2)}
        return torch.cat(xs), row

    rows = []
    t0 = time.perf_counter()
    ref = {}
    for base in ("ddim", "ddpm") if args.ddpm_ref else ("ddim",):
        ref[base], row = run(base, args.ref_nfe)
        rows.append({**row, "role": "floor"})
        print(json.dumps(rows[-1]), flush=True)

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
              "seed": args.seed, "spacing": args.spacing, "classifier": clf.describe(), "reference": ref_stats.describe(),
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out.write_text(json.dumps(record, indent=1))
    # The best setting per (base, NFE) by each metric, next to the plain sampler.
    for base, nfe in itertools.product(("ddim", "ddpm"), args.nfe):
        cand = [r for r in rows if r["solver"] == f"ams-{base}" and r["nfe"] == nfe]
        plain = next(r for r in cand if r["a"] == 0 and r["b"] == 1 and r["c"] == 0)
        for metric in ("fid_dom", "kid", "ode_rms"):
            if metric in plain:
                best = min(cand, key=lambda r: r[metric])
                print(f"ams-{base} NFE {nfe} {metric}: plain {plain[metric]:.4g}, best {best[metric]:.4g} "
                      f"at a={best['a']}, b={best['b']:.3g}, c={best['c']}")
    print(f"-> {out}")


def publish(files: list[Path]) -> None:
    """Tables of finished sweeps (each setting's FID-dom as a ratio to the plain sampler) for the commit."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_results

    sweeps, md = [], ["# Adaptive momentum sampler (AMS): (a, b, c) sweep", "",
                      "Each sweep samples the same N images from the same x_T for every setting; FID-dom and KID on "
                      "the shipped MNIST classifier; ratio = FID-dom ÷ the plain sampler's (a=0, b=1, c=0) at the "
                      "same NFE; below 1 AMS helps. The `floor` row is the DDIM reference at many steps.", ""]
    for f in files:
        rec = json.loads(f.read_text())
        sweeps.append({"file": f.name, **rec})
        md += [f"## {f.name}: {rec['ckpt']}, N = {rec['n']}, seed {rec['seed']}, {rec['spacing']} spacing, "
               f"{rec['seconds'] / 60:.0f} min", "",
               "| solver | NFE | a | b | c | FID-dom | ratio to plain | KID×1e3 |", "|---|---|---|---|---|---|---|---|"]
        plain = {(r["solver"], r["nfe"]): r["fid_dom"] for r in rec["rows"]
                 if r.get("a") == 0 and r.get("b") == 1 and r.get("c") == 0}
        for r in rec["rows"]:
            base = plain.get((r["solver"], r["nfe"]))
            ratio = f"{r['fid_dom'] / base:.3f}" if base and "a" in r else r.get("role", "")
            md.append(f"| {r['solver']} | {r['nfe']} | {r.get('a', '')} | {r.get('b', '')} | {r.get('c', '')} | "
                      f"{r['fid_dom']:.3f} | {ratio} | {r['kid'] * 1e3:.1f} |")
        md.append("")
    md += ["The sweep runs predate `--publish` and did not record their command lines; every setting they ran "
           "is in ams_sweep.json (N, seed, spacing, reference NFE, and the (a, b, c) of each row)."]
    write_results("ams_sweep", {"sweeps": sweeps}, "\n".join(md))


if __name__ == "__main__":
    main()
