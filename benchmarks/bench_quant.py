"""Quantization benchmark (issue 6): quality and per-evaluation latency of every runtime and
quantization variant of one checkpoint, on the common compression protocol.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quant.py --out runs/bench/quant

Rows (each one ``evaluate_checkpoint`` row, appended to OUT/rows.jsonl when done; a killed run resumes):
torch fp32 eager / bf16 / compile, ORT fp32, ORT int8 per calibration collector, fake-quant W8A8 and
W4A8 per collector (SIMULATIONS: their latency is not a speed-up), W4A8 with activation scales per
timestep group, PyTorch dynamic int8. Latency: one ``measure_latency`` run over all real runtimes in
alternating rounds (batch 1/16/64), so the speed-up ratios come from the same rounds. ``--extra``
adds latency-only rows (random weights, clearly labelled) for the mnist-small and cifar10-ddpm
configurations.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results, resumable_rows  # noqa: E402

from leandiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from leandiff.compress.onnx import quantize_ort_int8  # noqa: E402
from leandiff.compress.quant import CalibConfig, QuantConfig, collect, fake_quantize  # noqa: E402
from leandiff.cost import LatencyConfig, measure_latency  # noqa: E402
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint  # noqa: E402
from leandiff.models import architecture, build_network, image_shape  # noqa: E402
from leandiff.runtime import get_runtime, runtime_network  # noqa: E402

COLLECTORS = ("uniform", "qdiff", "ndtc")


def variants(collectors, n_calib: int, calib_steps: int):
    """(row name, how to build its checkpoint, runtime, kind) in run order."""
    yield "fp32", None, "eager", "real"
    yield "bf16", None, "bf16", "real"
    yield "compile", None, "compile", "real"
    yield "ort-fp32", None, "ort", "real"
    yield "dynamic-int8", None, "dynamic-int8", "real"
    for c in collectors:
        cc = CalibConfig(collector=c, n=n_calib, steps=calib_steps)
        yield f"ort-int8[{c}]", ("ort", cc), "ort-int8", "real"
    for w in (8, 4):
        for c in collectors:
            cc = CalibConfig(collector=c, n=n_calib, steps=calib_steps)
            yield f"fake-W{w}A8[{c}]", ("fake", QuantConfig(w_bits=w, a_bits=8), cc), "fake-quant", "simulation"
    for c in collectors:  # W4A8 with empirical bias correction (quant.correct_bias)
        cc = CalibConfig(collector=c, n=n_calib, steps=calib_steps)
        yield (f"fake-W4A8-bc[{c}]", ("fake", QuantConfig(w_bits=4, a_bits=8, bias_correction=True), cc),
               "fake-quant", "simulation")


def build(base, how, out: Path):
    """The checkpoint of one variant, built once and reloaded from OUT/ckpt/<name> afterwards."""
    if out.joinpath("leandiff.json").is_file():
        return load_checkpoint(out)
    if how[0] == "ort":
        ck = quantize_ort_int8(base, how[1], out)
    else:
        ck = fake_quantize(base, how[1], how[2])
    save_checkpoint(ck, out)
    return load_checkpoint(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="zoo:mnist-tiny")
    ap.add_argument("--out", default="runs/bench/quant")
    ap.add_argument("--n", type=int, default=1024, help="generated samples per row")
    ap.add_argument("--n-calib", type=int, default=256, help="calibration samples")
    ap.add_argument("--calib-steps", type=int, default=20, help="DDIM steps of the FP calibration trajectories")
    ap.add_argument("--rounds", type=int, default=7, help="alternating latency rounds")
    ap.add_argument("--extra", action="store_true", help="latency-only rows for mnist-small / cifar10-ddpm (random weights)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: every row)")
    ap.add_argument("--results-name", default="quant", help="benchmarks/results/NAME.{json,md}")
    a = ap.parse_args()
    out = Path(a.out)
    rows_path, done = resumable_rows(out)
    base = load_checkpoint(a.ckpt)
    torch.manual_seed(0)

    # --- quality, one row per variant --------------------------------------------------------------------------------
    ckpts = {}
    var = list(variants(COLLECTORS, a.n_calib, a.calib_steps))
    tail = [("fake-W4A8-tgroups4[best]", "tgroups", "fake-quant", "simulation")]
    if a.only:
        keep = {x.strip() for x in a.only.split(",")}
        var, tail = [v for v in var if v[0] in keep], [v for v in tail if v[0] in keep]
    best = None
    for name, how, rt, kind in var + tail:
        if how == "tgroups":  # activation scales per timestep group, with the best W4A8 collector
            w4 = [r for r in done.values() if r["bench_name"].startswith("fake-W4A8[")]
            if not w4:
                continue
            best = min(w4, key=lambda r: r["quality"]["fid_dom"])["bench_name"].split("[")[1][:-1]
            how = ("fake", QuantConfig(w_bits=4, a_bits=8, t_groups=4), CalibConfig(collector=best, n=a.n_calib, steps=a.calib_steps))
            name = f"fake-W4A8-tgroups4[{best}]"
        t0 = time.perf_counter()
        ck = base if how is None else build(base, how, out / "ckpt" / name.replace("[", "-").replace("]", ""))
        build_s = time.perf_counter() - t0
        ckpts[name] = (ck, rt, kind)
        if name in done or a.skip_quality:
            continue
        t0 = time.perf_counter()
        row = evaluate_checkpoint(ck, EvalConfig(solver="dpmpp-2m-sde", nfe=20, n=a.n, seed=0, batch_size=256,
                                                 runtime=rt, latency=None, inception=False))
        row["bench_name"], row["bench_kind"], row["build_seconds"] = name, kind, build_s
        row["wall_seconds"] = time.perf_counter() - t0
        append_row(rows_path, row)
        done[name] = row
        q = row["quality"]
        print(f"{name:28s} {kind:10s} FID-dom {q['fid_dom']:.4f}  KID {q['kid'] * 1e3:.3f}e-3  ({row['wall_seconds']:.0f} s)", flush=True)

    # --- latency: all runtimes in alternating rounds -----------------------------------------------------------------
    shape = image_shape(base.arch)
    lat_names = ["fp32", "bf16", "compile", "ort-fp32", "dynamic-int8", "ort-int8[ndtc]", "fake-W8A8[ndtc]"]
    nets = {n: runtime_network(ckpts[n][0], ckpts[n][1]) for n in lat_names if n in ckpts}
    lat = measure_latency(nets, shape, LatencyConfig(rounds=a.rounds))
    extra = {}
    if a.extra:
        for cfgname in ("mnist-small", "cifar10-ddpm"):
            arch = architecture(cfgname)
            ck = Checkpoint(build_network(arch).eval(), arch, base.schedule, "eps", {})
            cc = CalibConfig(collector="uniform", n=16, steps=2, batch_size=16)
            d = out / "ckpt" / f"random-{cfgname}"
            q = load_checkpoint(d) if (d / "leandiff.json").is_file() else None
            if q is None:
                q = quantize_ort_int8(ck, cc, d)
                q.net = ck.net
                save_checkpoint(q, d)
                q = load_checkpoint(d)
            nets_x = {"fp32": runtime_network(q, "eager"), "ort-fp32": runtime_network(q, "ort"),
                      "ort-int8": runtime_network(q, "ort-int8"), "bf16": runtime_network(q, "bf16")}
            extra[cfgname] = measure_latency(nets_x, image_shape(arch), LatencyConfig(rounds=max(3, a.rounds // 2)))
            print(cfgname, {k: round(v[64]["ms_per_image"], 3) for k, v in extra[cfgname].items()}, flush=True)

    # --- report ------------------------------------------------------------------------------------------------------
    rows = [done[n] for n, *_ in var if n in done] + [r for n, r in done.items() if n.startswith("fake-W4A8-tgroups4")]
    fid0 = done["fp32"]["quality"]["fid_dom"]
    l0 = lat["fp32"]
    lines = ["| variant | kind | FID-dom | ÷ fp32 | KID×1e3 | ms/eval b1 | b16 | b64 | speed-up b64 vs eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["bench_name"]
        key = n if n in lat else ("ort-int8[ndtc]" if n.startswith("ort-int8") else "fake-W8A8[ndtc]" if n.startswith("fake") else None)
        ms = lat.get(key) if key else None
        lat_s = " | ".join(f"{ms[b]['median_ms']:.2f}" for b in (1, 16, 64)) if ms else "– | – | –"
        sp = f"{l0[64]['median_ms'] / ms[64]['median_ms']:.2f}×" if ms else "–"
        if r["bench_kind"] == "simulation":
            sp = f"({sp}: simulation, not a speed-up)"
        q = r["quality"]
        lines.append(f"| {n} | {r['bench_kind']} | {q['fid_dom']:.4f} | {q['fid_dom'] / fid0:.3f} | {q['kid'] * 1e3:.3f} | {lat_s} | {sp} |")
    table = "\n".join(lines)
    ort8 = {c: done[f"ort-int8[{c}]"]["quality"]["fid_dom"] for c in COLLECTORS if f"ort-int8[{c}]" in done}
    w4 = {c: done[f"fake-W4A8[{c}]"]["quality"]["fid_dom"] for c in COLLECTORS if f"fake-W4A8[{c}]" in done}
    w8 = {c: done[f"fake-W8A8[{c}]"]["quality"]["fid_dom"] for c in COLLECTORS if f"fake-W8A8[{c}]" in done}
    sp64 = l0[64]["median_ms"] / lat["ort-int8[ndtc]"][64]["median_ms"] if "ort-int8[ndtc]" in lat else float("nan")
    best_int8 = min(ort8, key=ort8.get) if ort8 else None
    best_w4 = min(w4, key=w4.get) if w4 else None
    w4bc = {c: done[f"fake-W4A8-bc[{c}]"]["quality"]["fid_dom"] for c in COLLECTORS if f"fake-W4A8-bc[{c}]" in done}
    best_bc = min(w4bc, key=w4bc.get) if w4bc else None
    verdict = []
    if ort8:  # a run with --only may have no ort-int8 rows
        verdict += [
            f"- ort-int8 speed-up over torch fp32 eager at batch 64: {sp64:.2f}× (target ≥ 2.0×: {'met' if sp64 >= 2 else 'NOT met'}).",
            f"- ort-int8 FID-dom ÷ fp32, per collector: " + ", ".join(f"{c} {v / fid0:.3f}" for c, v in ort8.items())
            + f" (target ≤ 1.05: best {best_int8} {'met' if ort8[best_int8] / fid0 <= 1.05 else 'NOT met'})."]
    if w8:
        verdict.append(f"- fake W8A8 FID-dom ÷ fp32: " + ", ".join(f"{c} {v / fid0:.3f}" for c, v in w8.items()) + ".")
    for label, w4x, best_x in (("", w4, best_w4), (" with bias correction", w4bc, best_bc)):
        if w4x:
            verdict.append(f"- fake W4A8{label}, FID-dom ÷ fp32: " + ", ".join(f"{c} {v / fid0:.3f}" for c, v in w4x.items())
                           + f" (target ≤ 1.2 with the best collector: best {best_x} "
                           f"{'met' if w4x[best_x] / fid0 <= 1.2 else 'NOT met'}).")
    tg = [r for n, r in done.items() if n.startswith("fake-W4A8-tgroups4")]
    if tg and best_w4:
        verdict.append(f"- W4A8[{best_w4}] with 4 timestep-group activation scales: FID-dom ÷ fp32 "
                       f"{tg[0]['quality']['fid_dom'] / fid0:.3f} vs one scale {w4[best_w4] / fid0:.3f}.")
    if "dynamic-int8" in done:
        verdict.append(f"- PyTorch dynamic int8 (L-Diff's method): FID-dom ÷ fp32 {done['dynamic-int8']['quality']['fid_dom'] / fid0:.3f}, "
                       f"speed ÷ eager at b64 {l0[64]['median_ms'] / lat['dynamic-int8'][64]['median_ms']:.2f}×.")
    extra_md = ""
    if extra:
        el = ["| config (RANDOM weights, latency only) | runtime | ms/eval b1 | b16 | b64 | speed-up b64 vs eager |", "|---|---|---|---|---|---|"]
        for cfgname, m in extra.items():
            for rt, v in m.items():
                el.append(f"| {cfgname} | {rt} | {v[1]['median_ms']:.2f} | {v[16]['median_ms']:.2f} | {v[64]['median_ms']:.2f} | "
                          f"{m['fp32'][64]['median_ms'] / v[64]['median_ms']:.2f}× |")
        extra_md = "\n\n## Latency of larger configurations (random weights, calibration n=16; latency only)\n\n" + "\n".join(el)
    md = (f"# Quantization ({a.ckpt})\n\nProtocol: dpmpp-2m-sde, NFE 20, N={a.n}, seed 0, batch 256; FID-dom and KID on the "
          f"shipped MNIST classifier, relative to the fp32 eager row of this run. Calibration: {a.n_calib} samples from "
          f"{a.calib_steps}-step DDIM trajectories of the fp32 model (data-free). Latency: one alternating-rounds run "
          f"({a.rounds} rounds, median) over the real runtimes, OMP_NUM_THREADS=1, ORT intra-op threads = torch threads. "
          f"ORT int8 latency is measured on the ndtc-calibrated model (the calibration changes scale values only, not "
          f"the graph). Fake-quant rows are SIMULATIONS in fp32: their latency is shown only to make plain that they are "
          f"slower, never a speed-up.\n\n{table}\n\n" + "\n".join(verdict) + extra_md)
    notes = Path(__file__).resolve().parent / "results" / "quant_notes.md"
    if notes.is_file() and a.results_name == "quant":  # hand-written reading of the last committed run (cuts, noise, conclusions)
        md += "\n" + notes.read_text()
    print(md)
    write_results(a.results_name, {"rows": rows, "latency": lat, "extra_latency": extra, "verdict": verdict,
                            "settings": vars(a)}, md)


if __name__ == "__main__":
    main()
