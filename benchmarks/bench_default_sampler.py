"""Which spacing a checkpoint that records none should get, per schedule kind (schedule.DEFAULT_SPACINGS).

    python benchmarks/bench_default_sampler.py [--ckpts zoo:mnist-tiny,zoo:fashion-tiny] [-n 512]
        [--samplers dpmpp-3m-sde:10,dpmpp-2m:20] [--spacings logsnr,trailing]

Evaluates every checkpoint × sampler × spacing with the harness (N samples, seed 0, eager fp32, the
same x_T for every row) and prints, per schedule kind, the spacing with the lower FID-dom for each
sampler. Writes benchmarks/results/default_sampler.{json,md}.
"""
from __future__ import annotations

import argparse
import os

from _common import write_results
from leandiff.checkpoint import load_checkpoint
from leandiff.evaluate.harness import EvalConfig, evaluate_checkpoint


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpts", default="zoo:mnist-tiny,zoo:fashion-tiny")
    ap.add_argument("--samplers", default="dpmpp-3m-sde:10,dpmpp-2m:20")
    ap.add_argument("--spacings", default="logsnr,trailing")
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    a = ap.parse_args()
    samplers = [(s.split(":")[0], int(s.split(":")[1])) for s in a.samplers.split(",")]
    spacings = a.spacings.split(",")
    rows = []
    for name in a.ckpts.split(","):
        ck = load_checkpoint(name)
        for solver, nfe in samplers:
            for spacing in spacings:
                cfg = EvalConfig(solver=solver, nfe=nfe, n=a.n, spacing=spacing, latency=None, inception=False)
                fid = evaluate_checkpoint(ck, cfg, log=lambda *x, **k: None)["quality"]["fid_dom"]
                rows.append({"ckpt": name, "schedule": ck.schedule.kind, "parameterization": ck.parameterization,
                             "solver": solver, "nfe": nfe, "spacing": spacing, "fid_dom": fid})
                print(f"{name} ({ck.schedule.kind}, {ck.parameterization}) {solver}-{nfe} {spacing}: "
                      f"FID-dom {fid:.3f}", flush=True)
    md = [f"# Default spacing by schedule (N = {a.n}, seed 0, FID-dom, eager fp32)", "",
          "| checkpoint | schedule | predicts | sampler | " + " | ".join(spacings) + " | best |",
          "|---|---|---|---|" + "---:|" * len(spacings) + "---|"]
    wins: dict[str, dict[str, int]] = {}
    for name in a.ckpts.split(","):
        for solver, nfe in samplers:
            rs = {r["spacing"]: r for r in rows if r["ckpt"] == name and r["solver"] == solver and r["nfe"] == nfe}
            best = min(rs, key=lambda k: rs[k]["fid_dom"])
            kind = rs[best]["schedule"]
            wins.setdefault(kind, {}).setdefault(best, 0)
            wins[kind][best] += 1
            md.append(f"| {name} | {kind} | {rs[best]['parameterization']} | {solver}-{nfe} | "
                      + " | ".join(f"{rs[s]['fid_dom']:.3f}" for s in spacings) + f" | {best} |")
    md += ["", "Wins per schedule kind (checkpoint × sampler): "
           + "; ".join(f"{k}: " + ", ".join(f"{s} {n}" for s, n in v.items()) for k, v in wins.items()) + "."]
    if a.note:
        md += ["", a.note]
    md += ["", f"Threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average at the end "
           f"{os.getloadavg()[0]:.1f}."]
    print("\n".join(md))
    write_results("default_sampler", {"n": a.n, "rows": rows, "wins": wins}, "\n".join(md))


if __name__ == "__main__":
    main()
