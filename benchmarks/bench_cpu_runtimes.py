"""CPU runtimes side by side (issue 21): torch eager / bf16 / compile, ONNX Runtime fp32 / int8, OpenVINO
fp32 / bf16 / int8 (NNCF) on one model, one batch, one thread count, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cpu_runtimes.py --out runs/bench/cpu_runtimes

Quality: FID-dom of every variant sampled through its own runtime with one fixed sampler
(dpmpp-3m-sde, 10 NFE, trailing spacing, seed 0), N samples; int8 variants calibrated by leandiff's
collectors (256 samples from 20-step DDIM trajectories of the fp32 model, data-free), one model per
backend and collector. Speed: per-evaluation latency at batch 64 of all variants in one
``measure_latency`` run (alternating rounds, median), the same torch / ORT / OpenVINO thread count;
achieved GOP/s against this machine's peak of the variant's number format (``bench_roofline.peaks``).
Latency-only rows check the speed work: OpenVINO with a dynamic batch instead of static shapes, and
converted from the ONNX export instead of from PyTorch; int8 with the unquantized operations in bf16
(mixed int8/bf16, which has its own FID-dom row). OpenVINO int8 places NNCF's quantizers at the GEMM
inputs only (scope=gemm) without bias correction, and converts GroupNorm to per-channel reductions
(groupnorm=reduce), leandiff's defaults; "NNCF defaults" rows keep NNCF's placement (scope=nncf), its fast
bias correction (bias_correction=true) and OpenVINO's own GroupNormalization op (groupnorm=ov): what a
user gets from ``ov.convert_model`` + ``nncf.quantize``. Latency-only "GroupNorm as OpenVINO's op" rows
measure the GroupNorm rewrite alone.
Rows are appended to OUT/rows.jsonl as they finish; a killed run resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results, resumable_rows  # noqa: E402
from bench_roofline import FORMAT, peaks  # noqa: E402

from leandiff.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from leandiff.cost import LatencyConfig, macs_per_image, measure_latency  # noqa: E402
from leandiff.evaluate import EvalConfig, append_row, evaluate_checkpoint  # noqa: E402
from leandiff.io import atomic_path  # noqa: E402
from leandiff.models import image_shape  # noqa: E402
from leandiff.runtime import get_runtime, runtime_network  # noqa: E402
from leandiff.compress.quant import QuantStep, quant_step  # noqa: E402
from leandiff.recipe import StepContext  # noqa: E402
from leandiff.surgery.quant import check_keep, parse_keep  # noqa: E402

BATCH = 64


def _int8(backend, collector, keep="", scope="gemm", bias_correction=False, groupnorm="reduce") -> dict:
    return {"backend": backend, "collector": collector, "keep": keep, "scope": scope, "bias_correction": bias_correction,
            "groupnorm": groupnorm}


def variants(collectors, ov_collectors, compile_: bool, keep: str = ""):
    """(row name, how to build its checkpoint: None | :func:`_int8` settings, runtime spec, FID-dom too?).
    OpenVINO int8 rows use leandiff's defaults (NNCF's quantizers at the GEMM inputs only, no bias
    correction); the "NNCF defaults" rows keep NNCF's own placement and its fast bias correction, and one
    row its placement alone."""
    yield "torch fp32 eager", None, "eager", True
    yield "torch bf16 autocast", None, "bf16", True
    if compile_:
        yield "torch.compile fp32", None, "compile", False  # the eager graph compiled: same fp32 arithmetic
        yield "torch.compile bf16", None, "compile-bf16", False  # bf16 autocast compiled: bf16's arithmetic
    yield "ORT fp32", None, "ort", True
    for c in collectors:
        yield f"ORT int8 [{c}]", _int8("ort", c), "ort-int8", True
    yield "OpenVINO fp32", None, "openvino", True
    yield "OpenVINO fp32, dynamic batch", None, "openvino(static=false)", False
    yield "OpenVINO fp32, converted from ONNX", None, "openvino(source=onnx)", False
    yield "OpenVINO bf16", None, "openvino-bf16", True
    yield "OpenVINO bf16, GroupNorm as OpenVINO's op", None, "openvino-bf16(groupnorm=ov)", False
    for c in ov_collectors:
        yield f"OpenVINO int8 (NNCF) [{c}]", _int8("openvino", c), "openvino-int8", True
    c = ov_collectors[0]
    yield f"OpenVINO int8 (NNCF) [{c}], dynamic batch", _int8("openvino", c), "openvino-int8(static=false)", False
    yield f"OpenVINO int8 (NNCF) [{c}, n=128], converted from ONNX", None, f"openvino-int8(calib={c},source=onnx)", False
    yield f"OpenVINO int8+bf16 (NNCF) [{c}]", _int8("openvino", c), "openvino-int8(bf16=true)", True
    yield (f"OpenVINO int8+bf16 (NNCF) [{c}], GroupNorm as OpenVINO's op", _int8("openvino", c, groupnorm="ov"),
           "openvino-int8(bf16=true)", False)
    yield f"OpenVINO int8 (NNCF's placement) [{c}]", _int8("openvino", c, scope="nncf"), "openvino-int8", True
    nncf = _int8("openvino", c, scope="nncf", bias_correction=True, groupnorm="ov")
    yield f"OpenVINO int8 (NNCF defaults) [{c}]", nncf, "openvino-int8", True
    yield f"OpenVINO int8+bf16 (NNCF defaults) [{c}]", nncf, "openvino-int8(bf16=true)", True
    if keep:  # the modules a sensitivity probe found costly in int8, kept out of it (quant(keep=...))
        yield f"ORT int8 [{c}, keep {keep}]", _int8("ort", c, keep), "ort-int8", True
        yield f"OpenVINO int8 (NNCF) [{c}, keep {keep}]", _int8("openvino", c, keep), "openvino-int8", True
        yield f"OpenVINO int8+bf16 (NNCF) [{c}, keep {keep}]", _int8("openvino", c, keep), "openvino-int8(bf16=true)", True


def build(base, how, out: Path, n_calib: int, calib_steps: int):
    if how is None:
        return base
    if (out / "leandiff.json").is_file():
        return load_checkpoint(out)
    # the recipe step itself (keep=auto measures the backend; the same calibration as the other rows)
    step = QuantStep(runtime=f"{how['backend']}-int8", calib=how["collector"], n=n_calib, steps=calib_steps,
                     keep=how["keep"], scope=how["scope"], bias_correction=how["bias_correction"],
                     groupnorm=how.get("groupnorm", "reduce"))
    save_checkpoint(quant_step(base, step, StepContext(step_dir=out)), out)
    return load_checkpoint(out)


def build_dir(out: Path, how) -> Path:
    """Where a variant's checkpoint is kept: one directory per distinct setting."""
    if how is None:
        return out
    parts = [how["backend"], how["collector"], how["keep"], "" if how["scope"] == "gemm" else f"scope-{how['scope']}",
             "bc" if how["bias_correction"] else "", "" if how.get("groupnorm", "reduce") == "reduce" else f"gn-{how['groupnorm']}"]
    return out / "ckpt" / "-".join(p for p in parts if p)


def pareto_plot(points: list[dict], path: Path) -> None:
    """Speed-up over torch fp32 eager (x) vs FID-dom (y); the Pareto front (faster and no worse) joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for p in points:
        ax.scatter(p["speedup"], p["fid"], s=36, color="C3" if "int8" in p["runtime"] else "C0" if "openvino" not in p["runtime"] else "C2")
        ax.annotate(p["name"], (p["speedup"], p["fid"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: -p["speedup"]):
        if p["fid"] < best:
            front.append(p)
            best = p["fid"]
    ax.plot([p["speedup"] for p in front], [p["fid"] for p in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel(f"speed-up per evaluation over torch fp32 eager (batch {BATCH})")
    ax.set_ylabel("FID-dom (dpmpp-3m-sde, 10 NFE, trailing)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="zoo:mnist-tiny")
    ap.add_argument("--out", default="runs/bench/cpu_runtimes")
    ap.add_argument("--n", type=int, default=2048, help="generated samples per FID-dom row")
    ap.add_argument("--collectors", default="qdiff,ndtc,uniform", help="calibration collectors of the ORT int8 variants")
    ap.add_argument("--ov-collectors", default="", help="those of the OpenVINO int8 variants (default: --collectors); "
                                                        "the first also makes the speed-work rows")
    ap.add_argument("--keep", default="", help="int8 rows with these modules kept out of int8 too (quant(keep=...): "
                    "paths joined by '+', or auto: chosen by measuring each backend's int8 model)")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7, help="alternating latency rounds")
    ap.add_argument("--compile", action="store_true", help="torch.compile fp32 and bf16 latency rows (~25 s each to compile)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--quality-only", action="store_true", help="stop after the FID-dom rows (time them in a later run)")
    ap.add_argument("--results-name", default="cpu_runtimes")
    a = ap.parse_args()
    out = Path(a.out)
    rows_path, done = resumable_rows(out)
    base = load_checkpoint(a.ckpt)
    collectors = [c.strip() for c in a.collectors.split(",")]
    ov_collectors = [c.strip() for c in (a.ov_collectors or a.collectors).split(",")]
    t_start, load_start = time.time(), os.getloadavg()
    if a.keep != "auto":
        check_keep(base.net, parse_keep(a.keep))
    var = list(variants(collectors, ov_collectors, a.compile, a.keep))
    for _, _, rt, _ in var:
        get_runtime(rt)  # every spec checked before any work

    # --- quality: one FID-dom row per variant, through its own runtime ----------------------------------------------
    ckpts = {}
    for name, how, rt, quality in var:
        ckpts[name] = build(base, how, build_dir(out, how), a.n_calib, a.calib_steps)
        if not quality or name in done or a.skip_quality:
            continue
        t0 = time.perf_counter()
        row = evaluate_checkpoint(ckpts[name], EvalConfig(solver="dpmpp-3m-sde", nfe=10, spacing="trailing", n=a.n, seed=0,
                                                          batch_size=256, runtime=rt, latency=None, inception=False))
        row["bench_name"], row["wall_seconds"] = name, time.perf_counter() - t0
        append_row(rows_path, row)
        done[name] = row
        print(f"{name:44s} FID-dom {row['quality']['fid_dom']:.4f}  ({row['wall_seconds']:.0f} s)", flush=True)

    if a.quality_only:
        return

    # --- speed: every variant in the same alternating rounds at batch 64 --------------------------------------------
    threads = torch.get_num_threads()
    peak = peaks(threads)
    torch.set_num_threads(threads)
    shape = image_shape(base.arch)
    macs = macs_per_image(base.net, shape)
    nets = {name: runtime_network(ckpts[name], rt) for name, _, rt, _ in var}
    lat = measure_latency(nets, shape, LatencyConfig(batch_sizes=(BATCH,), rounds=a.rounds))
    load_end, wall = os.getloadavg(), time.time() - t_start

    # --- report ------------------------------------------------------------------------------------------------------
    ref_ms = lat["torch fp32 eager"][BATCH]["median_ms"]
    fid0 = done["torch fp32 eager"]["quality"]["fid_dom"] if "torch fp32 eager" in done else None
    table, points, figures = [], [], []
    for name, _, rt, _ in var:
        ms = lat[name][BATCH]["median_ms"]
        fmt = FORMAT[rt.split("(")[0]]
        gops = 2 * macs * BATCH / (ms / 1e3) / 1e9
        fid = done[name]["quality"]["fid_dom"] if name in done else None
        rec = {"name": name, "runtime": get_runtime(rt).label, "format": fmt, "median_ms": ms, "speedup": ref_ms / ms,
               "images_per_s": BATCH / (ms / 1e3), "gops": gops, "fraction_of_peak": gops / peak[fmt]["best"],
               "fid": fid, "fid_ratio": fid / fid0 if fid is not None and fid0 else None}
        figures.append(rec)
        if fid is not None:
            points.append(rec)
        table.append(f"| {name} | `{rec['runtime']}` | {fmt} | " + (f"{fid:.4f} | {rec['fid_ratio']:.3f}" if fid is not None else "– | –")
                     + f" | {ms:.2f} | {rec['images_per_s']:.0f} | {rec['speedup']:.2f}× | {gops:.0f} ({rec['fraction_of_peak']:.1%}) |")
    by = {f["name"]: f for f in figures}
    within = [f for f in figures if f["fid_ratio"] is not None and f["fid_ratio"] <= 1.05 and f["name"] != "torch fp32 eager"]
    best = max(within, key=lambda f: f["speedup"]) if within else None
    verdict = []
    if best:
        verdict.append(f"- Fastest runtime within 1.05× of fp32's FID-dom: **{best['name']}** (`{best['runtime']}`), "
                       f"{best['speedup']:.2f}× torch fp32 eager at FID-dom ÷ fp32 {best['fid_ratio']:.3f} "
                       f"(target ≥ 3×: {'met' if best['speedup'] >= 3 else 'NOT met'}); {best['gops']:.0f} GOP/s = "
                       f"{best['fraction_of_peak']:.1%} of the {best['format']} peak ({peak[best['format']]['best']:.0f} GOP/s, "
                       f"{threads} thread(s); target ≥ 50 %: {'met' if best['fraction_of_peak'] >= 0.5 else 'NOT met'}).")
    ort8 = [f for f in figures if f["name"].startswith("ORT int8") and f["fid"] is not None]
    ov8 = [f for f in figures if f["name"].startswith("OpenVINO int8 (NNCF) [") and "dynamic" not in f["name"] and f["fid"] is not None]
    if ort8 and ov8:
        o, v = min(ort8, key=lambda f: f["fid"]), min(ov8, key=lambda f: f["fid"])
        verdict.append(f"- Best-FID int8 of each backend: {o['name']} {o['speedup']:.2f}× at {o['fid_ratio']:.3f}; "
                       f"{v['name']} {v['speedup']:.2f}× at {v['fid_ratio']:.3f}: OpenVINO + NNCF int8 is "
                       f"{v['speedup'] / o['speedup']:.2f}× ONNX Runtime int8's speed.")
        rec_name = best["name"] if best else None
        verdict.append(f"- Recommended CPU runtime on this machine: **{rec_name}**" + (
            " (OpenVINO is faster: it is leandiff's recommended CPU runtime)." if rec_name and rec_name.startswith("OpenVINO")
            else " (ONNX Runtime stays the recommended CPU runtime)." if rec_name and rec_name.startswith("ORT") else ".")
            if rec_name else "- No runtime is within 1.05× of fp32's FID-dom.")
    for static, dynamic in (("OpenVINO fp32", "OpenVINO fp32, dynamic batch"),
                            (f"OpenVINO int8 (NNCF) [{ov_collectors[0]}]", f"OpenVINO int8 (NNCF) [{ov_collectors[0]}], dynamic batch")):
        if static in by and dynamic in by:
            verdict.append(f"- Static shapes (kept, the default): {static} {by[dynamic]['median_ms'] / by[static]['median_ms']:.2f}× "
                           f"the speed of the same model with a dynamic batch.")
    for direct, onnx_ in (("OpenVINO fp32", "OpenVINO fp32, converted from ONNX"),
                          (f"OpenVINO int8 (NNCF) [{ov_collectors[0]}]", f"OpenVINO int8 (NNCF) [{ov_collectors[0]}, n=128], converted from ONNX")):
        if direct in by and onnx_ in by:
            verdict.append(f"- Converted from PyTorch (kept, the default): {direct} {by[onnx_]['median_ms'] / by[direct]['median_ms']:.2f}× "
                           f"the speed of the model converted from the ONNX export.")
    mixed = f"OpenVINO int8+bf16 (NNCF) [{ov_collectors[0]}]"
    plain = f"OpenVINO int8 (NNCF) [{ov_collectors[0]}]"
    if mixed in by and plain in by:
        verdict.append(f"- Mixed int8/bf16 (`openvino-int8(bf16=true)`, opt-in): {by[plain]['median_ms'] / by[mixed]['median_ms']:.2f}× "
                       f"the speed of int8 with fp32 for the unquantized operations"
                       + (f", FID-dom ÷ fp32 {by[mixed]['fid_ratio']:.3f} vs {by[plain]['fid_ratio']:.3f}." if by[mixed]["fid_ratio"] and by[plain]["fid_ratio"] else "."))
    c = ov_collectors[0]
    for plain, kept in ((f"ORT int8 [{c}]", f"ORT int8 [{c}, keep {a.keep}]"),
                        (f"OpenVINO int8 (NNCF) [{c}]", f"OpenVINO int8 (NNCF) [{c}, keep {a.keep}]"),
                        (f"OpenVINO int8+bf16 (NNCF) [{c}]", f"OpenVINO int8+bf16 (NNCF) [{c}, keep {a.keep}]")):
        if a.keep and plain in by and kept in by and by[plain]["fid_ratio"] and by[kept]["fid_ratio"]:
            chosen = "+".join(ckpts[kept].meta["quant"].get("keep", [])) or "nothing"
            verdict.append(f"- keep={a.keep} (kept out of int8: {chosen}): {kept} FID-dom ÷ fp32 {by[kept]['fid_ratio']:.3f} "
                           f"(all int8: {by[plain]['fid_ratio']:.3f}) at {by[kept]['speedup']:.2f}× eager "
                           f"(all int8: {by[plain]['speedup']:.2f}×).")
    ours, place, dflt = (f"OpenVINO int8 (NNCF) [{c}]", f"OpenVINO int8 (NNCF's placement) [{c}]",
                         f"OpenVINO int8 (NNCF defaults) [{c}]")
    if all(k in by and by[k]["fid_ratio"] for k in (ours, place, dflt)):
        verdict.append(f"- leandiff's NNCF settings (quantizers at the GEMM inputs only, no bias correction) vs NNCF's "
                       f"defaults: FID-dom ÷ fp32 {by[ours]['fid_ratio']:.3f} at {by[ours]['speedup']:.2f}× eager vs "
                       f"{by[dflt]['fid_ratio']:.3f} at {by[dflt]['speedup']:.2f}×; NNCF's placement (residual adds, norms "
                       f"in int8) without its bias correction: {by[place]['fid_ratio']:.3f} at {by[place]['speedup']:.2f}×.")
    if points:
        pareto_plot(points, RESULTS / f"{a.results_name}_pareto.png")
    n_note = (f"N={a.n}" + ("" if a.n >= 2048 else " (fewer than the issue's 2048, for time)")) if done else "no FID-dom rows"
    md = (f"# CPU runtimes side by side ({a.ckpt}, batch {BATCH}, {threads} thread(s))\n\n"
          + __doc__.split("\n\n", 2)[2].strip().replace("\n", " ") + f" This run: {n_note}, {a.rounds} latency rounds.\n\n"
          "| variant | runtime spec | format | FID-dom | ÷ fp32 | ms/eval | img-evals/s | speed-up vs eager | GOP/s (of peak) |\n"
          "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(table) + "\n\n" + "\n".join(verdict)
          + f"\n\nPeak at {threads} thread(s): fp32 {peak['fp32']['best']:.0f}, bf16 {peak['bf16']['best']:.0f}, int8 "
          f"{peak['int8']['best']:.0f} GOP/s." + (f" Pareto plot (speed vs FID-dom): `{a.results_name}_pareto.png`." if points else "")
          + "\n\n"
          f"Wall time {wall:.0f} s. Load average (1/5/15 min) at the start {', '.join(f'{x:.2f}' for x in load_start)}, at the end "
          f"{', '.join(f'{x:.2f}' for x in load_end)} (this 2-core machine is shared with other processes).")
    print(md)
    write_results(a.results_name, {"figures": figures, "latency": lat, "rows": [done[n] for n, *_ in var if n in done],
                                   "peak": peak, "verdict": verdict, "loadavg_start": load_start, "loadavg_end": load_end,
                                   "wall_seconds": wall, "settings": vars(a)}, md)


if __name__ == "__main__":
    main()
