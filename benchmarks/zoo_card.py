"""Ship a trained checkpoint into the zoo with its model card.

    python benchmarks/zoo_card.py runs/mnist-tiny --name mnist-tiny --train-command "leandiff train ..." [-n 2048]
        [--rows ddim:50,ddpm:1000] [--reference ddpm-1000] [--default-max-nfe 20]

Copies the weights and metadata into leandiff/zoo/NAME/, evaluates the --rows (SOLVER:NFE[:SPACING[:RUNTIME]])
with the evaluation harness (N samples, seed 0), reads the real-vs-real floor from
benchmarks/results/metrics.json when present, and writes card.json, CARD.md and grid.png beside the
weights. The best row at <= --default-max-nfe NFE is recorded in the checkpoint as its default sampler
(meta["sampler"], what `leandiff sample`/`eval` use when the user names none). Resumable: finished rows
are kept in leandiff/zoo/NAME/card_rows.jsonl and skipped on a rerun; rows measured on other weights (a model
shipped again under its name) are moved aside, never reused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import RESULTS, command, machine
from leandiff.checkpoint import META_NAME, WEIGHTS_NAME, ZOO_DIR, load_checkpoint, save_checkpoint
from leandiff.evaluate.harness import EvalConfig, append_row, evaluate_checkpoint, read_rows
from leandiff.io import write_json, write_text


def floor_for(dataset: str, n: int) -> dict | None:
    """The real-vs-real floor for rows at N = n from the metrics benchmark: distinct unseen real images
    against the held-out reference, at n or, where the pool is smaller, at the largest N it allows
    (the floor's own "n" then differs from n); None when that benchmark has not been run."""
    p = RESULTS / "metrics.json"
    if not p.is_file():
        return None
    floors = json.loads(p.read_text()).get("results", {}).get(dataset, {}).get("floors", [])
    same = [f for f in floors if n in f.get("for_n", [f.get("n")]) and f.get("set", "").startswith("unseen")
            and not f.get("with_replacement")]
    return same[0] if same else None


def floor_line(floor: dict, rows_n: int, fid: float | None, what: str = "DDPM-1000") -> str:
    """The card's sentence on the floor: its N, that its images are distinct, and whether it is at the rows' N."""
    head = (f"Real-vs-real floor: FID-dom {floor['fid_dom']:.3f} at N={floor['n']} distinct unseen real images "
            f"(no replacement) against the held-out reference")
    if floor["n"] == rows_n:
        tail = ", the rows' N" + (f" ({what} is {fid / floor['fid_dom']:.2f}× the floor)." if fid else ".")
    else:
        tail = (f": the largest N this dataset allows, while the rows above are at N={rows_n}, so this is not an "
                f"equal-N comparison" + (f" ({what} {fid:.3f} is {fid / floor['fid_dom']:.2f}× it)." if fid else "."))
    return head + tail


def refresh_floor(name: str) -> None:
    """Rewrite a shipped card's floor fields and sentence from benchmarks/results/metrics.json, nothing else."""
    d = ZOO_DIR / name
    card = json.loads((d / "card.json").read_text())
    base = json.loads((ZOO_DIR / card["base"].removeprefix("zoo:") / "card.json").read_text()) if card.get("base") else card
    floor = floor_for(base["dataset"], card["n"])
    if floor is None:
        raise SystemExit(f"no distinct floor for {base['dataset']} at N={card['n']} in metrics.json")
    own = card["quality"].get("ddpm-1000", {}).get("fid_dom")
    card["real_vs_real_floor"] = floor
    if own is not None:
        card["ddpm1000_over_floor"] = own / floor["fid_dom"]
    card["floor_at_rows_n"] = floor["n"] == card["n"]
    write_json(d / "card.json", card)
    lines = [ln for ln in (d / "CARD.md").read_text().splitlines() if not ln.startswith("Real-vs-real floor")]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("!["))
    what, fid = ("DDPM-1000", own) if own is not None else next(
        (k, v["fid_dom"]) for k, v in card["quality"].items())
    lines[at:at] = [floor_line(floor, card["n"], fid, what), ""]
    text = "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
    write_text(d / "CARD.md", text)
    print(f"{name}: " + floor_line(floor, card["n"], fid, what))


def portable(row: dict) -> dict:
    """A row as the card ships it: no path of the machine that measured it (grid by file name only)."""
    row = {k: v for k, v in row.items() if k != "_source"}
    if isinstance(row.get("grid"), str):
        row["grid"] = Path(row["grid"]).name
    return row


def parse_rows(text: str) -> list[tuple[str, int, str | None, str]]:
    """``SOLVER:NFE[:SPACING[:RUNTIME]]`` comma-separated -> [(solver, nfe, spacing or None, runtime)]."""
    rows = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        if len(parts) < 2 or not parts[1].isdigit():
            raise SystemExit(f"--rows: {item!r} is not SOLVER:NFE[:SPACING[:RUNTIME]]")
        rows.append((parts[0], int(parts[1]), (parts[2] or None) if len(parts) > 2 else None,
                     parts[3] if len(parts) > 3 else "eager"))
    return rows


def row_key(solver: str, nfe: int, spacing: str | None) -> str:
    """The card's name of a row: ``ddpm-1000``; with a spacing ``dpmpp-2m-20 (trailing)``."""
    return f"{solver}-{nfe}" + (f" ({spacing})" if spacing else "")


def pick_default(rows: dict, max_nfe: int) -> str:
    """The key of the best row (lowest FID-dom) at <= max_nfe evaluations: what sample/eval use by default."""
    fit = {k: r for k, r in rows.items() if r["protocol"]["nfe"] <= max_nfe}
    if not fit:
        raise SystemExit(f"no card row at <= {max_nfe} NFE to record as the default sampler")
    return min(fit, key=lambda k: fit[k]["quality"]["fid_dom"])


def main():
    if sys.argv[1:2] == ["--refresh-floor"]:  # zoo_card.py --refresh-floor NAME...: floors only, no sampling
        for name in sys.argv[2:]:
            refresh_floor(name)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--name", required=True)
    ap.add_argument("--train-command", required=True, help="the exact command that trained the checkpoint")
    ap.add_argument("-n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--ddpm-runtime", default="eager",
                    help="runtime of the 1000-step DDPM row (bf16: about 2x faster on this CPU); labelled in the card")
    ap.add_argument("--rows", default="ddim:50,ddpm:1000",
                    help="rows to measure, SOLVER:NFE[:SPACING[:RUNTIME]] comma-separated")
    ap.add_argument("--reference", default="ddpm-1000",
                    help="the row (by its card name) that the others are compared with, e.g. the model's best sampler")
    ap.add_argument("--default-max-nfe", type=int, default=20,
                    help="record the best row at <= this NFE as the checkpoint's default sampler (0: record none)")
    ap.add_argument("--trained-on", default="", help="where it was trained, when not this machine")
    ap.add_argument("--continues", default="", help="the checkpoint this run started from (train --init): its "
                    "training is added to the card's totals")
    args = ap.parse_args()
    before = load_checkpoint(args.continues).meta.get("train", {}) if args.continues else None  # before dst is rewritten

    src = Path(args.ckpt)
    dst = ZOO_DIR / args.name
    dst.mkdir(parents=True, exist_ok=True)
    for f in (WEIGHTS_NAME, META_NAME):
        shutil.copyfile(src / f, dst / f)
    ck = load_checkpoint(dst)
    ck.meta.pop("sampler", None)  # measure with explicit settings; the default is recorded at the end
    rows_path = dst / "card_rows.jsonl"
    other = {r.get("weights") for r in read_rows([rows_path])} - {ck.hash()} if rows_path.is_file() else set()
    if other:  # rows of other weights (a model shipped again under its name) describe another network: start afresh
        stale = rows_path.with_name(f"card_rows.stale-{sorted(map(str, other))[0]}.jsonl")
        rows_path.replace(stale)
        print(f"{rows_path}: rows of other weights moved to {stale.name} (not shipped)")
    done = {r.get("card_key") or row_key(r["protocol"]["solver"], r["protocol"]["nfe"], None)
            for r in read_rows([rows_path])} if rows_path.is_file() else set()
    for solver, nfe, spacing, runtime in parse_rows(args.rows):
        key = row_key(solver, nfe, spacing)
        if key in done:
            continue
        runtime = args.ddpm_runtime if solver == "ddpm" else runtime
        extra = {"spacing": spacing} if spacing else {}
        cfg = EvalConfig(solver=solver, nfe=nfe, n=args.n, seed=0, batch_size=args.batch_size, runtime=runtime, **extra)
        slug = key.replace(" (", "_").replace(")", "")
        row = evaluate_checkpoint(ck, cfg, grid_path=dst / f"grid_{slug}.png", progress=True)
        row["checkpoint"] = f"zoo:{args.name}"
        row["card_key"] = key
        append_row(rows_path, portable(row))
        print(f"{key}: FID-dom {row['quality']['fid_dom']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    rows = {r.get("card_key") or row_key(r["protocol"]["solver"], r["protocol"]["nfe"], None): portable(r)
            for r in read_rows([rows_path])}
    default = pick_default(rows, args.default_max_nfe) if args.default_max_nfe else None
    shown = default or ("ddim-50" if "ddim-50" in rows else next(iter(rows)))
    grids = {k: dst / f"grid_{k.replace(' (', '_').replace(')', '')}.png" for k in rows}
    if grids[shown].is_file():  # the card shows one grid as grid.png; keep one copy of it
        grids[shown].replace(dst / "grid.png")
    for k, g in grids.items():  # the other rows' grids are not shipped (the repo stays lean), but DDPM-1000's
        if k != shown and not k.startswith("ddpm-1000") and g.is_file():
            g.unlink()
    if default:  # sample/eval use it when the user names no sampler (Checkpoint.sampling_defaults)
        p = rows[default]["protocol"]
        ck.meta["sampler"] = {"solver": p["solver"], "nfe": p["nfe"], "spacing": p["spacing"], "source": "card",
                              "why": f"best FID-dom at <= {args.default_max_nfe} NFE on this card (N={args.n})"}
        save_checkpoint(ck, dst)

    tr = ck.meta.get("train", {})
    dataset = ck.meta.get("dataset") or tr.get("dataset")
    floor = floor_for(dataset, args.n)
    q = {k: {m: r["quality"][m] for m in ("fid_dom", "kid", "kid_std", "precision", "recall", "is")}
         for k, r in rows.items()}
    ref = q.get(args.reference, {}).get("fid_dom")
    card = {"name": args.name, "dataset": dataset, "train_command": args.train_command,
            "trained_on": args.trained_on or f"{machine()['cpu']} ({machine()['cpu_count']} cores)",
            "train": {k: tr.get(k) for k in ("steps", "completed_steps", "batch_size", "lr", "seed", "bf16",
                                             "wall_seconds", "cpu_seconds", "num_images", "ema_decay", "ema",
                                             "schedule", "parameterization", "weighting", "min_snr_gamma")},
            "continues": ({"checkpoint": args.continues, "train": {k: before.get(k) for k in ("completed_steps", "cpu_seconds", "wall_seconds", "lr")},
                           "total_steps": (before.get("completed_steps") or 0) + (tr.get("completed_steps") or 0),
                           "total_cpu_seconds": (before.get("cpu_seconds") or 0) + (tr.get("cpu_seconds") or 0)}
                          if before is not None else None),
            "weights": ck.hash(), "quality": q, "n": args.n, "real_vs_real_floor": floor, "reference": args.reference,
            "over_reference": {k: v["fid_dom"] / ref for k, v in q.items()} if ref else None,
            "ddpm1000_over_floor": (q["ddpm-1000"]["fid_dom"] / floor["fid_dom"]) if floor and "ddpm-1000" in q else None,
            "sampler": ck.meta.get("sampler"),
            "rows": list(rows.values()), "card_command": command(), "machine": machine(),
            "summary": ", ".join(f"{k} {v['fid_dom']:.2f}" for k, v in q.items()) + f" (FID-dom, N={args.n})"}
    write_json(dst / "card.json", card)
    cpu_s = tr.get("cpu_seconds")
    lines = [f"# zoo:{args.name}", "",
             f"Trained by leandiff on `{dataset}`: `{args.train_command}`", "",
             f"- steps {tr.get('completed_steps')} × batch {tr.get('batch_size')}, seed {tr.get('seed')}, "
             f"bf16 {tr.get('bf16')}, wall time {tr.get('wall_seconds')} s"
             + (f", {cpu_s:.0f} core-seconds ({cpu_s / 3600:.2f} core-hours)" if cpu_s else "")
             + f" on {card['trained_on']}",
             *([f"- continued (`train --init`) from a run of {before.get('completed_steps')} steps, "
                f"{(before.get('cpu_seconds') or 0):.0f} core-seconds: {card['continues']['total_steps']} steps and "
                f"{card['continues']['total_cpu_seconds']:.0f} core-seconds "
                f"({card['continues']['total_cpu_seconds'] / 3600:.2f} core-hours) in all"] if before is not None else []),
             f"- predicts {ck.parameterization}, {ck.schedule.kind} schedule"
             + (f", weighting {tr.get('weighting')}" if tr.get("weighting") else ""),
             f"- weights {ck.hash()}", "",
             f"| sampler | runtime | N | FID-dom | ×{args.reference} | KID×1e3 | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    for k, v in q.items():
        rel = f"{v['fid_dom'] / ref:.2f}" if ref else "–"
        lines.append(f"| {k} | {rows[k]['protocol']['runtime']} | {args.n} | {v['fid_dom']:.3f} | {rel} | "
                     f"{v['kid'] * 1e3:.3f} ± {v['kid_std'] * 1e3:.3f} | {v['precision']:.3f} | {v['recall']:.3f} |")
    if default:
        lines += ["", f"Default sampler (what `leandiff sample`/`eval` use when none is named): **{default}**, "
                      f"the best row at ≤ {args.default_max_nfe} NFE."]
    if floor:
        what = args.reference if ref else shown
        lines += ["", floor_line(floor, args.n, q[what]["fid_dom"], what)]
    lines += ["", f"![{shown} samples](grid.png)", "", f"Card written by `{command()}`."]
    write_text(dst / "CARD.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
