"""Feature-caching benchmark (issue 9): FID-dom and per-sample time of DeepCache-style caching
(intervals 2, 3, 5; uniform and non-uniform) against the fp32 eager base, on the common protocol.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cache.py --n 512

Quality rows (``evaluate_checkpoint``, appended to OUT/rows.jsonl when done; a killed run resumes).
Per-sample time: whole sampling runs (dpmpp-2m-sde, NFE 20, batch ``--time-batch``) of every
runtime in alternating rounds, median — caching is stateful across the calls of one run, so a
per-evaluation latency would not show it. MACs per image: counted per call actually made.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results, resumable_rows  # noqa: E402

from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.compress.cache import CachedUNet, macs_spent  # noqa: E402
from leandiff.cost import macs_per_image  # noqa: E402
from leandiff.denoiser import Denoiser  # noqa: E402
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint  # noqa: E402
from leandiff.models import image_shape  # noqa: E402
from leandiff.runtime import runtime_network  # noqa: E402
from leandiff.sample import SampleConfig, sample_all  # noqa: E402

RUNTIMES = ["eager", "cache:2", "cache:3", "cache:5", "cache-nu:2", "cache-nu:3", "cache-nu:5"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="zoo:mnist-tiny")
    ap.add_argument("--out", default="runs/bench/cache")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--solver", default="dpmpp-2m-sde")
    ap.add_argument("--time-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    out = Path(a.out)
    rows_path, done = resumable_rows(out)
    base = load_checkpoint(a.ckpt)
    shape = image_shape(base.arch)
    for rt in RUNTIMES:
        if rt in done:
            continue
        t0 = time.perf_counter()
        row = evaluate_checkpoint(base, EvalConfig(solver=a.solver, nfe=a.nfe, n=a.n, seed=0, batch_size=256,
                                                   runtime=rt, latency=None, inception=False))
        row["bench_name"], row["wall_seconds"] = rt, time.perf_counter() - t0
        append_row(rows_path, row)
        done[rt] = row
        print(f"{rt:12s} FID-dom {row['quality']['fid_dom']:.4f} ({row['wall_seconds']:.0f} s)", flush=True)

    # per-sample time: whole sampling runs, alternating rounds; MACs actually spent per image
    nets = {rt: runtime_network(base, rt) for rt in RUNTIMES}
    times = {rt: [] for rt in RUNTIMES}
    macs = {}
    cfg = SampleConfig(solver=a.solver, nfe=a.nfe, n=a.time_batch, seed=0, batch_size=a.time_batch)
    for r in range(a.rounds):
        for rt in RUNTIMES:
            net = nets[rt]
            if isinstance(net, CachedUNet):
                net.reset()
            d = Denoiser(net, base.schedule, base.parameterization)
            t0 = time.perf_counter()
            with torch.no_grad():
                sample_all(d, shape, cfg)
            times[rt].append((time.perf_counter() - t0) / a.time_batch)
            if r == 0:
                if isinstance(net, CachedUNet):
                    macs[rt] = macs_spent(net, shape)["macs_per_image_total"]
                else:
                    macs[rt] = macs_per_image(base.net, shape) * d.nfe
    s0 = statistics.median(times["eager"])
    fid0 = done["eager"]["quality"]["fid_dom"]
    lines = ["| runtime | FID-dom | ÷ fp32 | ms/sample | speed-up | GMAC/sample | MAC ratio |", "|---|---|---|---|---|---|---|"]
    res = []
    for rt in RUNTIMES:
        s = statistics.median(times[rt])
        q = done[rt]["quality"]["fid_dom"]
        res.append({"runtime": rt, "fid_dom": q, "fid_ratio": q / fid0, "ms_per_sample": s * 1e3,
                    "speedup": s0 / s, "macs_per_sample": macs[rt], "times": times[rt]})
        lines.append(f"| {rt} | {q:.4f} | {q / fid0:.3f} | {s * 1e3:.2f} | {s0 / s:.2f}× | {macs[rt] / 1e9:.3f} | "
                     f"{macs['eager'] / macs[rt]:.2f}× |")
    ok = [r for r in res if r["runtime"] != "eager" and r["fid_ratio"] <= 1.05]
    best = max(ok, key=lambda r: r["speedup"]) if ok else None
    verdict = (f"- Best runtime with FID-dom ≤ 1.05× fp32: {best['runtime']} at {best['speedup']:.2f}× per-sample "
               f"speed-up (target ≥ 1.5×: {'met' if best['speedup'] >= 1.5 else 'NOT met'})." if best else
               "- No cached runtime kept FID-dom ≤ 1.05× fp32: target NOT met.")
    md = (f"# Feature caching ({a.ckpt})\n\nProtocol: {a.solver}, NFE {a.nfe}, N={a.n} (the common protocol's "
          f"1024 cut to {a.n} for time), seed 0, batch 256; FID-dom on the shipped MNIST classifier, relative to "
          f"the fp32 eager row of this run. Per-sample time: whole {a.nfe}-NFE sampling runs of {a.time_batch} images, "
          f"{a.rounds} alternating rounds, median, OMP_NUM_THREADS=1 on a shared 2-core machine. MACs per sample: "
          f"counted with FlopCounterMode for each call actually made (full or shallow).\n\n" + "\n".join(lines)
          + "\n\n" + verdict)
    print(md)
    # NFE 20 (the common protocol) is benchmarks/results/cache.md; other NFE get their own file
    write_results("cache" if a.nfe == 20 else f"cache_nfe{a.nfe}", {"rows": res, "verdict": verdict, "settings": vars(a)}, md)


if __name__ == "__main__":
    main()
