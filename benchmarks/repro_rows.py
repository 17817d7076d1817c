"""Do committed benchmark figures still come out of today's code? Re-measures a few rows of each family
(solvers and spacings, feature caching, real int8 and fake-quant PTQ) with the committed protocol and
prints the committed figure beside today's.

    python benchmarks/repro_rows.py [--out runs/repro_rows]

Each row is one `leandiff eval` (and, for a quantized row, one `leandiff compress` with the recipe that
makes the same calibration as the benchmark did) on zoo:mnist-tiny at the results file's N, seed and batch.
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

from _common import write_results

# (results file, row as it is named there, committed FID-dom, recipe or None, eval arguments)
ROWS = [
    ("spacing.md", "dpmpp-3m-sde 20 NFE, leading", 0.620, None,
     ["--solver", "dpmpp-3m-sde", "--nfe", "20", "--spacing", "leading"]),
    ("spacing.md", "dpmpp-3m-sde 20 NFE, trailing", 0.643, None,
     ["--solver", "dpmpp-3m-sde", "--nfe", "20", "--spacing", "trailing"]),
    ("spacing.md", "dpmpp-3m-sde 20 NFE, logsnr", 0.511, None,
     ["--solver", "dpmpp-3m-sde", "--nfe", "20", "--spacing", "logsnr"]),
    ("cache.md", "eager (dpmpp-2m-sde 20, leading)", 0.6418, None,
     ["--solver", "dpmpp-2m-sde", "--nfe", "20", "--spacing", "leading"]),
    ("cache.md", "cache-nu:2", 0.6988, None,
     ["--solver", "dpmpp-2m-sde", "--nfe", "20", "--spacing", "leading", "--runtime", "cache-nu:2"]),
    ("cache.md", "cache:3", 2.1471, None,
     ["--solver", "dpmpp-2m-sde", "--nfe", "20", "--spacing", "leading", "--runtime", "cache(interval=3)"]),
    ("quant.md", "ort-int8[uniform]", 0.6679, "quant(runtime=ort-int8,calib=uniform,n=256,steps=20)",
     ["--solver", "dpmpp-2m-sde", "--nfe", "20", "--spacing", "leading"]),
    ("quant.md", "fake-W8A8[qdiff]", 0.6446, "quant(calib=qdiff,n=256,steps=20)",
     ["--solver", "dpmpp-2m-sde", "--nfe", "20", "--spacing", "leading"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/repro_rows")
    ap.add_argument("-n", type=int, default=512)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("leandiff"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = []
    for i, (source, name, committed, recipe, args) in enumerate(ROWS):
        ckpt = "zoo:mnist-tiny"
        if recipe:
            ckpt = str(out / f"ckpt{i}")
            subprocess.run([exe, "compress", "zoo:mnist-tiny", "--recipe", recipe, "--out", ckpt, "--device", "cpu"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        rows = out / f"row{i}.jsonl"
        rows.unlink(missing_ok=True)
        subprocess.run([exe, "eval", ckpt, *args, "-n", str(a.n), "--seed", "0", "--batch-size", "256", "--no-latency",
                        "--device", "cpu", "--out", str(rows)], env=env, check=True, stdout=subprocess.DEVNULL)
        now = json.loads(rows.read_text().splitlines()[-1])["quality"]["fid_dom"]
        digits = len(str(committed).split(".")[1])
        same = round(now, digits) == committed
        results.append({"source": source, "row": name, "recipe": recipe, "committed": committed, "now": now, "same": same})
        print(f"{source:12s} {name:36s} committed {committed}  now {now:.{digits}f}  {'same' if same else 'DIFFERENT'}",
              flush=True)
    md = ["# Committed benchmark rows re-measured with today's code", "",
          f"zoo:mnist-tiny, N = {a.n}, seed 0, batch 256; each row's spacing named explicitly; the committed figure is "
          "rounded as its results file prints it.", "",
          "| results file | row | recipe | committed FID-dom | today | same |", "|---|---|---|---:|---:|---|"]
    for r in results:
        digits = len(str(r["committed"]).split(".")[1])
        md.append(f"| {r['source']} | {r['row']} | {('`' + r['recipe'] + '`') if r['recipe'] else '–'} | {r['committed']} | "
                  f"{r['now']:.{digits}f} | {'yes' if r['same'] else '**no**'} |")
    write_results("repro_rows", {"rows": results, "n": a.n}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
