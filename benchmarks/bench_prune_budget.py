"""How many fine-tuning steps a pruned model needs (issue 7's quality target, measured as a curve).

bench_prune.py fine-tunes every pruned model for 600 steps (15 % of the base model's training) and
finds FID-dom 1.65x–2.8x the base. This script takes some of those fine-tuned models and fine-tunes
them further, in chunks, evaluating after each chunk with the same protocol, so the table says what
the quality target would take:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prune_budget.py --prune-out runs/bench/prune2 \\
        --out runs/bench/prune-budget --labels s-magnitude-0.3 s-diff-0.5 --totals 1200 2400

Each chunk is ``finetune(steps=Δ, batch_size=128, lr=LR, bf16=true)`` on the previous chunk's checkpoint (a new
AdamW state and its own cosine warm restarts, as a user continuing a fine-tune would run it), made
into OUT/models/<label>-ft<total> and resumed if killed; rows go to OUT/rows.jsonl (done rows are
skipped on a rerun). Protocol: the same as bench_prune (dpmpp-2m-sde, NFE 20, N=1024, seed 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402
from bench_prune import BASE, BASE_STEPS, make, open_rows, run_row  # noqa: E402
from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.evaluate import load_classifier  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prune-out", default="runs/bench/prune2",
                   help="bench_prune.py's --out: its models/<label>-ft are the 600-step starting points")
    p.add_argument("--out", default="runs/bench/prune-budget")
    p.add_argument("--labels", nargs="+", default=["s-magnitude-0.3", "s-diff-0.5"])
    p.add_argument("--start", type=int, default=600, help="fine-tune steps the starting models already had")
    p.add_argument("--totals", nargs="+", type=int, default=[1200, 2400], help="cumulative fine-tune steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n", type=int, default=1024)
    a = p.parse_args(argv)

    out = Path(a.out)
    rows_path, done = open_rows(out)
    clf = load_classifier("mnist")
    base = run_row(rows_path, done, "base", BASE, clf, a.n)["quality"]["fid_dom"]

    table = {}
    for label in a.labels:
        start = Path(a.prune_out) / "models" / f"{label}-ft"
        if not (start / "leandiff.json").is_file():
            sys.exit(f"no fine-tuned model {start}: run bench_prune.py --out {a.prune_out} first")
        curve = [(a.start, run_row(rows_path, done, f"{label}-ft{a.start}", start, clf, a.n))]
        prev, prev_steps = start, a.start
        for total in sorted(a.totals):
            recipe = f"finetune(steps={total - prev_steps},batch_size=128,lr={a.lr},bf16=true)"
            d = make(load_checkpoint(prev), f"{label}-ft{total}", recipe, out)
            curve.append((total, run_row(rows_path, done, f"{label}-ft{total}", d, clf, a.n)))
            prev, prev_steps = d, total
        table[label] = [{"ft_steps": s, "pct_of_base": 100 * s / BASE_STEPS, "fid_dom": r["quality"]["fid_dom"],
                         "ratio": r["quality"]["fid_dom"] / base, "macs": r["cost"]["macs_per_image"],
                         "params": r["cost"]["params"]} for s, r in curve]

    lines = ["# Pruning: FID-dom against fine-tuning steps (issue 7's quality target as a curve)", "",
             f"Base `{BASE}`: FID-dom {base:.3f} (dpmpp-2m-sde, NFE 20, N={a.n}, seed 0). Starting points: "
             f"bench_prune's {a.start}-step fine-tuned models (`{a.prune_out}/models/<label>-ft`); each later "
             f"row continues the previous one with `finetune(steps=Δ,batch_size=128,lr={a.lr},bf16=true)`. "
             f"% = fine-tune steps ÷ the base's {BASE_STEPS} training steps (batch 128 both).", "",
             "| model | params | MACs | FT steps (% of base) | FID-dom | ÷ base | ≤ 1.10× |",
             "|---|---|---|---|---|---|---|"]
    for label, curve in table.items():
        for c in curve:
            lines.append(f"| {label} | {c['params']:,} | {c['macs'] / 1e6:.1f} M | {c['ft_steps']} ({c['pct_of_base']:.0f}%) "
                         f"| {c['fid_dom']:.3f} | {c['ratio']:.2f}× | {'yes' if c['ratio'] <= 1.10 else 'no'} |")
    lines.append("")
    for label, curve in table.items():
        hit = next((c for c in curve if c["ratio"] <= 1.10), None)
        lines.append(f"- {label}: " + (f"FID-dom ≤ 1.10× the base first at {hit['ft_steps']} steps "
                                      f"({hit['pct_of_base']:.0f}% of the base's training)." if hit else
                                      f"not within 1.10× of the base after {curve[-1]['ft_steps']} steps "
                                      f"({curve[-1]['pct_of_base']:.0f}%); best {min(c['ratio'] for c in curve):.2f}×."))
    write_results("prune_budget", {"base_fid_dom": base, "n": a.n, "curves": table}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
