"""FID-dom and KID versus NFE for every registered solver and two diffusers peers, on one checkpoint
(issue 4's benchmark). Same N, seeds and x_T for every row; each row is one ``leandiff eval`` row
(leandiff.evaluate.evaluate_checkpoint) with its wall time, appended to OUT/rows.jsonl as soon as it is
done, so a killed run resumes where it stopped. Then OUT/index.html (leandiff report: table, FID-vs-NFE
curves, FID-vs-time front) and OUT/summary.md (winner per NFE, ratio to the 1000-step DDPM row, and
whether AMS beats its plain sampler).

    .venv/bin/python benchmarks/bench_solvers.py --ckpt runs/mnist-tiny --n 2048 --out runs/bench/solvers

NFE above ``--max-nfe-all`` (default 100) is run only for the references (ddpm, ddim): 1000-step rows
for every solver would cost 10× the rest of the grid together. A solver that spends k evaluations per
step gets the smallest multiple of k ≥ the NFE asked for (heun then spends 2·steps − 1); the table
reports the NFE actually spent.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from leandiff.errors import UserError
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint, load_classifier, read_rows, reference_stats
from leandiff.solvers import SOLVERS, nfe_per_step

PEERS = ["diffusers:DPMSolverMultistepScheduler", "diffusers:UniPCMultistepScheduler"]
REFERENCES = ("ddpm", "ddim")


def requested(solver: str, nfe: int) -> int:
    """The NFE to ask ``solver`` for: the smallest multiple of its evaluations per step ≥ ``nfe``."""
    per = nfe_per_step(solver)
    return -(-nfe // per) * per


def grid(solvers, nfes, max_nfe_all, references=REFERENCES):
    for nfe in nfes:
        for solver in solvers:
            if nfe <= max_nfe_all or solver in references:
                yield solver, requested(solver, nfe)


def summary(rows: list[dict], nfes) -> str:
    """Markdown: the best solver per NFE by FID-dom, and AMS versus its plain sampler."""
    q = {(r["protocol"]["solver"], r["protocol"]["nfe"]): r for r in rows}
    at = lambda s, nfe: q.get((s, requested(s, nfe)))  # noqa: E731
    ref = q.get(("ddpm", 1000))
    ref_fid = ref["quality"]["fid_dom"] if ref else float("nan")
    lines = ["| NFE asked | best solver | NFE spent | FID-dom | ÷ DDPM-1000 | KID×1e3 | s/image |",
             "|---|---|---|---|---|---|---|"]
    for nfe in nfes:
        cand = [r for r in (at(s, nfe) for s in {k[0] for k in q}) if r is not None]
        if cand:
            best = min(cand, key=lambda r: r["quality"]["fid_dom"])
            f = best["quality"]["fid_dom"]
            lines.append(f"| {nfe} | {best['protocol']['solver']} | {best['protocol']['nfe_used']:g} | {f:.3f} | "
                         f"{f / ref_fid:.3f} | {best['quality']['kid'] * 1e3:.3f} | "
                         f"{best['cost']['sampling_seconds'] / best['protocol']['n']:.4f} |")
    lines += ["", "| NFE | ams-ddim ÷ ddim | ams-ddpm ÷ ddpm |", "|---|---|---|"]
    for nfe in nfes:
        def ratio(a, b):
            ra, rb = at(a, nfe), at(b, nfe)
            return f"{ra['quality']['fid_dom'] / rb['quality']['fid_dom']:.3f}" if ra and rb else "–"
        if at("ams-ddim", nfe) or at("ams-ddpm", nfe):
            lines.append(f"| {nfe} | {ratio('ams-ddim', 'ddim')} | {ratio('ams-ddpm', 'ddpm')} |")
    return "\n".join(lines) + "\n\nFID-dom ratios; below 1 AMS is better than its plain sampler.\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/mnist-tiny")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100, 1000])
    p.add_argument("--max-nfe-all", type=int, default=100, help="larger NFE only for ddpm and ddim")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS) + PEERS)
    p.add_argument("--refs", nargs="+", default=list(REFERENCES), help="solvers run above --max-nfe-all")
    p.add_argument("--spacing", default="trailing", help="timestep spacing for every solver ...")
    p.add_argument("--spacing-for", nargs="*", default=[], metavar="SOLVER=SPACING", help="... unless named here")
    p.add_argument("--out", default="runs/bench/solvers")
    p.add_argument("--merge", default="",
                   help="a committed results JSON of an earlier run (same checkpoint weights, N and seed) whose rows "
                        "join the summary and table (not the HTML report); rows run now win")
    p.add_argument("--results-name", default="solvers",
                   help="benchmarks/results/NAME.{json,md} (and NAME_fid_vs_nfe.png) to write")
    args = p.parse_args()
    try:
        spacing_for = dict(kv.split("=", 1) for kv in args.spacing_for)
    except ValueError:
        raise SystemExit(f"--spacing-for takes SOLVER=SPACING, got {args.spacing_for}") from None

    out = Path(args.out)
    rows_path = out / "rows.jsonl"
    rows = read_rows([rows_path]) if rows_path.is_file() else []
    done = {(r["protocol"]["solver"], r["protocol"]["nfe"], r["protocol"]["spacing"], r["protocol"]["n"],
             r["protocol"]["seed"]) for r in rows}
    from leandiff.checkpoint import load_checkpoint
    from leandiff.evaluate.harness import resolve_dataset

    ck = load_checkpoint(args.ckpt)
    clf = load_classifier(resolve_dataset(ck, None))
    ref = reference_stats(clf, resolve_dataset(ck, None))
    for solver, nfe in grid(args.solvers, args.nfe, args.max_nfe_all, args.refs):
        spacing = spacing_for.get(solver, args.spacing)
        if (solver, nfe, spacing, args.n, args.seed) in done:
            continue
        cfg = EvalConfig(solver=solver, nfe=nfe, n=args.n, seed=args.seed, spacing=spacing, latency=None,
                         inception=False, mse_n=256, grid_n=64)
        t0 = time.perf_counter()
        try:
            row = evaluate_checkpoint(ck, cfg, classifier=clf, reference=ref,
                                      grid_path=out / "grids" / f"{solver.replace(':', '_')}-{nfe}.png")
        except UserError as e:
            print(f"{solver} NFE {nfe}: skipped ({e})")
            continue
        append_row(rows_path, row)
        rows.append(row)
        print(f"{solver:40s} NFE {row['protocol']['nfe_used']:5g}  FID-dom {row['quality']['fid_dom']:8.3f}  "
              f"KID×1e3 {row['quality']['kid'] * 1e3:7.3f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    from leandiff.evaluate import write_report

    write_report(rows, out, title=f"Solvers on {args.ckpt}")
    rows = rows + earlier_rows(args, ck, rows)
    text = summary(rows, args.nfe)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"-> {out / 'index.html'}, {out / 'summary.md'}")
    publish(rows, ck, args, out, text)


def earlier_rows(args, ck, rows: list[dict]) -> list[dict]:
    """The rows of ``--merge`` (a results JSON written by :func:`publish`, or a JSONL of harness rows such as
    a model card's ``card_rows.jsonl``) in the harness's row shape,
    minus those run now (same solver, NFE and spacing); refused unless weights, N and seed agree, so every row
    shares one protocol."""
    if not args.merge:
        return []
    import json

    now = {_key(r["protocol"]) for r in rows}
    if args.merge.endswith(".jsonl"):  # harness rows (e.g. a model card's card_rows.jsonl): same weights, N, seed
        prev_rows = read_rows([Path(args.merge)])
        bad = [r for r in prev_rows if (r.get("weights"), r["protocol"]["n"], r["protocol"]["seed"])
               != (ck.hash(), args.n, args.seed)]
        if bad:
            raise SystemExit(f"--merge {args.merge}: {len(bad)} row(s) with other weights/N/seed than this run's")
        return [{**r, "merged_from": args.merge} for r in prev_rows if _key(r["protocol"]) not in now]
    prev = json.loads(Path(args.merge).read_text())
    if (prev["weights"], prev["n"], prev["seed"]) != (ck.hash(), args.n, args.seed):
        raise SystemExit(f"--merge {args.merge}: weights/N/seed {prev['weights']}/{prev['n']}/{prev['seed']} "
                         f"differ from this run's {ck.hash()}/{args.n}/{args.seed}")
    return [{"protocol": {"solver": c["solver"], "nfe": c["nfe"], "nfe_used": c["nfe_used"], "spacing": c["spacing"],
                          "n": prev["n"], "seed": prev["seed"]},
             "quality": {k: c[k] for k in ("fid_dom", "kid", "kid_std", "precision", "recall")},
             "cost": {"sampling_seconds": c["sampling_seconds"]}, "merged_from": args.merge}
            for c in prev["rows"] if _key(c) not in now]


def _key(row: dict) -> tuple:
    """What makes two rows the same measurement: solver, NFE asked and timestep spacing."""
    return row["solver"], row["nfe"], row.get("spacing")


def publish(rows, ck, args, out: Path, text: str) -> None:
    """benchmarks/results/solvers.{json,md} and the FID-vs-NFE plot, for the commit."""
    from _common import RESULTS, write_results

    keep = sorted((r for r in rows if r["protocol"]["n"] == args.n and r["protocol"]["seed"] == args.seed),
                  key=lambda r: (r["protocol"]["nfe"], r["protocol"]["solver"], r["protocol"]["spacing"]))
    compact = [{"solver": r["protocol"]["solver"], "nfe": r["protocol"]["nfe"], "nfe_used": r["protocol"]["nfe_used"],
                "spacing": r["protocol"]["spacing"], "fid_dom": r["quality"]["fid_dom"], "kid": r["quality"]["kid"],
                "kid_std": r["quality"]["kid_std"], "precision": r["quality"]["precision"],
                "recall": r["quality"]["recall"], "sampling_seconds": r["cost"]["sampling_seconds"]} for r in keep]
    for c, r in zip(compact, keep):
        c["run"] = "earlier" if "merged_from" in r else "this"
    table = ["| solver | NFE | spacing | FID-dom | KID×1e3 | precision | recall | sampling s | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {c['solver']} | {c['nfe_used']:g} | {c['spacing']} | {c['fid_dom']:.3f} | {c['kid'] * 1e3:.1f} | "
              f"{c['precision']:.3f} | {c['recall']:.3f} | {c['sampling_seconds']:.1f} | {c['run']} |" for c in compact]
    merged = (f" Rows marked \"earlier\" are the committed rows of `{args.merge}` (same weights, N and seed, "
              f"measured by the same harness in an earlier run); \"this\" rows were run by the command below. Sampling "
              f"seconds are wall times under the load each run saw (the machine was shared): compare them within a run."
              if args.merge else "")
    md = "\n".join([
        "# Solvers: FID-dom and KID against NFE", "",
        f"Checkpoint `{args.ckpt}` (weights {ck.hash()}), N = {args.n} samples per "
        f"row, seed {args.seed}, the same x_T for every row; FID-dom/KID on the shipped MNIST classifier against "
        f"the held-out split; x̂₀ clipped to [-1, 1]. NFE above {args.max_nfe_all} only for {', '.join(args.refs)}."
        + merged,
        "", "## Winner per NFE, AMS against its plain sampler", "", text, "", "## Every row", "", *table, "",
        f"![FID-dom against NFE]({args.results_name}_fid_vs_nfe.png)", ""])
    write_results(args.results_name, {"checkpoint": args.ckpt, "weights": ck.hash(), "n": args.n, "seed": args.seed,
                              "rows": compact}, md)
    plot_fid_vs_nfe(compact, RESULTS / f"{args.results_name}_fid_vs_nfe.png",
                    f"{args.ckpt}, N={args.n}, seed {args.seed}")


def plot_fid_vs_nfe(compact: list[dict], path: Path, title: str) -> None:
    """FID-dom against NFE spent, one line per solver and spacing (every row, merged ones included), log-log;
    the 1000-step DDPM row as a horizontal reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    ref = [c for c in compact if c["solver"] == "ddpm" and c["nfe"] == 1000]
    for solver, spacing in sorted({(c["solver"], c["spacing"]) for c in compact}):
        pts = sorted((c["nfe_used"], c["fid_dom"]) for c in compact
                     if (c["solver"], c["spacing"]) == (solver, spacing) and c["nfe"] <= 100)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{solver.replace('diffusers:', 'd:')} {spacing}")
    if ref:
        ax.axhline(ref[0]["fid_dom"], color="k", ls="--", lw=1, label="ddpm 1000 steps")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID-dom", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
