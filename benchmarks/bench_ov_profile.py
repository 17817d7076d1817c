"""Where an OpenVINO model's time goes (issue 21): OpenVINO's per-node performance counters
(``PERF_COUNT``), summed by node type and kernel, for one network evaluation at a fixed batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ov_profile.py --ckpt zoo:mnist-small-v2 \\
        --runtime 'openvino-int8(calib=uniform,bf16=true)' --batch 64

The roofline (``bench_roofline.py``) says what fraction of the int8 peak a whole evaluation reaches; this
splits it: the time in the GEMM nodes (Convolution, MatMul, FullyConnected and the subgraphs OpenVINO fused
into them) and what those reach of the same peak, against the time in everything else (normalisation,
activations, layout reorders, concatenation, quantize/dequantize). Counters are summed over ``--calls``
inferences after ``--warmup``; the CPU plugin reports each node's real time in microseconds.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.cost import machine_load, macs_per_image  # noqa: E402
from leandiff.errors import UserError  # noqa: E402
from leandiff.models import image_shape  # noqa: E402
from leandiff.runtime import runtime_network  # noqa: E402

GEMM_TYPES = {"Convolution", "MatMul", "FullyConnected", "FullyConnectedQuantizedLegacy", "GroupConvolution",
              "Deconvolution"}


def profile(net, x: torch.Tensor, t: torch.Tensor, warmup: int, calls: int) -> list[dict]:
    """Per-node counters of ``net`` (an OvNetwork) summed over ``calls`` inferences: name, type, kernel,
    microseconds."""
    if not hasattr(net, "config") or not hasattr(net, "_request"):
        raise UserError("the runtime is not an OpenVINO one (openvino, openvino-bf16, openvino-int8)")
    net.config["PERF_COUNT"] = True
    net.requests.clear()
    for _ in range(warmup):
        net(x, t)
    request = net._request(tuple(x.shape))
    total: dict[tuple, float] = defaultdict(float)
    for _ in range(calls):
        net(x, t)
        for p in request.profiling_info:
            if str(p.status).endswith("EXECUTED"):
                total[(p.node_name, p.node_type, p.exec_type)] += p.real_time.total_seconds() * 1e6
    return [{"node": n, "type": ty, "kernel": k, "us": us / calls} for (n, ty, k), us in total.items()]


def precision_of(kernel: str) -> str:
    k = kernel.upper()
    for tag in ("I8", "U8", "BF16", "F32"):
        if k.endswith("_" + tag) or f"_{tag}_" in k:
            return {"U8": "int8", "I8": "int8", "BF16": "bf16", "F32": "fp32"}[tag]
    return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="zoo:mnist-small-v2")
    ap.add_argument("--runtime", default="openvino-int8(calib=uniform,bf16=true)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--peak", type=float, default=None,
                    help="the peak of the runtime's number format in GOP/s at this thread count (default: "
                         "bench_roofline.py's, read from benchmarks/results/roofline.json)")
    ap.add_argument("--results-name", default="ov_profile")
    a = ap.parse_args()
    threads = torch.get_num_threads()
    fmt = "int8" if a.runtime.startswith("openvino-int8") else "bf16" if a.runtime.startswith("openvino-bf16") else "fp32"
    peak = a.peak
    if peak is None:
        from leandiff.io import read_json

        roof = Path(__file__).resolve().parent / "results" / "roofline.json"
        try:
            peak = float(read_json(roof)["peak"][str(threads)][fmt]["best"])
        except (OSError, KeyError, TypeError, ValueError):
            raise UserError(f"{roof}: no {fmt} peak for {threads} thread(s); pass --peak") from None
    ck = load_checkpoint(a.ckpt)
    shape = image_shape(ck.arch)
    net = runtime_network(ck, a.runtime)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, *shape, generator=g)
    t = torch.full((a.batch,), 500.0)
    nodes = profile(net, x, t, a.warmup, a.calls)
    load = machine_load()
    macs = macs_per_image(ck.net, shape) * a.batch
    total = sum(n["us"] for n in nodes)
    gemm_us = sum(n["us"] for n in nodes if n["type"] in GEMM_TYPES)
    by: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    for n in nodes:
        key = (n["type"], n["kernel"])
        by[key][0] += n["us"]
        by[key][1] += 1
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])
    whole = 2 * macs / (total * 1e-6) / 1e9
    in_gemm = 2 * macs / (gemm_us * 1e-6) / 1e9
    gemm_prec = defaultdict(float)
    for n in nodes:
        if n["type"] in GEMM_TYPES:
            gemm_prec[precision_of(n["kernel"])] += n["us"]
    md = [f"# Where the time goes: {a.ckpt}, runtime {a.runtime}, batch {a.batch}, {threads} thread(s)\n",
          f"OpenVINO per-node counters (PERF_COUNT), mean of {a.calls} inferences after {a.warmup} warm-up calls. "
          f"Sum of node times {total / 1e3:.2f} ms per evaluation; {2 * macs / 1e9:.1f} GOP (2 × MACs, "
          f"FlopCounterMode on the PyTorch network). 1-minute load average {load['loadavg_1m']:.2f} on "
          f"{load['cores']} cores.\n",
          f"- Whole evaluation (sum of node times): **{whole:.0f} GOP/s = {whole / peak:.1%}** of the {fmt} peak "
          f"({peak:.0f} GOP/s, bench_roofline.py).",
          f"- GEMM nodes alone ({', '.join(sorted(GEMM_TYPES & {n['type'] for n in nodes}))}; with what OpenVINO "
          f"fused into them): {gemm_us / total:.1%} of the time; all MACs in that time = **{in_gemm:.0f} GOP/s = "
          f"{in_gemm / peak:.1%}** of the peak. GEMM time by kernel precision: "
          + ", ".join(f"{k} {v / gemm_us:.0%}" for k, v in sorted(gemm_prec.items(), key=lambda kv: -kv[1])) + ".",
          f"- Everything else: {1 - gemm_us / total:.1%} of the time ({(total - gemm_us) / 1e3:.2f} ms). If it took "
          f"none, the evaluation would reach {in_gemm / peak:.1%} of the peak; "
          + (f"to reach 50 % with today's GEMM kernels it may take at most "
             f"{(2 * macs / (0.5 * peak * 1e9) - gemm_us * 1e-6) * 1e3:.2f} ms.\n" if in_gemm >= 0.5 * peak else
             "50 % is out of reach of today's GEMM kernels alone.\n"),
          "| node type | kernel | nodes | ms per evaluation | share |", "|---|---|---|---|---|"]
    md += [f"| {ty} | {k} | {c} | {us / 1e3:.3f} | {us / total:.1%} |" for (ty, k), (us, c) in rows if us / total >= 0.002]
    small = sum(us for (_, _), (us, _) in rows if us / total < 0.002)
    md.append(f"| (each under 0.2 %) | | | {small / 1e3:.3f} | {small / total:.1%} |")
    text = "\n".join(md) + "\n"
    print(text)
    write_results(a.results_name, {"total_us": total, "gemm_us": gemm_us, "gops_whole": whole, "gops_in_gemm": in_gemm,
                                   "format": fmt, "peak": peak, "macs": macs, "threads": threads, "load": load, "settings": vars(a),
                                   "by_type": [{"type": ty, "kernel": k, "nodes": c, "us": us} for (ty, k), (us, c) in rows],
                                   "nodes": nodes}, text)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"bench_ov_profile: {e}")
