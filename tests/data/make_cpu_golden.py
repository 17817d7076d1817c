"""Write tests/data/cpu_golden.json (sha256 of CPU samples and of a few training steps' weights on a tiny
model) and, beside it, cpu_golden.safetensors (the same tensors), with the code on PYTHONPATH. Run it with
main's code from before devices existed (commit 87f1424; the golden is the CPU behaviour leandiff must
keep), from a directory that is not a checkout, e.g.

    git worktree add ../predev 87f1424
    cd /tmp && PYTHONPATH=../predev OMP_NUM_THREADS=1 python .../tests/data/make_cpu_golden.py .../tests/data/cpu_golden.json

The hashes are equal only on the same kind of CPU (float kernels differ between CPU models: a golden
written on an Intel Xeon does not hash equal on an AMD EPYC), so the test compares the tensors within
float tolerance and the hashes only where the golden's CPU is this one.

tests/test_device.py recomputes the same figures with the code under test. Uses only API that both the
old and the new code have."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import torch

TINY_UNET = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                 block_out_channels=[8, 16], norm_num_groups=4, attention_head_dim=None,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D", "UpBlock2D"])
SOLVERS = {"ddim": 8, "ddpm": 8, "dpmpp-2m": 6, "dpmpp-3m-sde": 6, "euler-maruyama": 6, "ams-ddpm": 6, "heun": 6}


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def tiny_checkpoint():
    from leandiff.checkpoint import Checkpoint
    from leandiff.models import build_network
    from leandiff.schedule import Schedule

    arch = {"type": "diffusers.UNet2DModel", "config": dict(TINY_UNET)}
    torch.manual_seed(0)
    return Checkpoint(net=build_network(arch).eval(), arch=arch, schedule=Schedule("linear"), meta={"dataset": "test"})


def samples() -> dict:
    from leandiff.denoiser import Denoiser
    from leandiff.sample import SampleConfig, sample_all

    ck = tiny_checkpoint()
    d = Denoiser(ck.net, ck.schedule, ck.parameterization)
    return {name: sample_all(d, (1, 16, 16), SampleConfig(solver=name, nfe=nfe, n=3, batch_size=2, seed=5))
            for name, nfe in SOLVERS.items()}


def training() -> str:
    from leandiff.train import TrainConfig, train

    ck = tiny_checkpoint()
    images = torch.randn(24, 1, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup=1, sample_every=0, checkpoint_every=3, seed=2)
    with tempfile.TemporaryDirectory() as out:
        done = train(cfg, out, init=ck, images=images, progress=False)
    state = done.net.state_dict()
    return torch.cat([state[k].flatten().float() for k in sorted(state)])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def tensors() -> dict[str, torch.Tensor]:
    """The golden's tensors: one sample batch per solver ("samples.NAME") and the trained weights ("train")."""
    torch.set_num_threads(1)
    return {**{f"samples.{k}": v for k, v in samples().items()}, "train": training()}


def golden(t: dict[str, torch.Tensor] | None = None) -> dict:
    t = tensors() if t is None else t
    return {"torch": torch.__version__, "cpu": cpu_name(),
            "samples": {k[len("samples."):]: sha(v) for k, v in t.items() if k.startswith("samples.")},
            "train": sha(t["train"])}


if __name__ == "__main__":
    from safetensors.torch import save_file

    t = tensors()
    rec = golden(t)
    rec["made_with"] = "leandiff main before device support, commit 87f1424 (tests/data/make_cpu_golden.py)"
    with open(sys.argv[1], "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in t.items()}, sys.argv[1].replace(".json", ".safetensors"))
    print(json.dumps(rec, indent=1))
