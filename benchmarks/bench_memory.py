"""Memory benchmark (issue 10): evaluation streams, so its peak RSS must not grow with the number of
samples. ``leandiff eval``'s harness (``evaluate_checkpoint``) runs on zoo:mnist-tiny at N = 2,048,
10,000 and 50,000 with a cheap sampler (DDIM, 1 step: the memory behaviour does not depend on the
NFE, only the time does), each N in a fresh process so that its lifetime peak RSS (getrusage) is
its own. Goal: peak RSS < 2 GB at N = 50,000.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py

Rows are appended to runs/bench/memory/rows.jsonl as soon as each N is done (a rerun skips them);
results go to benchmarks/results/memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]

GOAL_MB = 2048
MODEL = "zoo:mnist-tiny"


def one(n: int, solver: str, nfe: int, batch: int, rows: Path) -> None:
    """Evaluate at N = n in this process and append the row with its memory figures."""
    from leandiff.cost import PeakMemory, current_rss, max_rss_lifetime
    from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint

    rss_start = current_rss()
    cfg = EvalConfig(solver=solver, nfe=nfe, n=n, seed=0, batch_size=batch, latency=None, inception=False)
    t0 = time.perf_counter()
    with PeakMemory() as whole:  # RSS polled every 5 ms over the whole evaluation, metrics included
        row = evaluate_checkpoint(MODEL, cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
    mb = lambda v: round(v / 2**20, 1)  # noqa: E731
    append_row(rows, {**row, "bench": {
        "n": n, "wall_seconds": round(time.perf_counter() - t0, 1),
        "rss_at_start_mb": mb(rss_start),
        "peak_rss_whole_eval_mb": whole.as_dict()["peak_rss_mb"],
        "peak_rss_sampling_loop_mb": row["cost"]["peak_rss_mb"],
        "process_peak_rss_mb": mb(max_rss_lifetime()),
        "all_images_float32_mb": mb(n * 28 * 28 * 4),  # what holding every sample at once would cost
    }})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2048,10000,50000", help="comma-separated sample counts")
    ap.add_argument("--solver", default="ddim")
    ap.add_argument("--nfe", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "memory"))
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    rows = Path(a.out) / "rows.jsonl"
    if a.one is not None:
        one(a.one, a.solver, a.nfe, a.batch_size, rows)
        return

    from _common import write_results
    from leandiff.evaluate import read_rows

    for n in (int(x) for x in a.n.split(",")):
        done = [r for r in (read_rows([rows]) if rows.is_file() else [])
                if r["bench"]["n"] == n and r["protocol"]["solver"] == a.solver and r["protocol"]["nfe"] == a.nfe]
        if done:
            print(f"N={n}: done", flush=True)
            continue
        print(f"N={n}: evaluating in a fresh process ...", flush=True)
        subprocess.run([sys.executable, __file__, "--one", str(n), "--solver", a.solver, "--nfe", str(a.nfe),
                        "--batch-size", str(a.batch_size), "--out", a.out], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))

    table = []
    for r in read_rows([rows]):
        if r["protocol"]["solver"] != a.solver or r["protocol"]["nfe"] != a.nfe:
            continue
        b = r["bench"]
        table.append({"n": b["n"], "wall_seconds": b["wall_seconds"],
                      "sampling_images_per_s": round(r["cost"]["sampling_images_per_s"], 1),
                      "rss_at_start_mb": b["rss_at_start_mb"], "peak_rss_sampling_loop_mb": b["peak_rss_sampling_loop_mb"],
                      "peak_rss_whole_eval_mb": b["peak_rss_whole_eval_mb"], "process_peak_rss_mb": b["process_peak_rss_mb"],
                      "all_images_float32_mb": b["all_images_float32_mb"], "fid_dom": r["quality"]["fid_dom"],
                      "goal_met": b["process_peak_rss_mb"] < GOAL_MB})
    table.sort(key=lambda t: t["n"])
    head = ("| N | wall s | sampling img/s | RSS at start MB | peak RSS sampling loop MB | peak RSS whole eval MB "
            "| process peak RSS MB | all samples as float32 MB | FID-dom | < 2 GB |\n|" + "---|" * 10)
    lines = [f"| {t['n']:,} | {t['wall_seconds']:.0f} | {t['sampling_images_per_s']:.0f} | {t['rss_at_start_mb']:.0f} "
             f"| {t['peak_rss_sampling_loop_mb']:.0f} | {t['peak_rss_whole_eval_mb']:.0f} | {t['process_peak_rss_mb']:.0f} "
             f"| {t['all_images_float32_mb']:.0f} | {t['fid_dom']:.3f} | {'yes' if t['goal_met'] else 'NO'} |"
             for t in table]
    md = (f"# Evaluation memory: peak RSS vs number of samples\n\n"
          f"`evaluate_checkpoint` on {MODEL}, {a.solver} NFE {a.nfe} (chosen for speed: memory does not depend "
          f"on the NFE), batch {a.batch_size}, seed 0, no latency measurement, one fresh process per N. "
          f"Samples are generated and embedded batch by batch; only the classifier's features and class "
          f"probabilities of each image are kept (plus 64 images for the grid). *Process peak RSS* is getrusage's "
          f"lifetime maximum of the process (imports, model, classifier, reference statistics and all metrics "
          f"included); the other peaks are polled every 5 ms. Goal: < {GOAL_MB} MB at N = 50,000.\n\n"
          f"{head}\n" + "\n".join(lines) + "\n\n"
          f"FID-dom is shown only as proof that every metric ran over all N samples: one DDIM step makes no "
          f"digits, so it says nothing about the model. What grows with N is the per-image record kept for "
          f"KID / precision-recall / IS (features and class probabilities); the rest of the peak is the "
          f"process itself, the batch's activations and the held-out images.\n")
    print(md)
    write_results("memory", {"model": MODEL, "solver": a.solver, "nfe": a.nfe, "batch_size": a.batch_size,
                             "goal_mb": GOAL_MB, "rows": table}, md)


if __name__ == "__main__":
    main()
