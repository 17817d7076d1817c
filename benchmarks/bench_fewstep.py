"""Few-step students against their teacher (the shape of the PD report's Table 1): progressive-distillation
and consistency-distillation students of one base at 1, 2, 4 and 8 NFE, beside the teacher's DDIM and its
best solver at the same NFE, with the teacher's 1000-step DDPM row from its model card and each student's
training cost in core-seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fewstep.py --teacher zoo:mnist-tiny-v2 \\
        --pd runs/pd-v2 --cd runs/cd-v2 --out runs/bench/fewstep

``--pd DIR``: the output directory of ``leandiff compress ... --recipe "pd(...)"`` (its rounds are read from
DIR/.steps/00-pd/round-<K>, each the student at K DDIM steps, sampled with the sampler it records), or one
PD student checkpoint (e.g. ``zoo:mnist-tiny-v2-pd4``); repeat it for a chain continued from a student
(``pd(from=4,to=1)`` on the 4-step one). A student's training cost is the sum of the rounds' core-seconds
from 2×K down to K that the students' checkpoints record (each PD student records every round before it).
``--earlier FILE``: a previous results JSON of this benchmark; a student cell this run has no checkpoint
for is taken from it, marked † and footnoted with that run's command; so is an earlier DMD cell better than
every DMD student given here (the DMD cell is the best student, named).
``--cd DIR``: a ``cd(...)`` student, sampled by the ``consistency`` solver at each NFE (multistep consistency
sampling, Song et al. 2023, Alg. 1). ``--dmd DIR`` (repeatable): a ``dmd(...)`` generator, at its own NFE K
(its recorded sampler: one trailing DDIM step when K = 1) and, when K > 1, at each table NFE below K
(consistency sampling over that many trailing timesteps); the DMD cell of a row is the best of them, named.
A generator continued from another one given here (``dmd(teacher=...)`` on it) costs its own core-seconds
plus that one's. Every row is one harness row (N, seed 0), appended to OUT/rows.jsonl
as soon as it is done; a rerun skips done rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import resumable_rows, write_results  # noqa: E402
from leandiff.checkpoint import load_checkpoint, resolve, weights_hash  # noqa: E402
from leandiff.errors import UserError  # noqa: E402
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint, load_classifier  # noqa: E402

NFES = (8, 4, 2, 1)
# the teacher's solvers at each NFE; "best" is the lowest FID-dom among them (DDIM is also its own column)
# (the teacher's card: on this cosine-schedule base trailing beats logsnr spacing at 20 NFE for DPM-Solver++ 2M)
TEACHER = [("ddim", "trailing"), ("dpmpp-2m", "trailing"), ("dpmpp-3m-sde", "trailing")]


def card_row(teacher: str, name: str) -> dict | None:
    card = resolve(teacher) / "card.json"
    if not card.is_file():
        return None
    d = json.loads(card.read_text())
    q = d.get("quality", {}).get(name)
    return {"fid_dom": q["fid_dom"], "n": d["n"]} if q else None


def dmd_student(path: Path, ck) -> tuple[str, dict, str | None]:
    """(its name, its sampler, the recipe of a stopped run) of a ``--dmd`` checkpoint: a finished student records
    its sampler; a stopped run's ``OUT/.steps/<i>-dmd/student`` does not yet (it still carries its start's), so
    it comes from the step's recipe (one trailing DDIM step for nfe=1, else consistency sampling over nfe
    trailing timesteps) and the row is named after the run directory."""
    if (ck.meta.get("distill") or {}).get("method") == "dmd":
        return path.name, ck.meta["sampler"], None
    started = path.parent / "started.json"
    if path.name != "student" or not started.is_file():
        raise UserError(f"{path}: neither a dmd student nor a dmd step's student directory")
    from leandiff.recipe import parse_recipe

    recipe = json.loads(started.read_text())["recipe"][-1]
    nfe = parse_recipe(recipe)[-1].args["nfe"]
    sampler = {"solver": "ddim" if nfe == 1 else "consistency", "nfe": nfe, "spacing": "trailing"}
    return f"{path.parent.parent.parent.name} (stopped)", sampler, recipe


def pd_rounds(pd_dir: Path) -> dict[int, Path]:
    root = pd_dir / ".steps" / "00-pd"
    return {int(p.name.split("-")[1]): p for p in sorted(root.glob("round-*")) if (p / "leandiff.json").is_file()}


def cpu_seconds(ck) -> float | None:
    return (ck.meta.get("train") or {}).get("cpu_seconds")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="zoo:mnist-tiny-v2")
    ap.add_argument("--pd", action="append", default=[], help="a pd(...) recipe's output directory or a PD student "
                    "checkpoint; repeatable (a chain continued from a student)")
    ap.add_argument("--earlier", type=Path, default=None, help="a previous results JSON of this benchmark: the "
                    "student cells this run cannot measure, marked †")
    ap.add_argument("--cd", type=Path, default=None, help="a cd(...) student")
    ap.add_argument("--dmd", type=Path, action="append", default=[], help="a dmd(...) student; repeatable")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/fewstep"))
    ap.add_argument("-n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--results-name", default="fewstep")
    a = ap.parse_args(argv)
    rows_path, done = resumable_rows(a.out)
    teacher = load_checkpoint(a.teacher)
    clf = load_classifier(teacher.meta.get("dataset") or "mnist")

    def run(name: str, ck, solver: str, nfe: int, spacing: str, extra: dict | None = None) -> dict:
        if name in done:
            return done[name]
        cfg = EvalConfig(solver=solver, nfe=nfe, n=a.n, seed=0, batch_size=a.batch_size, spacing=spacing,
                         latency=None, inception=False)
        t0 = time.perf_counter()
        row = evaluate_checkpoint(ck, cfg, classifier=clf, log=lambda s: None)
        row.update({"bench_name": name, "wall_seconds": time.perf_counter() - t0, **(extra or {})})
        append_row(rows_path, row)
        done[name] = row
        print(f"{name:36s} FID-dom {row['quality']['fid_dom']:8.3f}  ({row['wall_seconds']:.0f} s)", flush=True)
        return row

    for k in NFES:
        for solver, spacing in TEACHER:
            if k == 1 and solver != "ddim":
                continue  # one step: every solver here is DDIM's step (an SDE's last step adds no noise)
            run(f"teacher {solver}-{k} {spacing}", teacher, solver, k, spacing)
    students = {}
    pd_cks, round_cost = {}, {}
    for src in a.pd:
        if Path(src).is_dir() and (Path(src) / ".steps").is_dir():
            rounds = pd_rounds(Path(src))
            if not rounds:
                raise UserError(f"{src}: no finished PD round under .steps/00-pd/")
            pd_cks.update({k: load_checkpoint(p) for k, p in rounds.items()})
        else:
            ck = load_checkpoint(src)
            if "distill" not in ck.meta or "sampler" not in ck.meta:
                raise UserError(f"{src}: not a PD student (no distill record in its metadata)")
            pd_cks[ck.meta["sampler"]["nfe"]] = ck
    for k, ck in pd_cks.items():  # every round a student's record names, and the student's own training
        round_cost.update({r["nfe"]: r.get("cpu_seconds") or 0.0 for r in ck.meta["distill"]["rounds"]})
        round_cost.setdefault(k, cpu_seconds(ck) or 0.0)
    for k in sorted(pd_cks, reverse=True):  # the chain: each round starts from the one before
        ck, s = pd_cks[k], pd_cks[k].meta["sampler"]
        if k in NFES:
            cum = sum(c for n, c in round_cost.items() if n >= k)
            students[("pd", k)] = run(f"pd-{k}", ck, s["solver"], s["nfe"], s["spacing"],
                                      {"train_core_seconds_cumulative": cum})
    if a.cd:
        ck = load_checkpoint(a.cd)
        cost = (ck.meta.get("distill") or {}).get("train_cpu_seconds") or cpu_seconds(ck)
        for k in NFES:
            students[("cd", k)] = run(f"cd-{k}", ck, "consistency", k, "trailing", {"train_core_seconds": cost})
    dmd_cks = [(path, load_checkpoint(path)) for path in a.dmd]
    own = {weights_hash(ck.net.state_dict()): ((ck.meta.get("distill") or {}).get("train_cpu_seconds") or cpu_seconds(ck) or 0.0,
                                        [st.get("parent") for st in ck.lineage if st.get("step") == "dmd"][-1:])
           for _, ck in dmd_cks}

    def dmd_cost(sha) -> float:  # its own run plus the generator it was continued from, when that is given too
        c, parent = own[sha]
        return c + (dmd_cost(parent[0]) if parent and parent[0] in own and parent[0] != sha else 0.0)

    for path, ck in dmd_cks:
        name, s, _ = dmd_student(path, ck)
        cost = dmd_cost(weights_hash(ck.net.state_dict()))
        for k in [k for k in NFES if k <= s["nfe"]]:
            row = run(f"dmd {name} @{k}", ck, s["solver"], k,
                      s["spacing"], {"train_core_seconds": cost, "student": name})
            if ("dmd", k) not in students or row["quality"]["fid_dom"] < students[("dmd", k)]["quality"]["fid_dom"]:
                students[("dmd", k)] = row

    ddpm = card_row(a.teacher, "ddpm-1000")
    fid = lambda name: done[name]["quality"]["fid_dom"] if name in done else None  # noqa: E731
    f = lambda v, fmt="{:.3f}": "—" if v is None else fmt.format(v)  # noqa: E731
    lines = [f"# Few-step students of `{a.teacher}` (the shape of the PD report's Table 1)", "",
             f"FID-dom at N={a.n}, seed 0, one harness (same classifier and reference split). The teacher's "
             f"DDPM-1000: " + (f"**{ddpm['fid_dom']:.3f}** (N={ddpm['n']}, its model card)" if ddpm else "not on its card") + ".",
             "Teacher solvers at each NFE: " + ", ".join(f"{s} {sp}" for s, sp in TEACHER) + " (1 NFE: DDIM only); "
             "'best' is the lowest of them. Students sample with their own recorded sampler (PD: DDIM trailing at "
             "its K; CD: multistep consistency sampling at K; DMD: its one step, or consistency sampling over K trailing timesteps for a K-step one). Training cost: CPU core-seconds of the training loop "
             "(PD cumulative over the rounds down to K; the teacher's own training not included).", "",
             "| NFE | teacher DDIM | teacher best (solver) | PD student | PD ÷ DDPM-1000 | PD core-s (cum.) | "
             "CD student | CD ÷ DDPM-1000 | CD core-s | DMD student | DMD ÷ DDPM-1000 | DMD core-s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rec = {"teacher": a.teacher, "n": a.n, "ddpm1000_card": ddpm, "nfe": {}}
    earlier = json.loads(a.earlier.read_text()) if a.earlier else None
    if earlier and (earlier.get("teacher"), earlier.get("n")) != (a.teacher, a.n):
        raise UserError(f"{a.earlier}: an earlier run of another teacher or N, not comparable")
    ref = ddpm["fid_dom"] if ddpm else None
    for k in NFES:
        cands = [(fid(f"teacher {s}-{k} {sp}"), f"{s} {sp}") for s, sp in TEACHER]
        cands = [c for c in cands if c[0] is not None]
        best = min(cands) if cands else (None, "—")
        pd_row, cd_row, dmd_row = students.get(("pd", k)), students.get(("cd", k)), students.get(("dmd", k))
        dmd_f = dmd_row["quality"]["fid_dom"] if dmd_row else None
        dmd_who = f" ({dmd_row['student']})" if dmd_row and len(dmd_cks) > 1 else ""
        dmd_c = dmd_row.get("train_core_seconds") if dmd_row else None
        pd_f = pd_row["quality"]["fid_dom"] if pd_row else None
        cd_f = cd_row["quality"]["fid_dom"] if cd_row else None
        pd_c = pd_row.get("train_core_seconds_cumulative") if pd_row else None
        cd_c = cd_row.get("train_core_seconds") if cd_row else None
        old = (earlier or {}).get("nfe", {}).get(str(k), {})
        mark = {"pd": "", "cd": "", "dmd": ""}
        if pd_f is None and old.get("pd") is not None:
            pd_f, pd_c, mark["pd"] = old["pd"], old.get("pd_core_seconds_cumulative"), " †"
        if cd_f is None and old.get("cd") is not None:
            cd_f, cd_c, mark["cd"] = old["cd"], old.get("cd_core_seconds"), " †"
        if old.get("dmd") is not None and (dmd_f is None or old["dmd"] < dmd_f):  # the DMD cell is the best student
            dmd_f, dmd_c, mark["dmd"] = old["dmd"], old.get("dmd_core_seconds"), " †"
            dmd_row = {"student": old.get("dmd_student")}
            dmd_who = f" ({old['dmd_student']})" if old.get("dmd_student") else ""
        rec["nfe"][k] = {"teacher_ddim": fid(f"teacher ddim-{k} trailing"), "teacher_best": best[0],
                         "teacher_best_solver": best[1], "pd": pd_f, "cd": cd_f, "pd_core_seconds_cumulative": pd_c,
                         "cd_core_seconds": cd_c, "dmd": dmd_f, "dmd_core_seconds": dmd_c,
                         "dmd_student": dmd_row.get("student") if dmd_row else None,
                         "dmd_over_ddpm1000": dmd_f / ref if dmd_f and ref else None,
                         "pd_over_ddpm1000": pd_f / ref if pd_f and ref else None,
                         "cd_over_ddpm1000": cd_f / ref if cd_f and ref else None,
                         "from_earlier_run": [m for m, v in mark.items() if v]}
        r = rec["nfe"][k]
        lines.append(f"| {k} | {f(r['teacher_ddim'])} | {f(best[0])} ({best[1]}) | {f(pd_f)}{mark['pd']} | "
                     f"{f(r['pd_over_ddpm1000'], '{:.2f}×')} | {f(pd_c, '{:.0f}')} | {f(cd_f)}{mark['cd']} | "
                     f"{f(r['cd_over_ddpm1000'], '{:.2f}×')} | {f(cd_c, '{:.0f}')} | {f(dmd_f)}{mark['dmd']}{dmd_who} | "
                     f"{f(r['dmd_over_ddpm1000'], '{:.2f}×')} | {f(dmd_c, '{:.0f}')} |")
    if ref:
        lines += ["", f"Targets (≤ 1.15× DDPM-1000 at 4 NFE = {1.15 * ref:.3f}; ≤ 2× at 1 NFE = {2 * ref:.3f}):"]
        for method in ("pd", "cd", "dmd"):
            got = {k: rec["nfe"][k][method] for k in (4, 1)}
            if any(v is not None for v in got.values()):
                lines.append(f"- {method.upper()}: 4 NFE {f(got[4])} "
                             f"({'met' if got[4] is not None and got[4] <= 1.15 * ref else 'not met'}), "
                             f"1 NFE {f(got[1])} ({'met' if got[1] is not None and got[1] <= 2 * ref else 'not met'}).")
    lines.append("")
    for k in sorted(pd_cks, reverse=True):  # each PD student by the steps that made it, from the teacher on
        chain = " > ".join(st["recipe"] for st in pd_cks[k].lineage if st.get("step") == "pd" and st.get("recipe"))
        lines.append(f"- PD student at {k} steps: `{chain}` on `{a.teacher}`")
    if a.cd and (a.cd / "leandiff.json").is_file():
        ck = load_checkpoint(a.cd)
        recipe = next((st.get("recipe") for st in reversed(ck.lineage) if st.get("recipe")), None)
        lines.append(f"- CD student made by `leandiff compress {a.teacher} --recipe \"{recipe}\" --out {a.cd.name}`")
    for path, ck in dmd_cks:  # each DMD student by the dmd steps that made it, from the teacher on
        name, s, stopped = dmd_student(path, ck)
        chain = " > ".join(f"`{st['recipe']}`" for st in ck.lineage if st.get("step") == "dmd" and st.get("recipe"))
        if stopped:
            upd = (ck.meta.get("train") or {}).get("completed_steps")
            chain = " > ".join(c for c in (chain, f"`{stopped}` stopped at {upd} updates (its last saved weights)") if c)
        lines.append(f"- DMD student {name} ({s['nfe']}-step): {chain} on `{a.teacher}` "
                     "(each step on the one before's output)")
    if earlier and any(r["from_earlier_run"] for r in rec["nfe"].values()):
        lines.append(f"- † not re-measured here (that student's checkpoint was not kept, or for DMD: better than "
                     f"every DMD student measured here): from the earlier run "
                     f"`{earlier['command']}` ({a.earlier.name}), the same teacher, N and harness")
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(a.results_name, rec, md)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"bench_fewstep: {e}")
