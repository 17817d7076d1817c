"""Time to quality: training recipes on the same network, data and CPU budget (the teachers issue).

    python benchmarks/bench_recipes.py [--out runs/bench/recipes] [--steps 2000] [--snapshot-every 500]
        [--recipes ddpm2020,v-cosine-tsnr,min-snr,edm] [--parallel 2] [-n 512]

Each recipe trains `mnist-tiny` on MNIST with `leandiff train` (one thread per run, ``--parallel`` runs
at a time, resumable: rerun the command after a kill), keeping a snapshot every ``--snapshot-every``
steps. Every snapshot is then evaluated with `leandiff eval` (rows appended to one JSONL, skipped when
already there) by the best stochastic sampler at 10 NFE and the best deterministic sampler at 20 and
50 NFE, each the best of a few solvers × spacings. Training core-seconds are the run's own CPU time
(all its threads), which other work on the machine does not inflate the way it inflates wall time.

Writes benchmarks/results/recipes.{json,md} and a plot of FID-dom against core-seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, write_results

COMMON = ["--model", "mnist-tiny", "--batch-size", "128", "--bf16", "--sample-every", "0",
          "--ema-decay", "0.995", "--ema-decays", "0.99,0.999"]
RECIPES = {
    # today's recipe (Ho et al. 2020): ε, linear β, plain MSE
    "ddpm2020": ["--parameterization", "eps", "--schedule", "linear", "--weighting", "plain"],
    # progressive distillation report (Salimans & Ho 2022): v, cosine, max(SNR, 1)
    "v-cosine-tsnr": ["--parameterization", "v", "--schedule", "cosine", "--weighting", "truncated-snr"],
    # Hang et al. 2023: min(SNR, 5), v-prediction on the cosine schedule
    "min-snr": ["--parameterization", "v", "--schedule", "cosine", "--weighting", "min-snr", "--min-snr-gamma", "5"],
    # Karras et al. 2022: preconditioning, lognormal σ, λ(σ) weighting, on the linear-β VP grid
    "edm": ["--parameterization", "edm", "--schedule", "linear"],
}
# (label, NFE, [(solver, spacing, nfe)]): the best of each group is the row's figure
# logsnr spacing is a poor grid for SDE solvers at 10 NFE (on the cosine schedule λ reaches −20 at t = T−1,
# so steps uniform in λ are spent where nothing is visible; measured at 1,000 steps, N = 256: v-cosine 51 on
# logsnr), so the stochastic row is trailing. --full adds trailing members to the other groups; each column
# is the best of its group.
STOCHASTIC_10 = [("dpmpp-3m-sde", "trailing", 10)]
DETERMINISTIC = {20: [("dpmpp-2m", "logsnr", 20)], 50: [("dpmpp-2m", "logsnr", 50)]}
FULL = {"sde": [("dpmpp-2m-sde", "trailing", 10)], 20: [("dpmpp-2m", "trailing", 20), ("heun", "logsnr", 19)],
        50: [("dpmpp-3m", "logsnr", 50), ("dpmpp-2m", "trailing", 50)]}


def leandiff() -> str:
    return str(Path(sys.executable).with_name("leandiff"))


def train_all(a, names: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    pending = [n for n in names if not (Path(a.out) / n / "snapshots" / f"step_{a.steps:07d}").is_dir()]
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < a.parallel:
            n = pending.pop(0)
            d = Path(a.out) / n
            d.mkdir(parents=True, exist_ok=True)
            cmd = [leandiff(), "train", "--dataset", a.dataset, "--steps", str(a.steps), "--snapshot-every",
                   str(a.snapshot_every), "--checkpoint-every", str(a.snapshot_every), *COMMON, *RECIPES[n],
                   "--out", str(d), "--resume"]
            print("train:", " ".join(cmd[1:]), flush=True)
            running.append((n, subprocess.Popen(cmd, env=env, stdout=open(d / "train.log", "a"),
                                                stderr=subprocess.STDOUT)))
        time.sleep(5)
        for n, p in list(running):
            if p.poll() is not None:
                running.remove((n, p))
                if p.returncode:
                    sys.exit(f"training {n} failed (exit {p.returncode}); see {Path(a.out) / n / 'train.log'}")


def run_dir(a, name: str) -> Path:
    """Where a recipe's run is: OUT/NAME, or the directory --runs gives for it."""
    return Path(a.runs_dirs[name]) if name in a.runs_dirs else Path(a.out) / name


def done_rows(path: Path) -> dict:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[(r["ckpt"], r["solver"], r["spacing"], r["nfe"])] = r
    return rows


def evaluate(a, names: list[str]) -> dict:
    path = Path(a.out) / "evals.jsonl"
    rows = done_rows(path)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.eval_threads)}
    groups = STOCHASTIC_10 + [c for cs in DETERMINISTIC.values() for c in cs]
    for n in names:
        for snap in sorted((run_dir(a, n) / "snapshots").glob("step_*")):
            if a.eval_steps and int(snap.name[5:]) not in {int(x) for x in a.eval_steps.split(",")}:
                continue
            for solver, spacing, nfe in groups:
                key = (str(snap), solver, spacing, nfe)
                if key in rows:
                    continue
                tmp = Path(a.out) / "eval_tmp.jsonl"
                tmp.unlink(missing_ok=True)
                subprocess.run([leandiff(), "eval", str(snap), "--solver", solver, "--spacing", spacing, "--nfe",
                                str(nfe), "-n", str(a.n), "--no-latency", "--out", str(tmp)], env=env, check=True,
                               stdout=subprocess.DEVNULL)
                r = json.loads(tmp.read_text().splitlines()[-1])
                meta = json.loads((snap / "leandiff.json").read_text())["train"]
                row = {"ckpt": str(snap), "recipe": n, "step": meta["completed_steps"],
                       "core_seconds": meta["cpu_seconds"], "wall_seconds": meta["wall_seconds"], "solver": solver, "spacing": spacing,
                       "nfe": nfe, "fid_dom": r["quality"]["fid_dom"]}
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows[key] = row
                print(f"{n} step {row['step']}: {solver}/{spacing}/{nfe} FID-dom {row['fid_dom']:.3f}", flush=True)
    return rows


def best(rows: list[dict], cands) -> dict | None:
    pick = [r for r in rows if (r["solver"], r["spacing"], r["nfe"]) in cands]
    return min(pick, key=lambda r: r["fid_dom"]) if pick else None


def table(rows: dict, names: list[str]) -> tuple[list[dict], str]:
    out = []
    for n in names:
        by_step: dict = {}
        for r in rows.values():
            if r["recipe"] == n:
                by_step.setdefault(r["step"], []).append(r)
        for step in sorted(by_step):
            rs = by_step[step]
            sde = best(rs, STOCHASTIC_10)
            ode = {k: best(rs, v) for k, v in DETERMINISTIC.items()}
            if sde is None or None in ode.values():
                continue
            out.append({"recipe": n, "step": step, "core_seconds": round(rs[0]["core_seconds"]),
                        "sde10": sde["fid_dom"], "sde10_solver": f"{sde['solver']}/{sde['spacing']}",
                        **{f"ode{k}": o["fid_dom"] for k, o in ode.items()},
                        **{f"ode{k}_solver": f"{o['solver']}/{o['spacing']}/{o['nfe']}" for k, o in ode.items()},
                        "ratio20": ode[20]["fid_dom"] / sde["fid_dom"], "ratio50": ode[50]["fid_dom"] / sde["fid_dom"]})
    md = ["| recipe | steps | core-s | best SDE 10 NFE | best ODE ≤20 NFE | best ODE ≤50 NFE | ODE20/SDE | ODE50/SDE |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out:
        md.append(f"| {r['recipe']} | {r['step']} | {r['core_seconds']} | {r['sde10']:.3f} ({r['sde10_solver']}) | "
                  f"{r['ode20']:.3f} ({r['ode20_solver']}) | {r['ode50']:.3f} ({r['ode50_solver']}) | "
                  f"{r['ratio20']:.2f} | {r['ratio50']:.2f} |")
    return out, "\n".join(md)


def plot(out: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("sde10", "ode50", "ratio50"),
                              ("best SDE, 10 NFE", "best ODE, ≤ 50 NFE", "ODE-50 / SDE-10")):
        for n in names:
            rs = [r for r in out if r["recipe"] == n]
            ax.plot([r["core_seconds"] for r in rs], [r[key] for r in rs], marker="o", label=n)
        ax.set_xlabel("training core-seconds")
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].set_ylabel("FID-dom (N = samples per row)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/recipes")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--snapshot-every", type=int, default=500)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--parallel", type=int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=512, help="samples per FID-dom row")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the snapshots there are; train nothing")
    ap.add_argument("--full", action="store_true", help="more solvers per column (more evaluations)")
    ap.add_argument("--eval-steps", default="", help="evaluate only the snapshots at these steps, e.g. 1000,1500")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (goes into the results)")
    ap.add_argument("--runs", default="", help="NAME=DIR,...: evaluate the snapshots of runs trained elsewhere "
                    "(e.g. the shipped bases' leandiff train runs) instead of the recipes; implies --eval-only")
    ap.add_argument("--results", default="recipes", help="name of the results files in benchmarks/results")
    a = ap.parse_args()
    a.runs_dirs = dict(x.split("=", 1) for x in a.runs.split(",") if x.strip())
    if a.full:
        STOCHASTIC_10.extend(FULL["sde"])
        for k in DETERMINISTIC:
            DETERMINISTIC[k].extend(FULL[k])
    names = list(a.runs_dirs) or [n.strip() for n in a.recipes.split(",") if n.strip()]
    a.eval_only = a.eval_only or bool(a.runs_dirs)
    unknown = [n for n in names if n not in RECIPES and n not in a.runs_dirs]
    if unknown:
        sys.exit(f"unknown recipe {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    if not a.eval_only:
        train_all(a, names)
    if a.train_only:
        return
    rows = evaluate(a, names)
    out, md = table(rows, names)
    print(md)
    png = f"{a.results}_time_to_quality.png"
    plot(out, names, RESULTS / png)
    if a.runs_dirs:  # runs trained by their own commands: each records its recipe in its checkpoint
        recipes = {n: json.loads((run_dir(a, n) / "leandiff.json").read_text())["train"] for n in names}
        head = (f"# Time to quality of training runs\n\nFID-dom at N = {a.n} of each snapshot's EMA, best of the "
                f"listed solvers; the runs' own settings are in the JSON (`recipes`).\n\n![curves]({png})\n\n")
    else:
        recipes = {n: COMMON + RECIPES[n] for n in names}
        head = (f"# Time to quality: training recipes at the same budget\n\nmnist-tiny on MNIST, batch 128, bf16, "
                f"EMA 0.995, {a.steps} steps (cosine LR), one thread per training run; FID-dom at N = {a.n} of the "
                f"snapshot's EMA, best of the listed solvers.\n\n![curves]({png})\n\n")
    write_results(a.results, {"rows": out, "n": a.n, "steps": a.steps, "note": a.note, "recipes": recipes},
                  head + md + (f"\n\n{a.note}\n" if a.note else ""))


if __name__ == "__main__":
    main()
