"""Ship a trained checkpoint into the zoo with its model card.

    python benchmarks/zoo_card.py runs/mnist-tiny --name mnist-tiny --train-command "leandiff train ..." [-n 2048]

Copies the weights and metadata into leandiff/zoo/NAME/, evaluates the 1000-step DDPM and DDIM-50
rows with the evaluation harness (N samples, seed 0, eager fp32), reads the real-vs-real floor of
the same N from benchmarks/results/metrics.json when present, and writes card.json, CARD.md and
grid.png (64 DDIM-50 samples) beside the weights. Resumable: finished rows are kept in
leandiff/zoo/NAME/card_rows.jsonl and skipped on a rerun.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import RESULTS, command, machine
from leandiff.checkpoint import META_NAME, WEIGHTS_NAME, ZOO_DIR, load_checkpoint
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
    args = ap.parse_args()

    src = Path(args.ckpt)
    dst = ZOO_DIR / args.name
    dst.mkdir(parents=True, exist_ok=True)
    for f in (WEIGHTS_NAME, META_NAME):
        shutil.copyfile(src / f, dst / f)
    ck = load_checkpoint(dst)
    rows_path = dst / "card_rows.jsonl"
    done = {(r["protocol"]["solver"], r["protocol"]["nfe"]) for r in read_rows([rows_path])} if rows_path.is_file() else set()
    for solver, nfe in (("ddim", 50), ("ddpm", 1000)):
        if (solver, nfe) in done:
            continue
        runtime = args.ddpm_runtime if solver == "ddpm" else "eager"
        cfg = EvalConfig(solver=solver, nfe=nfe, n=args.n, seed=0, batch_size=args.batch_size, runtime=runtime)
        row = evaluate_checkpoint(ck, cfg, grid_path=dst / f"grid_{solver}{nfe}.png", progress=True)
        row["checkpoint"] = f"zoo:{args.name}"
        append_row(rows_path, row)
        print(f"{solver}-{nfe}: FID-dom {row['quality']['fid_dom']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    rows = {f"{r['protocol']['solver']}-{r['protocol']['nfe']}": r for r in read_rows([rows_path])}
    if (dst / "grid_ddim50.png").is_file():  # the card shows the DDIM-50 grid as grid.png; keep one copy
        (dst / "grid_ddim50.png").replace(dst / "grid.png")

    tr = ck.meta.get("train", {})
    dataset = ck.meta.get("dataset") or tr.get("dataset")
    floor = floor_for(dataset, args.n)
    q = {k: {m: r["quality"][m] for m in ("fid_dom", "kid", "kid_std", "precision", "recall", "is")}
         for k, r in rows.items()}
    card = {"name": args.name, "dataset": dataset, "train_command": args.train_command,
            "train": {k: tr.get(k) for k in ("steps", "completed_steps", "batch_size", "lr", "seed", "bf16",
                                             "wall_seconds", "num_images", "ema_decay", "schedule", "parameterization")},
            "weights": ck.hash(), "quality": q, "n": args.n, "real_vs_real_floor": floor,
            "ddpm1000_over_floor": (q["ddpm-1000"]["fid_dom"] / floor["fid_dom"]) if floor else None,
            "rows": list(rows.values()), "card_command": command(), "machine": machine(),
            "summary": f"FID-dom {q['ddpm-1000']['fid_dom']:.2f} (DDPM-1000), {q['ddim-50']['fid_dom']:.2f} (DDIM-50), N={args.n}"}
    write_json(dst / "card.json", card)
    lines = [f"# zoo:{args.name}", "",
             f"Trained by leandiff on `{dataset}`: `{args.train_command}`", "",
             f"- steps {tr.get('completed_steps')} × batch {tr.get('batch_size')}, seed {tr.get('seed')}, "
             f"bf16 {tr.get('bf16')}, wall time {tr.get('wall_seconds')} s on {machine()['cpu']} ({machine()['cpu_count']} cores)",
             f"- weights {ck.hash()}", "",
             "| sampler | runtime | N | FID-dom | KID×1e3 | precision | recall |", "|---|---|---|---|---|---|---|"]
    for k, v in q.items():
        lines.append(f"| {k} | {rows[k]['protocol']['runtime']} | {args.n} | {v['fid_dom']:.3f} | "
                     f"{v['kid'] * 1e3:.3f} ± {v['kid_std'] * 1e3:.3f} | {v['precision']:.3f} | {v['recall']:.3f} |")
    if floor:
        lines += ["", floor_line(floor, args.n, q["ddpm-1000"]["fid_dom"])]
    lines += ["", "![DDIM-50 samples](grid.png)", "", f"Card written by `{command()}`."]
    write_text(dst / "CARD.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
