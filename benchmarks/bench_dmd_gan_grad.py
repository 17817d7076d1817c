"""How strong DMD2's GAN term is against the DM term on the generator's weights: from a DMD run's saved
training state (generator, fake network, discriminator head), one batch, the norm of the gradient of the
GAN term per unit weight against the DM term's, and their cosine. The fake network is left as saved.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dmd_gan_grad.py --teacher zoo:mnist-tiny-v2 \\
        --run "gan=0.003, 1000 updates=runs/dmd-v2gan1" --run "gan=0.1=runs/dmd-v2gan100"

``--run LABEL=DIR`` (the last ``=`` splits): a ``dmd(gan=...)`` output directory whose ``.steps/00-dmd/student``
keeps its training state (the state at the update the run stopped or ended). The GAN gradient is the difference of two losses that share every random draw (gan = 2 and 1), so
it is exact; the DM gradient is the gan = 1 loss's minus it (reg is set to 0 for the measurement).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402
from leandiff.checkpoint import load_checkpoint  # noqa: E402
from leandiff.errors import UserError  # noqa: E402
from leandiff.compress.dmd import DMDConfig, DMDLoss  # noqa: E402
from leandiff.denoiser import Denoiser  # noqa: E402
from leandiff.io import read_json  # noqa: E402
from leandiff.recipe import parse_recipe  # noqa: E402
from leandiff.train import STATE_NAME  # noqa: E402


def measure(teacher_ck, run: Path, batch: int, seed: int) -> dict:
    step = run / ".steps" / "00-dmd" / "student"
    st = load_checkpoint(step)
    tensors = load_file(step / STATE_NAME)
    gan = float(parse_recipe(read_json(step.parent / "started.json")["recipe"][-1])[-1].args["gan"])
    student = Denoiser(st.net.float().train(), st.schedule, st.parameterization)
    student.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    teacher = Denoiser(copy.deepcopy(teacher_ck.net).float().eval().requires_grad_(False), teacher_ck.schedule,
                       teacher_ck.parameterization)
    net_cfg = teacher_ck.arch["config"]
    shape = (batch, net_cfg["in_channels"], net_cfg["sample_size"], net_cfg["sample_size"])  # real images: unused at lr 0
    grads = {}
    for w in (1.0, 2.0):
        loss = DMDLoss(teacher, copy.deepcopy(teacher_ck.net).float(), torch.zeros(0), DMDConfig(gan=w, reg=0.0), 0.0)
        loss.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})
        for group in loss.opt.param_groups:
            group["lr"] = 0.0  # the fake network and head stay as saved
        student.net.zero_grad(set_to_none=True)
        loss(student, torch.zeros(shape), torch.Generator().manual_seed(seed)).backward()
        grads[w] = torch.cat([p.grad.flatten() for p in student.net.parameters()])
    g_gan = grads[2.0] - grads[1.0]
    g_dm = grads[1.0] - g_gan
    ratio = (g_gan.norm() / g_dm.norm()).item()
    return {"dm_norm": g_dm.norm().item(), "gan_norm_per_unit": g_gan.norm().item(), "ratio_per_unit": ratio,
            "run_gan": gan, "share_at_run_gan": ratio * gan,
            "cosine": (g_gan @ g_dm / (g_gan.norm() * g_dm.norm())).item(),
            "updates": int((st.meta.get("train") or {}).get("completed_steps") or 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--run", action="append", required=True, help="LABEL=DIR")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-name", default="dmd_gan_grad")
    a = ap.parse_args()
    torch.manual_seed(0)
    try:
        teacher = load_checkpoint(a.teacher)
        rows = []
        for spec in a.run:
            label, _, path = spec.rpartition("=")
            r = {"label": label, "run": path, **measure(teacher, Path(path), a.batch, a.seed)}
            rows.append(r)
            print(r)
    except UserError as e:
        sys.exit(f"bench_dmd_gan_grad: {e}")
    lines = ["# DMD2's GAN term against the DM term: gradient norms on the generator's weights", "",
             f"One batch of {a.batch} (seed {a.seed}) from each run's saved training state; teacher `{a.teacher}`.", "",
             "| run | updates | ‖∇ DM‖ | ‖∇ GAN‖ per unit weight | ratio per unit weight | GAN share at the run's weight | cosine |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{100 * r['share_at_run_gan']:.0f} %"
        lines.append(f"| {r['label']} | {r['updates']} | {r['dm_norm']:.3f} | {r['gan_norm_per_unit']:.3f} | "
                     f"{r['ratio_per_unit']:.2f} | {share} | {r['cosine']:.2f} |")
    write_results(a.results_name, {"teacher": a.teacher, "batch": a.batch, "seed": a.seed, "rows": rows},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
