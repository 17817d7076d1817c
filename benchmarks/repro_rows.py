"""Do committed benchmark figures still come out of today's code? Re-measures a few rows of each family
(solvers and spacings, ONNX Runtime fp32 and real int8, feature caching) with the committed protocol and
prints the committed figure beside today's.

    python benchmarks/repro_rows.py [--out runs/repro_rows]

Each row is one `leandiff eval` (and, for a quantized row, one `leandiff compress` with the recipe that
makes the same calibration as the benchmark did) on zoo:mnist-tiny at the results file's N, seed and batch.
The spacing rows touch the solvers and the harness; the cpu_runtimes rows (2026-12-02 08:01) came before the
last part of the design step (one nested training config per step, the demo as a study file, 13:16 that day).
The spacing is named explicitly: rows measured before the default spacing became `logsnr` used `leading`.
Writes benchmarks/results/repro_rows.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import RESULTS, write_results

# (results file, row as it is named there, committed FID-dom as printed there, recipe or None, N, eval arguments).
# cache.md (2026-11-24) predates the multistep solvers' order limit (2026-12-02), which changed dpmpp-2m-sde's last
# step on leading grids: its row is expected to differ, and shows by how much that fix moved the committed figures.
ROWS = [
    ("spacing.md", "dpmpp-3m-sde 20 NFE, leading", "0.620", None, 512,
     ["--solver", "dpmpp-3m-sde", "--nfe", "20", "--spacing", "leading"]),
    ("spacing.md", "dpmpp-3m-sde 20 NFE, trailing", "0.643", None, 512,
     ["--solver", "dpmpp-3m-sde", "--nfe", "20", "--spacing", "trailing"]),
    ("spacing.md", "dpmpp-3m-sde 20 NFE, logsnr", "0.511", None, 512,
     ["--solver", "dpmpp-3m-sde", "--nfe", "20", "--spacing", "logsnr"]),
    ("cpu_runtimes.md", "torch fp32 eager", "0.3893", None, 2048,
     ["--solver", "dpmpp-3m-sde", "--nfe", "10", "--spacing", "trailing"]),
    ("cpu_runtimes.md", "ORT fp32", "0.3893", None, 2048,
     ["--solver", "dpmpp-3m-sde", "--nfe", "10", "--spacing", "trailing", "--runtime", "ort"]),
    ("cpu_runtimes.md", "ORT int8 [uniform]", "0.4379", "quant(runtime=ort-int8,calib=uniform,n=256,steps=20)", 2048,
     ["--solver", "dpmpp-3m-sde", "--nfe", "10", "--spacing", "trailing"]),
    ("cache.md", "cache-nu:2 (dpmpp-2m-sde 20, leading)", "0.6988", None, 512,
     ["--solver", "dpmpp-2m-sde", "--nfe", "20", "--spacing", "leading", "--runtime", "cache-nu:2"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/repro_rows")
    ap.add_argument("--report-only", action="store_true", help="re-render the Markdown from the committed JSON")
    a = ap.parse_args()
    if a.report_only:
        rec = json.loads((RESULTS / "repro_rows.json").read_text())
        return report(rec["rows"], rec["command"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("leandiff"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = []
    for i, (source, name, committed, recipe, n, args) in enumerate(ROWS):
        ckpt = "zoo:mnist-tiny"
        if recipe:
            ckpt = str(out / f"ckpt{i}")
            subprocess.run([exe, "compress", "zoo:mnist-tiny", "--recipe", recipe, "--out", ckpt, "--device", "cpu"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        rows = out / f"row{i}.jsonl"
        rows.unlink(missing_ok=True)
        subprocess.run([exe, "eval", ckpt, *args, "-n", str(n), "--seed", "0", "--batch-size", "256", "--no-latency",
                        "--device", "cpu", "--out", str(rows)], env=env, check=True, stdout=subprocess.DEVNULL)
        now = json.loads(rows.read_text().splitlines()[-1])["quality"]["fid_dom"]
        digits = len(committed.split(".")[1])
        same = f"{now:.{digits}f}" == committed
        results.append({"source": source, "row": name, "recipe": recipe, "n": n, "committed": committed, "now": now,
                        "same": same})
        print(f"{source:12s} {name:36s} committed {committed}  now {now:.{digits}f}  {'same' if same else 'DIFFERENT'}",
              flush=True)
    report(results)


NOTE = """The cache.md row differs as expected: it was measured on 2026-11-24, before the multistep solvers' order
limit (commit b100d2c) changed dpmpp-2m-sde's last step on leading grids. The same protocol's eager row
(cache.md and quant.md: 0.6418) reads 0.642 on the tree just before b100d2c and 0.513 on b100d2c itself
(`git worktree add ../before b100d2c~1`, then `PYTHONPATH=../before python -m leandiff.cli eval zoo:mnist-tiny
--solver dpmpp-2m-sde --nfe 20 --spacing leading -n 512 --seed 0 --batch-size 256 --no-latency --out F`, and the
same on b100d2c), and today's code gives 0.5126: the committed leading-grid figures of cache.md and quant.md
predate that fix, not the design step."""


def report(results: list[dict], cmd: str | None = None) -> None:
    md = ["# Committed benchmark rows re-measured with today's code", "",
          "zoo:mnist-tiny, seed 0, batch 256, each row at its results file's N and with its spacing named explicitly; "
          "today's figure is rounded as the results file prints the committed one.", "",
          "| results file | row | recipe | N | committed FID-dom | today | same |", "|---|---|---|---:|---:|---:|---|"]
    for r in results:
        digits = len(r["committed"].split(".")[1])
        md.append(f"| {r['source']} | {r['row']} | {('`' + r['recipe'] + '`') if r['recipe'] else '–'} | {r['n']} | {r['committed']} | "
                  f"{r['now']:.{digits}f} | {'yes' if r['same'] else '**no**'} |")
    md += ["", NOTE]
    write_results("repro_rows", {"rows": results}, "\n".join(md) + "\n", cmd=cmd)


if __name__ == "__main__":
    main()
