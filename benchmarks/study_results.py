"""Run a shipped study (issue 9) timed, and write its committed results file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_results.py studies/ptq4dm.toml --out runs/study/ptq4dm

runs ``leandiff study STUDY --out DIR`` in a subprocess (resumable: finished cells are skipped), times it,
and writes benchmarks/results/study-<name>.{json,md}: every cell (model, solver, NFE, runtime, N,
FID-dom, KID, seconds), each finding with its verdict, and the wall time. A rerun over a finished
directory takes seconds and would understate the study's cost, so the wall time of the run that did the
work is kept: it is read from DIR/wall.json, which this script writes only when cells were run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from leandiff.study import load_study  # noqa: E402


def cells(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    study, out = Path(a.study), Path(a.out)
    before = len(cells(out))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "leandiff.cli", "study", str(study), "--out", str(out)])
    if rc != 0:
        raise SystemExit(f"leandiff study exited with {rc}")
    seconds = time.perf_counter() - t0
    rows = cells(out)
    wall_file = out / "wall.json"
    if len(rows) > before or not wall_file.is_file():
        wall = {"seconds": seconds, "cells_run": len(rows) - before,
                "note": "whole study in one run" if before == 0 else f"resumed after {before} finished cells"}
        wall_file.write_text(json.dumps(wall, indent=1))
    wall = json.loads(wall_file.read_text())
    findings = json.loads((out / "findings.json").read_text())
    title = load_study(study).title
    table = ["| model | solver | NFE | runtime | N | FID-dom | KID×1e3 | ε-MSE | params | MMAC/eval | images/s | cell s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    compact = []
    for r in rows:
        c = {"model": r["study_model"], "solver": r["protocol"]["solver"], "nfe": r["protocol"]["nfe_used"],
             "runtime": r["study_runtime"], "n": r["protocol"]["n"], "fid_dom": r["quality"]["fid_dom"],
             "kid": r["quality"]["kid"], "mse": r["quality"].get("mse"), "params": r["cost"].get("params"),
             "macs": r["cost"].get("macs_per_image"), "images_per_s": r["cost"].get("sampling_images_per_s"),
             "seconds": r["study_seconds"]}
        compact.append(c)
        opt = [("{:.4f}", c["mse"]), ("{:,}", c["params"]), ("{:.1f}", c["macs"] and c["macs"] / 1e6),
               ("{:.1f}", c["images_per_s"])]
        table.append(f"| {c['model']} | {c['solver']} | {c['nfe']:g} | {c['runtime']} | {c['n']} | {c['fid_dom']:.3f} | "
                     f"{c['kid'] * 1e3:.1f} | " + " | ".join("—" if v is None else f.format(v) for f, v in opt)
                     + f" | {c['seconds']:.0f} |")
    lines = [f"# Study: {title}", "", f"`{study}`, results in `{out}/results.jsonl`, report in `{out}/report/`.", "",
             *table, "", "## Findings (the paper's claims against these cells)", ""]
    for f in findings:
        lines.append(f"- **{f['verdict']}** — {f['claim']}: {f['metric']} {f['a_value']:.4g} vs {f['b_value']:.4g} "
                     f"(ratio {f['ratio']:.3f}; tested {f['relation']} with factor {f['factor']:g})")
    lines += ["", f"Wall time of the study: {wall['seconds']:.0f} s ({wall['seconds'] / 60:.1f} min; {wall['note']}; "
              f"goal ≤ 1 hour: {'met' if wall['seconds'] <= 3600 else 'NOT met'}). One core (OMP_NUM_THREADS=1); "
              "other jobs shared the 2-core machine during the run."]
    write_results(f"study-{study.stem}", {"study": str(study), "title": title, "wall": wall, "cells": compact,
                                           "findings": findings}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
