"""Control for the pruning target (issue 7): the pruned architectures trained from scratch for the base
model's whole training (4,000 steps × 128, the base's own `leandiff train` settings), scored with the
pruning benchmark's protocol. If an architecture cannot reach the target quality with 100 % of the
base's steps from a fresh start, a prune + 15 % fine-tune of it has to beat that by a wide margin.

    python benchmarks/bench_prune_scratch.py --prune-out runs/bench/prune2 --out runs/bench/prune-scratch

Each architecture is taken from a pruned model of ``--prune-out`` (its recorded surgery), every layer
re-initialised as a fresh network is (``reset_parameters``, seed 0), and trained by the CLI into
OUT/<label> (resumable: a finished run is not repeated). Rows are appended to OUT/rows.jsonl.
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
from bench_prune import BASE, BASE_STEPS, open_rows, run_row  # noqa: E402
from leandiff.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from leandiff.evaluate import load_classifier  # noqa: E402


def fresh_copy(src: Path, dst: Path, seed: int = 0) -> None:
    """``src``'s architecture (its surgery replayed) with freshly initialised weights, saved to ``dst``."""
    import torch

    ck = load_checkpoint(src)
    torch.manual_seed(seed)
    for m in ck.net.modules():
        if m is not ck.net and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    ck.meta.pop("prune", None)
    save_checkpoint(ck, dst)


def trained_steps(d: Path) -> int:
    f = d / "leandiff.json"
    return json.loads(f.read_text()).get("train", {}).get("completed_steps", 0) if f.is_file() else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prune-out", default="runs/bench/prune2")
    p.add_argument("--out", default="runs/bench/prune-scratch")
    p.add_argument("--labels", nargs="+", default=["s-magnitude-0.3", "s-magnitude-0.5"])
    p.add_argument("--steps", type=int, default=BASE_STEPS)
    p.add_argument("--n", type=int, default=1024)
    a = p.parse_args(argv)
    out = Path(a.out)
    rows_path, done = open_rows(out)
    clf = load_classifier("mnist")
    base_row = run_row(rows_path, done, "base", load_checkpoint(BASE).path, clf, a.n)
    prune_rows = json.loads((Path(__file__).parent / "results" / "prune.json").read_text())["structured"]
    rec, lines = {"base_fid_dom": base_row["quality"]["fid_dom"], "rows": {}, "settings": vars(a)}, []
    for label in a.labels:
        d = out / f"{label}-scratch"
        if trained_steps(d) < a.steps:
            init = out / f"{label}-init"
            if not (init / "leandiff.json").is_file():
                fresh_copy(Path(a.prune_out) / "models" / label, init)
            cmd = [str(Path(sys.executable).parent / "leandiff"), "train", "--init", str(init), "--dataset", "mnist",
                   "--steps", str(a.steps), "--batch-size", "128", "--bf16", "--sample-every", "0", "--out", str(d)]
            if (d / "train_state.safetensors").is_file():
                cmd.append("--resume")
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"{label}: trained in {time.perf_counter() - t0:.0f}s", flush=True)
        row = run_row(rows_path, done, f"{label}-scratch", d, clf, a.n)
        f, f0 = row["quality"]["fid_dom"], base_row["quality"]["fid_dom"]
        pr = prune_rows.get(label, {})
        best = min((v["fid_dom_post"] for k, v in prune_rows.items()
                    if v.get("ratio") == pr.get("ratio") and v.get("fid_dom_post") is not None), default=None)
        rec["rows"][label] = {"params": row["cost"]["params"], "macs_per_image": row["cost"]["macs_per_image"],
                              "steps": a.steps, "fid_dom": f, "ratio_to_base": f / f0,
                              "best_pruned_ft_in_prune_md": best, "train_wall_seconds":
                                  json.loads((d / "leandiff.json").read_text()).get("train", {}).get("wall_seconds")}
        lines.append(f"| {label.replace('s-magnitude-', 'p = ')} | {row['cost']['params']:,} | "
                     f"{row['cost']['macs_per_image'] / 1e6:.1f} M | {a.steps} ({a.steps / BASE_STEPS:.0%}) | "
                     f"{f:.3f} ({f / f0:.2f}×) | " + (f"{best:.3f} ({best / f0:.2f}×)" if best else "—") + " |")
    md = "\n".join([
        "### Pruned architectures trained from scratch for the base's whole training (zoo:mnist-tiny)", "",
        f"Base: FID-dom {rec['base_fid_dom']:.3f} (dpmpp-2m-sde NFE 20, N={a.n}, seed 0 — the pruning benchmark's protocol).",
        "", "| architecture | params | MACs | training steps (% of base) | FID-dom from scratch (÷ base) | "
        "best pruned + 600-step fine-tune in prune.md (÷ base) |", "|---|---|---|---|---|---|", *lines, "",
        "The architecture is the magnitude-pruned model's (all importances give the same shapes at one p); weights "
        "re-initialised as a fresh network's, then `leandiff train --dataset mnist --steps 4000 --batch-size 128 --bf16` "
        "(the base's own command and defaults)."])
    print(md)
    write_results("prune_scratch", rec, md)


if __name__ == "__main__":
    main()
