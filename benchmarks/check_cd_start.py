"""Where consistency distillation starts: the student's x̂₀ before any update against its teacher's, for the
``cm`` over the teacher's parameterization (what ``cd`` builds) and for App. C's reading of the same network
as F (the first version), at a few timesteps. Max |Δx̂₀| over a batch of pure-noise inputs (data in [−1, 1]).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/check_cd_start.py --teacher zoo:mnist-tiny-v2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402
from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.compress.consistency import CDConfig, discretisation, student_parameterization  # noqa: E402
from leandiff.denoiser import Denoiser  # noqa: E402
from leandiff.models import image_shape  # noqa: E402

TS = (5.0, 300.0, 900.0, 999.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="zoo:mnist-tiny-v2")
    a = ap.parse_args(argv)
    ck = load_checkpoint(a.teacher)
    lo, _, _ = discretisation(ck.schedule, CDConfig(sigma_max=80.0))
    net = ck.net.eval()
    teacher = Denoiser(net, ck.schedule, ck.parameterization)
    forms = {"cm over the teacher's parameterization": student_parameterization(ck.parameterization, lo),
             "App. C's F (first version)": f"cm(sigma_data=0.5,sigma_min={lo!r})"}
    x = torch.randn(16, *image_shape(ck.arch), generator=torch.Generator().manual_seed(0))
    figures = {}
    with torch.no_grad():
        for label, param in forms.items():
            d = Denoiser(net, ck.schedule, param)
            figures[label] = {str(t): (d.x0(x, t) - teacher.x0(x, t)).abs().max().item() for t in TS}
    lines = [f"# Where CD starts on `{a.teacher}` ({ck.parameterization}): max |x̂₀ − teacher's x̂₀| before any update", "",
             "| student form | " + " | ".join(f"t = {t:g}" for t in TS) + " |", "|---|" + "---|" * len(TS)]
    for label, row in figures.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.2e}" for v in row.values()) + " |")
    print("\n".join(lines))
    write_results("cd_start", {"teacher": a.teacher, "max_abs_x0_difference": figures}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
