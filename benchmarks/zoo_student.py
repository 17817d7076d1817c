"""Ship a compressed checkpoint (a distilled student) into the zoo with a short model card.

    python benchmarks/zoo_student.py runs/mnist-tiny-pd4 --name mnist-tiny-pd4 --base mnist-tiny \
        --compress-command "leandiff compress zoo:mnist-tiny --recipe '...' --out runs/mnist-tiny-pd4" [-n 2048]
        [--pd-round K]   (CKPT a pd(...) output directory: ship its K-step round instead of the last)

Copies the weights and metadata into leandiff/zoo/NAME/, evaluates the student with the sampler it
records (solver, NFE, spacing; seed 0, eager fp32) and writes card.json, CARD.md and grid.png. The
base model's 1000-step DDPM row is read from the base's card (same N), for the ratio.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import command, machine
from zoo_card import refresh_floor
from leandiff.checkpoint import META_NAME, WEIGHTS_NAME, ZOO_DIR, load_checkpoint, save_checkpoint
from leandiff.compress.progressive import PDConfig, round_lineage
from leandiff.recipe import parse_recipe
from leandiff.spec import bind
from leandiff.evaluate.harness import EvalConfig, evaluate_checkpoint
from leandiff.io import write_json, write_text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--name", required=True)
    ap.add_argument("--base", required=True, help="the zoo model it was made from")
    ap.add_argument("--compress-command", required=True, help="the exact command that made the checkpoint")
    ap.add_argument("-n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--pd-round", type=int, default=0,
                    help="CKPT is a pd(...) recipe's output: ship its round-K student (DDIM at K steps) instead of the last")
    ap.add_argument("--pd-recipe", default="", help="with --pd-round, for a run stopped before its end: its pd(...) recipe")
    args = ap.parse_args()

    src, dst = Path(args.ckpt), ZOO_DIR / args.name
    if args.pd_round:
        run_dir = src
        src = src / ".steps" / "00-pd" / f"round-{args.pd_round:04d}"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (WEIGHTS_NAME, META_NAME):
        shutil.copyfile(src / f, dst / f)
    ck = load_checkpoint(dst)
    if args.pd_round and not (ck.lineage and ck.lineage[-1].get("step") == "pd"):
        # a round written before rounds recorded themselves: the record the recipe with to=K writes, from the
        # run's final checkpoint, or (a run stopped after round K) from its recipe and the base it started from
        if (run_dir / META_NAME).is_file():
            rec = next(st for st in reversed(load_checkpoint(run_dir).lineage) if st.get("step") == "pd")
            cfg, parent = bind(PDConfig, rec["args"], "pd"), rec["parent"]
        else:
            (step,) = parse_recipe(args.pd_recipe)
            cfg, parent = bind(PDConfig, step.args, "pd"), load_checkpoint(f"zoo:{args.base}").hash()
        ck.lineage.append(round_lineage(cfg, args.pd_round, parent))
        save_checkpoint(ck, dst)
    solver, nfe, runtime = ck.sampling_defaults()
    cfg = EvalConfig(solver=solver, nfe=nfe, n=args.n, seed=0, spacing=ck.default_spacing(), runtime=runtime,
                     batch_size=args.batch_size)
    row = evaluate_checkpoint(ck, cfg, grid_path=dst / "grid.png", progress=True)
    row["checkpoint"] = f"zoo:{args.name}"
    row["grid"] = "grid.png"
    q = {m: row["quality"][m] for m in ("fid_dom", "kid", "kid_std", "precision", "recall", "is")}
    base_card = json.loads((ZOO_DIR / args.base / "card.json").read_text())
    ref = (base_card["quality"].get("ddpm-1000") or {}).get("fid_dom") if base_card.get("n") == args.n else None
    key = f"{solver}-{nfe} ({cfg.spacing})"
    card = {"name": args.name, "base": f"zoo:{args.base}", "compress_command": args.compress_command,
            "lineage": ck.lineage, "weights": ck.hash(), "sampler": key, "n": args.n, "quality": {key: q},
            "base_ddpm1000_fid_dom": ref, "over_base_ddpm1000": q["fid_dom"] / ref if ref else None,
            "rows": [row], "card_command": command(), "machine": machine(),
            "summary": f"FID-dom {q['fid_dom']:.2f} at {nfe} NFE ({solver}, {cfg.spacing}), N={args.n}; "
                       f"made from zoo:{args.base}"}
    write_json(dst / "card.json", card)
    lines = [f"# zoo:{args.name}", "", f"Made by leandiff from `zoo:{args.base}`: `{args.compress_command}`", "",
             f"- weights {ck.hash()}; samples with `{solver}` at {nfe} NFE, `{cfg.spacing}` spacing "
             f"(recorded in the checkpoint: `sample` and `eval` use it by default)",
             f"- lineage: {' > '.join(s.get('recipe', s.get('step', '?')) for s in ck.lineage)}", "",
             "| sampler | N | FID-dom | KID×1e3 | precision | recall |", "|---|---|---|---|---|---|",
             f"| {key} | {args.n} | {q['fid_dom']:.3f} | {q['kid'] * 1e3:.3f} ± {q['kid_std'] * 1e3:.3f} | "
             f"{q['precision']:.3f} | {q['recall']:.3f} |"]
    if ref:
        lines += ["", f"The base's 1000-step DDPM FID-dom at the same N is {ref:.3f} "
                      f"(this student: {q['fid_dom'] / ref:.2f}×, at {nfe / 1000:.3f} of its network evaluations)."]
    lines += ["", f"![{solver}-{nfe} samples](grid.png)", "", f"Card written by `{command()}`."]
    write_text(dst / "CARD.md", "\n".join(lines) + "\n")
    refresh_floor(args.name)  # every shipped card states its distinct real-vs-real floor
    print("\n".join(lines))


if __name__ == "__main__":
    main()
