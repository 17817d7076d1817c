"""DMD generators of one teacher side by side: variants (the weight of the regression anchor, the
distribution-matching term on or off, the budget, one step or DMD2's several), each at N samples through
the one harness, with its updates, training core-seconds and recipe.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dmd.py --teacher zoo:mnist-tiny-v2 \\
        --student "dmd 2k=runs/dmd-v2r" --student "regression only=runs/dmd-v2reg" --out runs/bench/dmd

``--student LABEL=DIR``: a ``leandiff compress --recipe "dmd(...)"`` output, or a step's ``student`` directory
left by a run that was stopped (``OUT/.steps/00-dmd/student``: its last saved weights, at the update count
it records; the recipe is read from the step's ``started.json``). Each is sampled by its recorded sampler:
a one-step generator by one trailing DDIM step (its x̂₀ at T−1), a K-step one (``dmd(nfe=K)``) by
consistency sampling over its K trailing timesteps, and with ``--nfe 1,2,4`` also at each listed NFE below
its own (consistency sampling over that many trailing timesteps). A generator continued from an earlier
one (``dmd(teacher=...)`` on a student) shows its updates as earlier + its own; its core-seconds are its
own run's. Rows resume from OUT/rows.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import resumable_rows, write_results  # noqa: E402
from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.errors import UserError  # noqa: E402
from leandiff.recipe import parse_recipe  # noqa: E402
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint, load_classifier  # noqa: E402
from bench_fewstep import card_row  # noqa: E402


def recipe_and_updates(path: Path, ck) -> tuple[str, str, float | None]:
    """(the dmd recipe, updates done ("earlier+own" for a continued generator), training core-seconds) of a finished student or a stopped run's one."""
    train = ck.meta.get("train") or {}
    steps = [st for st in ck.lineage if st.get("step") == "dmd"]
    started = path.parent / "started.json"
    if started.is_file() and path.name == "student":  # a stopped run's student directory: the step records the recipe
        recipe = json.loads(started.read_text())["recipe"][-1]
        steps.append({})
    elif steps:
        recipe = steps[-1].get("recipe")
    else:
        raise UserError(f"{path}: neither a dmd student nor a dmd step's student directory")
    earlier = [int(st.get("args", {}).get("steps", 0)) for st in steps[:-1]]  # generators it was continued from
    own = int(train.get("completed_steps") or train.get("steps") or 0)
    return recipe, "+".join(str(u) for u in earlier + [own]), train.get("cpu_seconds")


def pairs_seconds(path: Path) -> float | None:
    """Seconds the run spent making its teacher pairs (recorded in the pairs file), if the file is there."""
    from safetensors import safe_open

    for f in (path / ".steps" / "00-dmd" / "pairs.safetensors", path.parent / "pairs.safetensors"):
        if f.is_file():
            with safe_open(str(f), framework="pt") as h:
                return float((h.metadata() or {}).get("seconds", "nan"))
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="zoo:mnist-tiny-v2")
    ap.add_argument("--student", action="append", default=[], help="LABEL=DIR; repeatable")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/dmd"))
    ap.add_argument("-n", type=int, default=2048)
    ap.add_argument("--results-name", default="dmd")
    ap.add_argument("--nfe", default="", help="comma-separated NFEs to sample each student at, up to its own "
                    "(default: its own)")
    a = ap.parse_args(argv)
    if not a.student:
        raise UserError("give at least one --student LABEL=DIR")
    rows_path, done = resumable_rows(a.out)
    teacher = load_checkpoint(a.teacher)
    clf = load_classifier(teacher.meta.get("dataset") or "mnist")
    ddpm = card_row(a.teacher, "ddpm-1000")
    lines = [f"# DMD generators of `{a.teacher}`: variants", "",
             f"FID-dom at N={a.n}, seed 0. A one-step generator: one trailing DDIM step (x̂₀ at T−1); a K-step "
             "one: consistency sampling over K (or the row's NFE) trailing timesteps. The teacher's DDPM-1000: "
             + (f"{ddpm['fid_dom']:.3f} (N={ddpm['n']}, its card)" if ddpm else "not on its card")
             + ". Core-seconds: the training loop; the teacher pairs, made once per run (one thread), are the "
             "'pairs s' column (a run started from a copy of another run's pairs file shows that run's time).", "",
             "| student | NFE | updates | FID-dom | ÷ DDPM-1000 | precision | recall | core-s | pairs s | recipe |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rec = {"teacher": a.teacher, "n": a.n, "ddpm1000_card": ddpm, "students": {}}
    for spec in a.student:
        label, eq, path = spec.rpartition("=")  # a label may hold "="
        if not eq:
            raise UserError(f"--student {spec!r}: expected LABEL=DIR")
        ck = load_checkpoint(path)
        recipe, updates, cost = recipe_and_updates(Path(path), ck)
        own_nfe = parse_recipe(recipe)[-1].args["nfe"]  # a stopped run's student does not record its sampler yet
        wanted = sorted({int(v) for v in a.nfe.split(",") if v.strip()} | {own_nfe}) if a.nfe else [own_nfe]
        for nfe in [v for v in wanted if v <= own_nfe]:
            key = label if nfe == own_nfe == 1 else f"{label} · {nfe} NFE"  # one-step rows keep their cache key
            if key not in done:
                cfg = EvalConfig(solver="consistency" if own_nfe > 1 else "ddim", nfe=nfe, n=a.n, seed=0,
                                 batch_size=512, spacing="trailing", latency=None, inception=False)
                row = evaluate_checkpoint(ck, cfg, classifier=clf, log=lambda s: None)
                row.update({"bench_name": key})
                append_row(rows_path, row)
                done[key] = row
            q = done[key]["quality"]
            ratio = q["fid_dom"] / ddpm["fid_dom"] if ddpm else None
            rec["students"][key] = {"path": Path(path).as_posix(), "recipe": recipe, "nfe": nfe, "updates": updates,
                                    "core_seconds": cost, "pairs_seconds": pairs_seconds(Path(path)),
                                    "fid_dom": q["fid_dom"], "over_ddpm1000": ratio,
                                    "precision": q.get("precision"), "recall": q.get("recall")}
            r = rec["students"][key]
            ps = r["pairs_seconds"]
            lines.append(f"| {label} | {nfe} | {updates} | {q['fid_dom']:.3f} | {'—' if ratio is None else f'{ratio:.2f}×'} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {'—' if cost is None else f'{cost:.0f}'} | "
                         f"{'—' if ps is None else f'{ps:.0f}'} | `{recipe}` |")
            print(lines[-1], flush=True)
    write_results(a.results_name, rec, "\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"bench_dmd: {e}")
