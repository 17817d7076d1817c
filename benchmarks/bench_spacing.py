"""The correctness issue's check: `dpmpp-3m-sde` at 20 NFE on every spacing of `zoo:mnist-tiny`.

    python benchmarks/bench_spacing.py [-n 512] [--solver dpmpp-3m-sde] [--nfe 20] [--ckpt C] [--spacings a,b]
        [--results-name spacing]

Before the multistep order limit (leandiff/solvers/dpmpp.py) the leading row read FID-dom 50.1 against
0.64 on trailing (N = 512); the rows must now agree within 1.2×. Writes benchmarks/results/spacing.{json,md}
(or ``--results-name``'s), with the command and machine.
"""
from __future__ import annotations

import argparse

from _common import write_results
from leandiff.checkpoint import load_checkpoint
from leandiff.evaluate.harness import EvalConfig, evaluate_checkpoint
from leandiff.schedule import SPACINGS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="zoo:mnist-tiny")
    ap.add_argument("--solver", default="dpmpp-3m-sde")
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("--spacings", default=",".join(SPACINGS))
    ap.add_argument("--results-name", default="spacing")
    a = ap.parse_args()
    ck = load_checkpoint(a.ckpt)
    rows = {}
    for spacing in a.spacings.split(","):
        cfg = EvalConfig(solver=a.solver, nfe=a.nfe, n=a.n, spacing=spacing, latency=None, inception=False)
        rows[spacing] = evaluate_checkpoint(ck, cfg, log=lambda *x, **k: None)["quality"]["fid_dom"]
        print(f"{a.solver} {a.nfe} NFE {spacing:>9}: FID-dom {rows[spacing]:.3f}", flush=True)
    md = [f"# {a.solver}, {a.nfe} NFE, on every spacing ({a.ckpt}, N = {a.n}, seed 0)", "",
          "| spacing | FID-dom |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in rows.items()]
    ratio = None
    if {"leading", "trailing"} <= set(rows):
        ratio = max(rows["leading"], rows["trailing"]) / min(rows["leading"], rows["trailing"])
        md += ["", f"leading / trailing: {ratio:.2f}× (the issue's bar: within 1.2×; before the fix 50.1 vs 0.64)."]
        print(md[-1])
    write_results(a.results_name, {"ckpt": a.ckpt, "solver": a.solver, "nfe": a.nfe, "n": a.n, "fid_dom": rows,
                                   "leading_over_trailing": ratio}, "\n".join(md))


if __name__ == "__main__":
    main()
