"""Distillation benchmark (issue 8): progressive distillation of zoo:mnist-tiny down to 1 DDIM step
versus the teacher's own samplers at the same NFE (the shape of the PD report's Table 1), the
one-shot baseline, and KD / low-rank / LoRA tables in the shape of L-Diff Tables 3, 4 and 6.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distill.py --out runs/bench/distill

Every model is made by a recipe (``leandiff.recipe.apply_recipe``) into OUT/models/<name> and
resumes where it stopped; every evaluation is one row of the evaluation harness appended to
OUT/rows.jsonl as soon as it is done (done rows are skipped on a rerun).

Protocols:
- compression rows (KD, low-rank, LoRA, base): the common protocol, dpmpp-2m-sde at NFE 20, N=1024,
  seed 0, batch 256, default latency rounds; quality relative to the base row of the same run.
- PD rows: the same N / seed / batch but the solver ``ddim`` at the student's NFE with the spacing
  the student was trained for (``trailing``); the teacher rows at the same NFE (ddim, euler, heun,
  dpmpp-2m with trailing and log-SNR spacings); latency is not re-measured (same network as the base:
  cost = NFE × the base row's per-evaluation latency).
- target rows: the PD students again at N=2048, the N of the model card's DDPM-1000 row (FID-dom
  0.379, seed 0), which is too expensive to re-measure here (1000 × 2048 evaluations).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import write_results  # noqa: E402
from leandiff.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from leandiff.cost import LatencyConfig  # noqa: E402
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint, load_classifier, read_rows  # noqa: E402
from leandiff.recipe import apply_recipe  # noqa: E402

BASE = "zoo:mnist-tiny"
CARD_DDPM1000 = {"fid_dom": 0.379, "n": 2048, "seed": 0, "source": "leandiff/zoo/mnist-tiny/CARD.md"}
TEACHER_ODE = [("ddim", "trailing"), ("euler", "trailing"), ("heun", "trailing"), ("dpmpp-2m", "trailing"),
               ("dpmpp-2m", "logsnr")]


def recipes(a) -> dict[str, str]:
    pd = (f"pd(from={a.pd_from},to=1,steps_per_round={a.pd_steps},batch_size={a.batch},lr={a.pd_lr},"
          f"ema_decay=0.99,convert_steps={a.convert_steps},bf16=true)")
    return {
        "pd": pd,
        "kd-s2": f"kd(s=2,kd_frac=0.7,steps={a.kd_steps},batch_size={a.batch},bf16=true)",
        "kd-s2-long": f"kd(s=2,kd_frac=0.7,steps={a.kd_long_steps},batch_size={a.batch},lr=1e-3,schedule=cosine,bf16=true)",
        "lowrank-r2": "lowrank(r=2)",
        "lowrank-r2-kd": f"lowrank(r=2) > kd(s=1,kd_frac=0.7,steps={a.lr_steps},batch_size={a.batch},lr=2e-4,bf16=true)",
        "lora-r2": f"lora(r=2,steps={a.lr_steps},batch_size={a.batch},merge=false,bf16=true)",
    }


def make_models(a, base, out: Path, only=None) -> dict[str, Path]:
    paths = {}
    for name, rec in recipes(a).items():
        if only and name not in only:
            continue
        d = out / "models" / name
        t0 = time.perf_counter()
        if not (d / "leandiff.json").is_file():
            print(f"== {name}: {rec}", flush=True)
            apply_recipe(base, rec, d, dataset="mnist", progress=False, log=lambda s: print(s, flush=True))
            print(f"   {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
        paths[name] = d
    return paths


def pd_round(out: Path, k: int) -> Path:
    return out / "models" / "pd" / ".steps" / "00-pd" / f"round-{k:04d}"


def make_oneshot(a, base, out: Path) -> Path:
    from leandiff.compress.progressive import OneShotConfig, oneshot_distill
    from leandiff.compress.training import Training

    d = out / "models" / "oneshot"
    if not (d / "leandiff.json").is_file():
        print(f"== oneshot: teacher ddim-{a.pd_from} trailing, {a.pairs} pairs, {a.os_steps} steps", flush=True)
        init = load_checkpoint(out / "models" / "pd" / ".steps" / "00-pd" / "convert")  # reuse PD's v conversion
        cfg = OneShotConfig(teacher_nfe=a.pd_from, pairs=a.pairs,
                            train=Training(steps=a.os_steps, batch_size=a.batch, lr=a.pd_lr, ema_decay=0.99, bf16=True))
        ck = oneshot_distill(base, out / "work" / "oneshot", cfg, dataset="mnist", init=init, progress=False)
        save_checkpoint(ck, d)
    return d


def ks(a) -> list[int]:
    """The student NFEs in the PD table: 8, 4, 2, 1 (those below the starting NFE)."""
    return [k for k in (8, 4, 2, 1) if k < a.pd_from]


def key(label, solver, nfe, spacing, n):
    return f"{label}|{solver}|{nfe}|{spacing}|{n}"


def run_row(rows_path: Path, done: dict, label: str, ckpt, solver: str, nfe: int, spacing: str, n: int,
            latency: bool, clf, extra: dict | None = None):
    k = key(label, solver, nfe, spacing, n)
    if k in done:
        return done[k]
    cfg = EvalConfig(solver=solver, nfe=nfe, n=n, seed=0, batch_size=256, spacing=spacing,
                     latency=LatencyConfig() if latency else None, inception=False)
    t0 = time.perf_counter()
    row = evaluate_checkpoint(ckpt, cfg, classifier=clf, log=lambda s: None)
    row.update({"key": k, "label": label, "wall_seconds": time.perf_counter() - t0, **(extra or {})})
    append_row(rows_path, row)
    done[k] = row
    print(f"{label:16s} {solver:9s} {spacing:8s} NFE {row['protocol']['nfe_used']:4g} N {n:5d} "
          f"FID-dom {row['quality']['fid_dom']:8.3f}  ({row['wall_seconds']:.0f}s)", flush=True)
    return row


# --- tables ---------------------------------------------------------------------------------------------------------

def _f(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def pd_table(done: dict, a, n: int) -> tuple[str, dict]:
    def fid(label, solver, k, spacing):
        r = done.get(key(label, solver, k, spacing, n))
        return r["quality"]["fid_dom"] if r else None

    rec = {}
    lines = [f"| NFE | PD student (ddim) | teacher ddim | teacher euler | teacher dpmpp-2m (log-SNR) | best teacher ODE | "
             f"student ÷ best ODE | student ÷ DDPM-1000 (card) | one-shot | student train s (cum.) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = CARD_DDPM1000["fid_dom"]
    for k in ks(a):
        st = fid("pd", "ddim", k, "trailing")
        cands = [(fid("teacher", s, k, sp), f"{s}/{sp}") for s, sp in TEACHER_ODE]
        cands = [c for c in cands if c[0] is not None]
        best = min(cands) if cands else (None, "—")
        ckp = pd_round(Path(a.out), k)
        cum = None
        if (ckp / "leandiff.json").is_file():
            dist = json.loads((ckp / "leandiff.json").read_text()).get("distill", {})
            cum = convert_seconds(Path(a.out)) + sum(r["wall_seconds"] for r in dist.get("rounds", []))
        os_ = fid("oneshot", "ddim", 1, "trailing") if k == 1 else None
        rec[k] = {"student": st, "teacher_ddim": fid("teacher", "ddim", k, "trailing"),
                  "teacher_dpmpp2m_logsnr": fid("teacher", "dpmpp-2m", k, "logsnr"),
                  "best_teacher_ode": best[0], "best_teacher_ode_solver": best[1], "oneshot": os_,
                  "student_train_seconds_cumulative": cum}
        rec[k]["teacher_euler"] = fid("teacher", "euler", k, "trailing")
        lines.append(f"| {k} | {_f(st)} | {_f(rec[k]['teacher_ddim'])} | {_f(rec[k]['teacher_euler'])} | "
                     f"{_f(rec[k]['teacher_dpmpp2m_logsnr'])} | "
                     f"{_f(best[0])} ({best[1]}) | {_f(st / best[0] if st and best[0] else None, '{:.2f}×')} | "
                     f"{_f(st / ref if st else None, '{:.2f}×')} | {_f(os_)} | {_f(cum, '{:.0f}')} |")
    return "\n".join(lines), rec


def convert_seconds(out: Path) -> float:
    """Wall seconds of the ε→v conversion, from its own checkpoint's training record."""
    p = out / "models" / "pd" / ".steps" / "00-pd" / "convert" / "leandiff.json"
    return float(json.loads(p.read_text())["train"]["wall_seconds"]) if p.is_file() else 0.0


def cost_row(r: dict) -> dict:
    c = r["cost"]
    lat = c.get("latency_ms") or {}
    return {"fid_dom": r["quality"]["fid_dom"], "kid": r["quality"]["kid"], "params": c["params"],
            "weights_bytes": c["weights_bytes"], "macs_per_image": c["macs_per_image"],
            "latency_ms": {b: lat.get(b) for b in ("1", "16", "64")}}


def compression_table(done: dict, names: list[tuple[str, str]], n: int) -> tuple[str, dict]:
    base = done.get(key("base", "dpmpp-2m-sde", 20, "leading", n))
    lines = ["| model | FID-dom | ÷ base | size MB | params | GMAC/img | ms/eval b1 | b16 | b64 | trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rec = {}
    for label, title in names:
        r = done.get(key(label, "dpmpp-2m-sde", 20, "leading", n))
        if r is None:
            continue
        c = cost_row(r)
        rec[label] = c
        ratio = c["fid_dom"] / base["quality"]["fid_dom"] if base else None
        lat = c["latency_ms"]
        tr = r.get("trainable_params")
        lines.append(f"| {title} | {c['fid_dom']:.3f} | {_f(ratio, '{:.2f}×')} | {c['weights_bytes'] / 1e6:.3f} | "
                     f"{c['params']:,} | {c['macs_per_image'] / 1e9:.4f} | {_f(lat['1'], '{:.2f}')} | "
                     f"{_f(lat['16'], '{:.2f}')} | {_f(lat['64'], '{:.2f}')} | {_f(tr, '{:,}')} |")
    return "\n".join(lines), rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/distill")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--n-target", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pd-from", type=int, default=32)
    p.add_argument("--pd-steps", type=int, default=250)
    p.add_argument("--pd-lr", type=float, default=2e-4)
    p.add_argument("--convert-steps", type=int, default=300)
    p.add_argument("--os-steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--kd-steps", type=int, default=400)
    p.add_argument("--kd-long-steps", type=int, default=1200)
    p.add_argument("--lr-steps", type=int, default=250)
    p.add_argument("--report-only", action="store_true", help="write the results from the rows done so far")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    rows_path = out / "rows.jsonl"
    done = {r["key"]: r for r in read_rows([rows_path])} if rows_path.is_file() else {}
    t_all = time.perf_counter()
    if not a.report_only:
        base = load_checkpoint(BASE)
        clf = load_classifier("mnist")
        # 1. progressive distillation and its table (the headline).
        make_models(a, base, out, only={"pd"})
        run_row(rows_path, done, "base", base, "dpmpp-2m-sde", 20, "leading", a.n, True, clf)
        for k in ks(a):
            run_row(rows_path, done, "pd", load_checkpoint(pd_round(out, k)), "ddim", k, "trailing", a.n, False, clf)
            for solver, spacing in TEACHER_ODE:
                if solver == "heun" and k % 2:
                    continue  # heun spends 2 evaluations per step
                run_row(rows_path, done, "teacher", base, solver, k, spacing, a.n, False, clf)
        run_row(rows_path, done, "teacher", base, "ddim", a.pd_from, "trailing", a.n, False, clf)
        run_row(rows_path, done, "converted-v", load_checkpoint(out / "models/pd/.steps/00-pd/convert"), "ddim",
                a.pd_from, "trailing", a.n, False, clf)
        for k in ks(a):
            run_row(rows_path, done, "pd", load_checkpoint(pd_round(out, k)), "ddim", k, "trailing", a.n_target,
                    False, clf)
        # 2. one-shot baseline.
        run_row(rows_path, done, "oneshot", load_checkpoint(make_oneshot(a, base, out)), "ddim", 1, "trailing", a.n,
                False, clf)
        # 3. KD / low-rank / LoRA under the common protocol.
        paths = make_models(a, base, out)
        for name in ("kd-s2", "lowrank-r2", "lowrank-r2-kd", "lora-r2", "kd-s2-long"):
            ck = load_checkpoint(paths[name])
            extra = {}
            if name == "lora-r2":
                extra["trainable_params"] = ck.meta.get("lora", {}).get("trainable_params")
            run_row(rows_path, done, name, ck, "dpmpp-2m-sde", 20, "leading", a.n, True, clf, extra)
        alternating_latency(out, base, paths)
    write_report(a, out, done, time.perf_counter() - t_all)


LAT_MODELS = ("kd-s2", "lowrank-r2", "lora-r2")  # the fine-tuned low-rank net has the same shapes


def alternating_latency(out: Path, base, paths: dict) -> dict:
    """Per-evaluation latency of the base and every compressed network in the *same* alternating
    rounds (the per-row latencies were measured minutes apart on a shared machine)."""
    from leandiff.cost import measure_latency
    from leandiff.io import write_json
    from leandiff.models import image_shape

    f = out / "latency_alternating.json"
    if f.is_file():
        return json.loads(f.read_text())
    nets = {"base": base.net.eval()}
    nets.update({n: load_checkpoint(paths[n]).net.eval() for n in LAT_MODELS if n in paths})
    res = measure_latency(nets, image_shape(base.arch), LatencyConfig(rounds=7))
    res = {n: {str(b): v for b, v in d.items()} for n, d in res.items()}
    write_json(f, res)
    return res


def latency_table(out: Path) -> str:
    f = out / "latency_alternating.json"
    if not f.is_file():
        return "(not measured)"
    res = json.loads(f.read_text())
    lines = ["| network | ms/eval b1 | b16 | b64 | b64 ÷ base |", "|---|---|---|---|---|"]
    for n, d in res.items():
        lines.append(f"| {n} | {d['1']['median_ms']:.2f} | {d['16']['median_ms']:.2f} | {d['64']['median_ms']:.2f} | "
                     f"{d['64']['median_ms'] / res['base']['64']['median_ms']:.2f}× |")
    return "\n".join(lines)


def write_report(a, out: Path, done: dict, seconds: float):
    pd_md, pd_rec = pd_table(done, a, a.n)
    pd2_md, pd2_rec = pd_table(done, a, a.n_target)
    kd_md, kd_rec = compression_table(done, [("base", "base mnist-tiny (16, 32, 80)"),
                                             ("kd-s2", "KD(BM, s=2): student (8, 16, 40), 400 updates"),
                                             ("kd-s2-long", f"KD(BM, s=2), {a.kd_long_steps} updates, lr 1e-3 cosine")],
                                       a.n)
    lr_md, lr_rec = compression_table(done, [("base", "base"), ("lowrank-r2", "LowRank(BM, r=2), no fine-tune"),
                                             ("lowrank-r2-kd", "KD(BM, LowRank(BM, r=2))"),
                                             ("lora-r2", "LoRA(BM, r=2), adapters unmerged")], a.n)
    combo_md, combo_rec = compression_table(done, [("base", "BM"), ("kd-s2", "KD(BM, s=2)"),
                                                   ("lowrank-r2", "LowRank(BM, r=2)"),
                                                   ("lowrank-r2-kd", "KD(BM, LowRank(BM, r=2), s=1)"),
                                                   ("lora-r2", "KD(BM, LoRA(BM, r=2))")], a.n)
    rec = recipes(a)
    pd_ck = pd_round(out, 1)
    dist = json.loads((pd_ck / "leandiff.json").read_text()).get("distill", {}) if (pd_ck / "leandiff.json").is_file() else {}
    base_row = done.get(key("base", "dpmpp-2m-sde", 20, "leading", a.n))
    base_lat = (base_row or {}).get("cost", {}).get("latency_ms", {})
    t32 = done.get(key("teacher", "ddim", a.pd_from, "trailing", a.n))
    cv32 = done.get(key("converted-v", "ddim", a.pd_from, "trailing", a.n))
    md = f"""# Distillation benchmark (issue 8)

Base `{BASE}` (ε-prediction, linear-β schedule, 0.98 M parameters). Recipes (exact):

""" + "\n".join(f"- `{k}`: `{v}`" for k, v in rec.items()) + f"""
- `oneshot`: `oneshot_distill(teacher_nfe={a.pd_from}, steps={a.os_steps}, pairs={a.pairs}, batch_size={a.batch})`,
  started from the PD run's v-converted copy (the same conversion, not repeated).

## Progressive distillation (shape of the PD report's Table 1)

PD: teacher = the shipped model at {a.pd_from} DDIM steps (trailing spacing) → {a.pd_from // 2} → … → 1;
{a.pd_steps} steps per round at batch {a.batch} (bf16 student, fp32 teacher targets), lr {a.pd_lr}, v-parameterization,
truncated-SNR weighting, after a {a.convert_steps}-step ε→v conversion fine-tune on data. The student at K steps is
sampled by `ddim` at NFE K with `trailing` spacing, exactly the sampler it was trained for. Its targets are
two teacher DDIM steps with *consistent* x̂₀ clipping (ε̂ recomputed from the clamped x̂₀), i.e. the teacher's
`euler` solver (EDM's Euler = DDIM), so "teacher euler" at 2K is what the K-step student imitates; leandiff's
`ddim` solver keeps the unclamped ε̂ (diffusers' convention), which made PD targets explode at the first
step (a first run with that convention: 8-step student FID-dom 14.5, 1-step 20.0 at N=1024). Teacher rows:
the shipped ε model at the same NFE (ddim/euler/heun/dpmpp-2m trailing, dpmpp-2m log-SNR; "best" = lowest
FID-dom among them). The DDPM-1000 reference is the model card's (N=2048, seed 0), too expensive to re-run.

N={a.n}, seed 0 (common protocol N; FID-dom at N=1024 carries more small-sample bias than the card's N=2048):

{pd_md}

N={a.n_target} (the card's N, for the targets; teacher rows not re-run at this N):

{pd2_md}

The distilled chain starts from: teacher ddim-{a.pd_from} trailing FID-dom {_f(t32 and t32['quality']['fid_dom'])};
the ε→v converted copy at ddim-{a.pd_from} {_f(cv32 and cv32['quality']['fid_dom'])} (N={a.n}).
Training cost: ε→v conversion {convert_seconds(out):.0f} s, rounds
{', '.join(f"{r['nfe']}: {r['wall_seconds']:.0f} s" for r in dist.get('rounds', []))} (wall, on the shared 2-core machine,
single thread). Sampling cost per image = NFE × one evaluation; one evaluation of this network at batch 64
= {_f(base_lat.get('64'), '{:.2f}')} ms per batch (base row).

Targets (issue 8): 4-step FID-dom ≤ 1.15 × DDPM-1000 (≤ {1.15 * CARD_DDPM1000['fid_dom']:.3f} at N=2048) and
1-step ≤ 2 × ({2 * CARD_DDPM1000['fid_dom']:.3f}): 4-step student {_f((pd2_rec.get(4) or {}).get('student'))},
1-step student {_f((pd2_rec.get(1) or {}).get('student'))} at N={a.n_target}.

## KD into a narrower student (shape of L-Diff Table 3)

Common protocol: dpmpp-2m-sde, NFE 20, N={a.n}, seed 0, batch 256; latency = median ms per network
evaluation at batch 1/16/64 (alternating rounds). Size = bytes of the safetensors weights file.

{kd_md}

## Low-rank and LoRA (shape of L-Diff Table 4)

`lowrank(r=2)` replaces each Conv2d/Linear whose factors are smaller than it by its rank-⌊full/2⌋ SVD
(k×k conv to `rank` channels + 1×1 conv); square 1×1 convs and Linears are left alone (factors at half
rank hold as many parameters). What shrinks: parameters, bytes, conv MACs. What does not: GroupNorm,
attention-score MACs, activations memory; and latency can *rise* (two small kernels instead of one).
LoRA adds adapters to a frozen base: it trains few parameters but ships more (unmerged) or the same
(merged); it is parameter-efficient fine-tuning, not compression.

{lr_md}

## Combinations (shape of L-Diff Table 6)

{combo_md}

## Latency in alternating rounds

The ms columns above come from each row's own measurement, taken minutes apart while other jobs shared
the 2 cores; these are all the networks timed in the same 7 alternating rounds (median ms per
evaluation, fp32 eager, one thread):

{latency_table(out)}

## What was cut (CPU budget, about 35 min single thread)

- PD from {a.pd_from} DDIM steps (the paper starts at 8192 with 50k updates per round); {a.pd_steps} updates × batch
  {a.batch} per round; ε→v conversion {a.convert_steps} updates.
- KD student s=2 only ({a.kd_steps} and {a.kd_long_steps} updates × {a.batch}; the teacher had 4000 × 128); s=4 not run. Low-rank r=2 only, fine-tune {a.lr_steps} updates;
  LoRA r=2 {a.lr_steps} updates; one-shot {a.os_steps} updates on {a.pairs} teacher pairs.
- DDPM-1000 reference taken from the model card (N=2048), not re-measured.

Benchmark wall time this invocation: {seconds:.0f} s (rows resumed from earlier invocations are not re-timed).
"""
    figures = {"protocol": {"compression": "dpmpp-2m-sde NFE 20 N=%d seed 0 batch 256 leading" % a.n,
                            "pd": "ddim at the student's NFE, trailing, N=%d (and %d), seed 0" % (a.n, a.n_target)},
               "card_ddpm1000": CARD_DDPM1000, "recipes": rec, "pd": {str(a.n): pd_rec, str(a.n_target): pd2_rec},
               "pd_training": dist, "kd": kd_rec, "lowrank": lr_rec, "combinations": combo_rec,
               "rows": {k: {"fid_dom": r["quality"]["fid_dom"], "kid": r["quality"]["kid"],
                            "nfe_used": r["protocol"]["nfe_used"], "params": r["cost"]["params"],
                            "macs_per_image": r["cost"]["macs_per_image"], "weights_bytes": r["cost"]["weights_bytes"],
                            "latency_ms": r["cost"].get("latency_ms"), "sampling_seconds": r["cost"]["sampling_seconds"]}
                        for k, r in sorted(done.items())}}
    write_results("distill", figures, md)
    print(md)


if __name__ == "__main__":
    main()
