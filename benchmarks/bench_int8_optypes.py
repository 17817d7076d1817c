"""Which ONNX operation types pay in int8 (issue 21's speed work): ONNX Runtime QDQ int8 of one model with
Conv/MatMul/Gemm quantized (leandiff's choice), and with the elementwise operations of the UNet's residual
blocks (Add; Add, Mul and Sigmoid, i.e. SiLU = x·σ(x) and the residual sums) quantized too.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_int8_optypes.py --ckpt zoo:mnist-small-v2 --keep down_blocks.0+up_blocks.2

For each: the relative output error against fp32 on held-out calibration inputs (uniform collector, seed 1,
64 inputs; calibration: 256 inputs from 20-step DDIM trajectories) and the per-evaluation latency at batch 64
of all variants and torch fp32 eager in one ``measure_latency`` run (alternating rounds, median).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.compress.artifacts import calibration_inputs  # noqa: E402
from leandiff.compress.calibration import CalibConfig  # noqa: E402
from leandiff.compress.onnx import OrtNetwork, export_onnx, quantize_onnx_int8  # noqa: E402
from leandiff.compress.sensitivity import outputs, relative_error  # noqa: E402
from leandiff.cost import LatencyConfig, measure_latency  # noqa: E402
from leandiff.models import image_shape  # noqa: E402
from leandiff.surgery.quant import check_keep, parse_keep  # noqa: E402

BASE = ("Conv", "MatMul", "Gemm")
VARIANTS = {"Conv, MatMul, Gemm (leandiff)": BASE, "+ Add": BASE + ("Add",), "+ Add, Mul, Sigmoid": BASE + ("Add", "Mul", "Sigmoid")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="zoo:mnist-small-v2")
    ap.add_argument("--keep", default="down_blocks.0+up_blocks.2", help="modules kept out of int8 in every variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results-name", default="int8_optypes")
    a = ap.parse_args()
    ck = load_checkpoint(a.ckpt)
    keep = parse_keep(a.keep)
    check_keep(ck.net, keep)
    calib = calibration_inputs(ck, CalibConfig(collector="uniform", n=256, steps=20))
    xs, ts = calibration_inputs(ck, CalibConfig(collector="uniform", n=64, steps=20, seed=1))
    ref = outputs(ck.net.float().eval(), xs, ts)
    nets, errors = {"torch fp32 eager": ck.net.float().eval()}, {}
    with tempfile.TemporaryDirectory(prefix="leandiff-optypes-") as d:
        fp32 = export_onnx(ck, Path(d) / "fp32.onnx")
        for i, (name, ops) in enumerate(VARIANTS.items()):
            nets[name] = OrtNetwork(quantize_onnx_int8(fp32, Path(d) / f"{i}.onnx", calib, keep=keep, op_types=ops))
            errors[name] = relative_error(nets[name], ref, xs, ts)
            print(f"{name:32s} relative error {errors[name]:.2e}", flush=True)
        lat = measure_latency(nets, image_shape(ck.arch), LatencyConfig(batch_sizes=(64,), rounds=a.rounds))
    eager = lat["torch fp32 eager"][64]["median_ms"]
    rows = [f"| {name} | {errors[name]:.2e} | {lat[name][64]['median_ms']:.1f} | {eager / lat[name][64]['median_ms']:.2f}× |"
            for name in VARIANTS]
    md = (f"# int8 operation types (ONNX Runtime QDQ, {a.ckpt}, keep={a.keep}, batch 64, {torch.get_num_threads()} thread(s))\n\n"
          + __doc__.split("\n\n")[2].replace("\n", " ") + "\n\n"
          "| quantized operation types | relative output error | ms/eval | × torch fp32 eager |\n|---|---|---|---|\n"
          + "\n".join(rows) + f"\n\ntorch fp32 eager: {eager:.1f} ms/eval.")
    print(md)
    write_results(a.results_name, {"errors": errors, "latency": lat, "settings": vars(a)}, md)


if __name__ == "__main__":
    main()
