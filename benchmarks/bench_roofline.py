"""Roofline (issue 21): this machine's peak GEMM throughput per number format, and what each runtime
achieves of it per network evaluation.

    .venv/bin/python benchmarks/bench_roofline.py --out runs/bench/roofline

Peak: large matrix products through torch's own kernels (oneDNN / MKL): fp32 ``torch.mm``, bf16
``torch.mm`` (AMX / AVX-512 BF16 where the CPU has them), int8 the faster of ``torch._int_mm`` and the
oneDNN quantized linear (``torch.ops.quantized.linear``, u8 × s8 → the AMX / VNNI int8 path), each at
every thread count, the best of several calls (a ceiling: noise only lowers it). Achieved: 2 × the MACs
of one evaluation (:func:`leandiff.cost.macs_per_image`, FlopCounterMode) × batch / median latency of
the alternating rounds (:func:`leandiff.cost.measure_latency`), as a fraction of the peak of the
runtime's number format. int8 runtimes keep some operations in fp32 (GroupNorm, SiLU, softmax,
conv_in/conv_out, the time MLP): their fraction is against the int8 peak, the format of the bulk of
their MACs. Models other than the zoo's are random-weight configurations (latency only), int8 models
calibrated on 16 samples (the calibration changes scale values, not the graph or its cost). OpenVINO
converts GroupNorm to per-channel reductions (leandiff's default); the ``groupnorm=ov`` rows keep
OpenVINO's GroupNormalization op (its int8 model calibrated on the fly by the uniform collector).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from leandiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from leandiff.compress.calibration import CalibConfig  # noqa: E402
from leandiff.compress.onnx import quantize_ort_int8  # noqa: E402
from leandiff.compress.openvino import quantize_openvino_int8  # noqa: E402
from leandiff.cost import LatencyConfig, macs_per_image, measure_latency  # noqa: E402
from leandiff.models import architecture, build_network, image_shape  # noqa: E402
from leandiff.runtime import runtime_network  # noqa: E402

RUNTIMES = ("eager", "bf16", "ort", "ort-int8", "openvino", "openvino-bf16", "openvino-bf16(groupnorm=ov)", "openvino-int8",
            "openvino-int8(bf16=true)", "openvino-int8(calib=uniform,bf16=true,groupnorm=ov)")
FORMAT = {"eager": "fp32", "compile": "fp32", "ort": "fp32", "openvino": "fp32", "bf16": "bf16", "compile-bf16": "bf16",
          "openvino-bf16": "bf16", "ort-int8": "int8", "openvino-int8": "int8"}


def _best_gops(fn, ops: float, calls: int = 5) -> float:
    fn(), fn()  # warm-up (packing, thread pool)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return ops / best / 1e9


def peaks(threads: int) -> dict:
    """GOP/s of the fastest matrix product per format at ``threads`` threads (several sizes and kernels, the
    best). ``torch.mm`` goes to MKL / oneDNN's matmul and a 1×1 convolution over a 32×32 map (the same
    product, 1024 × n × n) to oneDNN's convolution; the runtimes' own GEMMs are measured too: ONNX
    Runtime's MLAS (fp32 MatMul, u8 × s8 MatMulInteger) and OpenVINO's CPU plugin (fp32 and bf16 MatMul).
    On this project's AMD EPYC machines torch's fp32 GEMM reached about half of MLAS's and OpenVINO's,
    so a peak from torch alone was below what the runtimes achieved on the models."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {"fp32": {}, "bf16": {}, "int8": {}}
    for n in (1024, 2048):
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        out["fp32"][f"mm n={n}"] = _best_gops(lambda: torch.mm(a, b), 2 * n ** 3)
    for n in (512, 1024):
        for fmt, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            x, w = torch.randn(1, n, 32, 32, generator=g).to(dt), torch.randn(n, n, 1, 1, generator=g).to(dt)
            with torch.no_grad():
                out[fmt][f"conv1x1 c={n} 32x32"] = _best_gops(lambda: F.conv2d(x, w), 2 * 1024 * n * n)
    for n in (2048, 4096):
        a, b = torch.randn(n, n, generator=g).bfloat16(), torch.randn(n, n, generator=g).bfloat16()
        out["bf16"][f"mm n={n}"] = _best_gops(lambda: torch.mm(a, b), 2 * n ** 3)
        ai = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
        bi = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
        out["int8"][f"_int_mm n={n}"] = _best_gops(lambda: torch._int_mm(ai, bi), 2 * n ** 3)
        engine = torch.backends.quantized.engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch; the kernels are oneDNN's
            try:
                torch.backends.quantized.engine = "onednn"
                w = torch.quantize_per_tensor(torch.randn(n, n, generator=g), 0.01, 0, torch.qint8)
                packed = torch.ops.quantized.linear_prepack(w, None)
                x = torch.quantize_per_tensor(torch.randn(n, n, generator=g), 0.05, 128, torch.quint8)
                out["int8"][f"onednn qlinear n={n}"] = _best_gops(lambda: torch.ops.quantized.linear(x, packed, 0.1, 128),
                                                                  2 * n ** 3)
            except RuntimeError as e:  # a torch build without the onednn engine
                out["int8"][f"onednn qlinear n={n}"] = f"unavailable: {str(e).splitlines()[0]}"
            finally:
                torch.backends.quantized.engine = engine
    _runtime_gemms(out, threads, g)
    return {fmt: {"best": max(v for v in d.values() if isinstance(v, float)), "kernels": d} for fmt, d in out.items()}


def _runtime_gemms(out: dict, threads: int, g: torch.Generator, n: int = 2048) -> None:
    """MLAS and OpenVINO GEMMs into ``out`` (skipped where the optional packages are missing)."""
    import numpy as np

    a = torch.randn(n, n, generator=g).numpy()
    b = torch.randn(n, n, generator=g).numpy()
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        for fmt, op, a_in, b_w, a_type in (
                ("fp32", "MatMul", a, b, TensorProto.FLOAT),
                ("int8", "MatMulInteger", (a * 20 + 128).clip(0, 255).astype(np.uint8), (b * 20).clip(-127, 127).astype(np.int8),
                 TensorProto.UINT8)):
            graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm",
                                      [helper.make_tensor_value_info("a", a_type, [n, n])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT if fmt == "fp32" else TensorProto.INT32, [n, n])],
                                      [numpy_helper.from_array(b_w, "b")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            out[fmt][f"ORT MLAS {op} n={n}"] = _best_gops(lambda: session.run(None, {"a": a_in}), 2 * n ** 3)
    except ImportError:
        pass
    try:
        import openvino as ov
        import openvino.opset13 as ops

        p = ops.parameter([n, n], np.float32, name="a")
        model = ov.Model([ops.matmul(p, ops.constant(b), False, False)], [p])
        for fmt, hint in (("fp32", "f32"), ("bf16", "bf16")):
            if hint == "bf16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                continue
            request = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                                             "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
            out[fmt][f"OpenVINO MatMul n={n}"] = _best_gops(lambda: request.infer({"a": a}), 2 * n ** 3)
    except ImportError:
        pass


def prepare(name: str, work: Path):
    """The model's checkpoint directory with its ORT and OpenVINO int8 side files (built once)."""
    d = work / name
    if (d / "leandiff.json").is_file() and (d / "openvino.int8.xml").is_file():
        return load_checkpoint(d)
    if name == "mnist-tiny":
        base = load_checkpoint("zoo:mnist-tiny")
        ck = Checkpoint(base.net, base.arch, base.schedule, base.parameterization, {"dataset": "mnist"})
    else:
        arch = architecture(name)
        torch.manual_seed(0)
        ck = Checkpoint(build_network(arch).eval(), arch, load_checkpoint("zoo:mnist-tiny").schedule, "eps", {})
    cc = CalibConfig(collector="uniform", n=16, steps=2, batch_size=16)
    quantize_openvino_int8(ck, cc, d)
    q = quantize_ort_int8(ck, cc, d)
    save_checkpoint(q, d)
    return load_checkpoint(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/roofline")
    ap.add_argument("--models", default="mnist-tiny,mnist-small,cifar10-ddpm")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--large-batches", default="1,16", help="batch sizes for cifar10-ddpm (6 GMAC per image)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--rounds", type=int, default=3, help="alternating latency rounds")
    ap.add_argument("--results-name", default="roofline")
    a = ap.parse_args()
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    threads = [int(x) for x in a.threads.split(",")]
    runtimes = [r.strip() for r in re.split(r",(?![^()]*\))", a.runtimes)]  # commas inside NAME(k=v,...) stay
    t_start, load_start = time.time(), os.getloadavg()

    peak = {}
    for th in threads:
        peak[th] = peaks(th)
        print(f"peak, {th} thread(s): " + ", ".join(f"{f} {v['best']:.0f} GOP/s" for f, v in peak[th].items()), flush=True)

    rows = []
    for name in a.models.split(","):
        ck = prepare(name, work)
        shape = image_shape(ck.arch)
        macs = macs_per_image(ck.net, shape)
        batches = tuple(int(b) for b in (a.large_batches if name == "cifar10-ddpm" else a.batches).split(","))
        for th in threads:
            torch.set_num_threads(th)  # ORT and OpenVINO take their thread count from torch when built
            # a runtime that names a calibration is built on the fly (the checkpoint without its side files)
            nets = {r: runtime_network(replace(ck, path=None) if "calib=" in r else ck, r) for r in runtimes}
            lat = measure_latency(nets, shape, LatencyConfig(batch_sizes=batches, rounds=a.rounds, warmup=1))
            for r in runtimes:
                for b in batches:
                    ms = lat[r][b]["median_ms"]
                    gops = 2 * macs * b / (ms / 1e3) / 1e9
                    fmt = FORMAT[r.split("(")[0]]
                    rows.append({"model": name, "macs_per_image": macs, "runtime": r, "format": fmt, "threads": th,
                                 "batch": b, "median_ms": ms, "gops": gops, "fraction_of_peak": gops / peak[th][fmt]["best"]})
            print(name, f"{th} thread(s), batch {batches[-1]}, fraction of peak:",
                  {r["runtime"]: f"{r['fraction_of_peak']:.1%}" for r in rows[-len(runtimes) * len(batches):]
                   if r["batch"] == batches[-1]}, flush=True)
            del nets
    load_end, wall = os.getloadavg(), time.time() - t_start

    md = [f"# Roofline: achieved throughput per network evaluation as a fraction of this machine's peak\n",
          __doc__.split("\n\n", 2)[2].strip().replace("\n", " ") + "\n",
          "## Peak (GOP/s; 1 MAC = 2 ops)\n", "| threads | fp32 | bf16 | int8 |", "|---|---|---|---|"]
    for th in threads:
        md.append(f"| {th} | " + " | ".join(f"{peak[th][f]['best']:.0f}" for f in ("fp32", "bf16", "int8")) + " |")
    md.append("\nKernels: " + "; ".join(f"{th} thread(s) {f}: " + ", ".join(
        f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in peak[th][f]["kernels"].items())
        for th in threads for f in ("fp32", "bf16", "int8")) + ".\n")
    for name in a.models.split(","):
        sel = [r for r in rows if r["model"] == name]
        if not sel:
            continue
        batches = sorted({r["batch"] for r in sel})
        md += [f"## {name} ({sel[0]['macs_per_image'] / 1e9:.3f} GMAC per image)\n",
               "| threads | runtime | format | " + " | ".join(f"GOP/s @{b} (of peak)" for b in batches) + " | ms/eval @" + str(batches[-1]) + " |",
               "|---|---|---|" + "---|" * (len(batches) + 1)]
        for th in threads:
            for r in runtimes:
                cells = {x["batch"]: x for x in sel if x["threads"] == th and x["runtime"] == r}
                md.append(f"| {th} | {r} | {FORMAT[r.split('(')[0]]} | " + " | ".join(
                    f"{cells[b]['gops']:.0f} ({cells[b]['fraction_of_peak']:.1%})" for b in batches)
                    + f" | {cells[batches[-1]]['median_ms']:.2f} |")
        md.append("")
    best = {}
    for name in a.models.split(","):
        sel = [r for r in rows if r["model"] == name and r["batch"] == max(x["batch"] for x in rows if x["model"] == name)]
        for th in threads:
            s = [r for r in sel if r["threads"] == th]
            if s:
                top = min(s, key=lambda r: r["median_ms"])
                best[f"{name}, {th} thread(s), batch {top['batch']}"] = top
    md.append("Fastest runtime per model at its largest batch: " + "; ".join(
        f"{k}: {v['runtime']} {v['gops']:.0f} GOP/s = {v['fraction_of_peak']:.1%} of the {v['format']} peak" for k, v in best.items())
        + " (target of issue 21: ≥ 50 % of the peak of its format on the largest shipped base at batch 64).\n")
    md.append(f"Wall time {wall:.0f} s. Load average (1/5/15 min) at the start {', '.join(f'{x:.2f}' for x in load_start)}, "
              f"at the end {', '.join(f'{x:.2f}' for x in load_end)} (this 2-core machine is shared: other processes "
              f"lower the figures at 2 threads most).")
    text = "\n".join(md)
    print(text)
    write_results(a.results_name, {"peak": {str(k): v for k, v in peak.items()}, "rows": rows, "fastest": best,
                                   "loadavg_start": load_start, "loadavg_end": load_end, "wall_seconds": wall,
                                   "settings": vars(a)}, text)


if __name__ == "__main__":
    main()
