"""Where the int8 error of a diffusion UNet comes from, by noise level: the relative output error and the
mean output shift of each real int8 backend against fp32, per timestep bin (issue 21's quality work).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_int8_error.py --ckpt zoo:mnist-small-v2

Variants: ONNX Runtime QDQ int8 (leandiff's ``ort-int8``) and OpenVINO int8 by NNCF with its quantizers at
the GEMM inputs only or at NNCF's own places (``scope=gemm`` / ``nncf``), each with and without NNCF's fast
bias correction (``bias_correction``). All calibrated on the same 256 inputs (uniform collector, 20-step DDIM
trajectories, seed 0), measured on 256 held-out inputs of the same collector (seed 1). Per bin: the relative
error ‖int8 − fp32‖² / ‖fp32‖² and the mean of (int8 − fp32) over all output elements, a shift that a
static per-layer correction cannot follow when activation means move with t.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.compress.artifacts import calibration_inputs  # noqa: E402
from leandiff.compress.calibration import CalibConfig  # noqa: E402
from leandiff.compress.onnx import OrtNetwork, export_onnx, quantize_onnx_int8  # noqa: E402
from leandiff.compress.openvino import OvNetwork, convert, quantize_ir_int8  # noqa: E402
from leandiff.compress.sensitivity import outputs  # noqa: E402

BINS = ((0, 50), (50, 200), (200, 500), (500, 1000))
VARIANTS = {  # name -> (backend, scope, bias_correction)
    "ONNX Runtime QDQ": ("ort", "", False),
    "NNCF, GEMM inputs (leandiff's default)": ("openvino", "gemm", False),
    "NNCF, GEMM inputs, fast bias correction": ("openvino", "gemm", True),
    "NNCF's placement": ("openvino", "nncf", False),
    "NNCF's placement, fast bias correction (NNCF's defaults)": ("openvino", "nncf", True),
}


def errors(out, ref, ts) -> dict:
    """Overall and per-bin relative error and mean shift of ``out`` against ``ref``."""
    def one(m):
        e = out[m] - ref[m]
        return {"n": int(m.sum()), "rel_error": float((e ** 2).mean() / (ref[m] ** 2).mean()), "shift": float(e.mean())}
    return {"all": one(ts >= 0), **{f"{lo}-{hi}": one((ts >= lo) & (ts < hi)) for lo, hi in BINS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="zoo:mnist-small-v2")
    ap.add_argument("--n", type=int, default=256, help="calibration and held-out inputs")
    ap.add_argument("--results-name", default="int8_error")
    a = ap.parse_args()
    ck = load_checkpoint(a.ckpt)
    cc = CalibConfig(collector="uniform", n=a.n, steps=20)
    calib = calibration_inputs(ck, cc, None)
    xs, ts = calibration_inputs(ck, replace(cc, seed=1), None)
    ref = outputs(ck.net.float().eval(), xs, ts)
    res = {}
    with tempfile.TemporaryDirectory(prefix="leandiff-int8-error-") as d:
        fp32, model = export_onnx(ck, Path(d) / "fp32.onnx"), convert(ck)
        for i, (name, (backend, scope, bc)) in enumerate(VARIANTS.items()):
            if backend == "ort":
                net = OrtNetwork(quantize_onnx_int8(fp32, Path(d) / f"{i}.onnx", calib))
            else:
                net = OvNetwork(quantize_ir_int8(model, Path(d) / f"{i}.xml", calib, scope=scope, bias_correction=bc))
            res[name] = errors(outputs(net, xs, ts), ref, ts)
            print(f"{name:58s} rel {res[name]['all']['rel_error']:.2e}  shift at t<50 {res[name]['0-50']['shift']:+.1e}", flush=True)
    cols = ["all"] + [f"{lo}-{hi}" for lo, hi in BINS]
    n = {c: res[next(iter(res))][c]["n"] for c in cols}
    md = (f"# int8 error by noise level ({a.ckpt})\n\n" + __doc__.split("\n\n", 2)[2].strip().replace("\n", " ") + "\n\n"
          "Relative error (mean shift) per timestep bin; held-out inputs per bin: " + ", ".join(f"{c} {n[c]}" for c in cols) + ".\n\n"
          "| variant | " + " | ".join(f"t {c}" if c != "all" else "all t" for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
          + "\n".join(f"| {name} | " + " | ".join(f"{r[c]['rel_error']:.2e} ({r[c]['shift']:+.1e})" for c in cols) + " |"
                      for name, r in res.items()))
    print(md)
    write_results(a.results_name, {"variants": {k: {"backend": v[0], "scope": v[1], "bias_correction": v[2]} for k, v in VARIANTS.items()},
                                   "errors": res, "settings": vars(a)}, md)


if __name__ == "__main__":
    main()
