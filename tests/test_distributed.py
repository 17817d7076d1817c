"""Scale: ``leandiff eval`` under torchrun (2 CPU processes, gloo) shards the sampling and gathers
the features on rank 0; the row equals the single-process row on the same protocol."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, saved_mnist_unet


@pytest.fixture(scope="module")
def mnist_ckpt(tmp_path_factory):
    return saved_mnist_unet(tmp_path_factory.mktemp("ck") / "tiny")


def _eval_args(ckpt, out):
    # 40 images in batches of 16: three batches (16, 16, 8), so the ranks get unequal shares
    return ["eval", ckpt, "--solver", "ddim", "--nfe", "3", "--eta", "1", "-n", "40", "--batch-size", "16",
            "--seed", "5", "--no-latency", "--out", out]


def test_sharded_eval_equals_single_process(mnist_ckpt, tmp_path):
    single, sharded = tmp_path / "single.jsonl", tmp_path / "sharded.jsonl"
    run_cli(*_eval_args(mnist_ckpt, single), check=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run([*torchrun, "-m", "leandiff.cli", *_eval_args(mnist_ckpt, sharded)], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| FID-dom |") == 1  # rank 0 alone prints and writes the row
    (a,), (b,) = ([json.loads(x) for x in f.read_text().splitlines()] for f in (single, sharded))
    assert a["protocol"]["processes"] == 1 and b["protocol"]["processes"] == 2
    for k in ("fid_dom", "kid", "kid_std", "precision", "recall", "is", "mse", "confidence", "label_entropy"):
        assert abs(a["quality"][k] - b["quality"][k]) <= 1e-6 * max(1.0, abs(a["quality"][k])), k
    assert a["quality"]["label_hist"] == b["quality"]["label_hist"]
    assert b["cost"]["nfe_used"] == 3
    # the grid (first 64 samples, i.e. all 40, from both ranks) is the same picture
    ga, gb = (np.asarray(Image.open(tmp_path / r["grid"])) for r in (a, b))
    assert ga.shape == gb.shape and (ga == gb).all()


def test_finetune_and_progressive_distillation_run_under_torchrun(tiny_ckpt, image_folder, tmp_path):
    """``leandiff compress`` (fine-tune, then progressive distillation) under 2 gloo processes:
    both steps train with DDP (world size 2 recorded) and the result is a valid checkpoint."""
    from leandiff.checkpoint import load_checkpoint, save_checkpoint

    tiny_ckpt.meta["dataset"] = f"folder:{image_folder}"
    base = save_checkpoint(tiny_ckpt, tmp_path / "base")
    recipe = "finetune(steps=4,batch_size=8,bf16=false) > pd(from=4,to=2,steps_per_round=4,convert_steps=4,batch_size=8)"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run([*torchrun, "-m", "leandiff.cli", "compress", str(base), "--recipe", recipe,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0"))
    # a crash of one rank shows up on the others as a gloo error at the next barrier: keep every rank's own lines
    assert p.returncode == 0, "\n".join(ln for ln in p.stderr.splitlines() if "[rank1]" in ln)[-3000:] + p.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "out")
    assert [s["step"] for s in ck.lineage] == ["finetune", "pd"]
    assert ck.meta["train"]["world_size"] == 2 and ck.meta["sampler"]["nfe"] == 2
    ft = load_checkpoint(tmp_path / "out" / ".steps" / "00-finetune")
    assert ft.meta["train"]["world_size"] == 2
