"""Shared fixtures: tiny models and tiny synthetic data; nothing is downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A 16×16 grey UNet2DModel with ~20k parameters: fast enough to train for a few steps in a test.
TINY_UNET = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                 block_out_channels=[8, 16], norm_num_groups=4, attention_head_dim=None,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D", "UpBlock2D"])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: thread hand-offs cost more than the maths
    (and a training may hold the other core). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_arch() -> dict:
    return {"type": "diffusers.UNet2DModel", "config": dict(TINY_UNET)}


@pytest.fixture
def tiny_ckpt(tiny_arch):
    from leandiff.checkpoint import Checkpoint
    from leandiff.models import build_network
    from leandiff.schedule import Schedule

    torch.manual_seed(0)
    return Checkpoint(net=build_network(tiny_arch).eval(), arch=tiny_arch, schedule=Schedule("linear"),
                      meta={"dataset": "test"})


def saved_mnist_unet(out: Path, sample_size: int = 28, timesteps: int | None = 100) -> str:
    """An untrained two-block UNet marked as an MNIST model (the shipped classifier scores it), saved to
    ``out``: for the tests that need a checkpoint path. ``timesteps`` None: the default schedule length."""
    from leandiff.checkpoint import Checkpoint, save_checkpoint
    from leandiff.models import UNET, build_network
    from leandiff.schedule import Schedule

    arch = {"type": UNET, "config": dict(sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
                                         block_out_channels=[8, 16], norm_num_groups=4,
                                         down_block_types=["DownBlock2D", "DownBlock2D"],
                                         up_block_types=["UpBlock2D", "UpBlock2D"])}
    torch.manual_seed(0)
    schedule = Schedule("linear") if timesteps is None else Schedule("linear", timesteps)
    ck = Checkpoint(net=build_network(arch).eval(), arch=arch, schedule=schedule, meta={"dataset": "mnist"})
    return str(save_checkpoint(ck, out))


@pytest.fixture
def tiny_model_json(tmp_path) -> Path:
    p = tmp_path / "tiny_unet.json"
    p.write_text(json.dumps(TINY_UNET))
    return p


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """40 random 20×20 RGB PNGs of blobs: the folder loader must convert and resize them."""
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20]
    for i in range(40):
        cy, cx = rng.integers(4, 16, size=2)
        blob = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12.0)).astype(np.uint8)
        Image.fromarray(np.stack([blob] * 3, axis=-1)).save(d / f"img_{i:03d}.png")
    return d


def run_cli(*args, check=False, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``python -m leandiff.cli ARGS`` in a subprocess and capture its output."""
    e = dict(os.environ, PYTHONHASHSEED="0", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "leandiff.cli", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=cwd, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"leandiff {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p
