import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leandiff.checkpoint import load_checkpoint
from leandiff.errors import UserError
from leandiff.train import DiffusionLoss, TrainConfig, lr_at

from conftest import ROOT, run_cli


def _train_args(image_folder, model_json, out, steps=60):
    return ["train", "--dataset", f"folder:{image_folder}", "--model", model_json, "--steps", steps,
            "--batch-size", 16, "--checkpoint-every", 5, "--sample-every", 0, "--warmup", 5, "--seed", 3,
            "--out", out]


def _weights(out: Path) -> str:
    return json.loads((out / "leandiff.json").read_text())["weights_sha"]


def _saved_step(out: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(out / "train_state.safetensors"), framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:
        return -1


def test_sigkilled_run_resumes_to_identical_weights(image_folder, tiny_model_json, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_cli(*_train_args(image_folder, tiny_model_json, ref), check=True)

    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "leandiff.cli", *map(str, _train_args(image_folder, tiny_model_json, run))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while _saved_step(run) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _saved_step(run)
    assert proc.returncode == -signal.SIGKILL and 10 <= killed_at < 60, (proc.returncode, killed_at)

    r = run_cli(*_train_args(image_folder, tiny_model_json, run), "--resume", check=True)
    assert _weights(run) == _weights(ref)
    ck = load_checkpoint(run)
    assert ck.meta["train"]["completed_steps"] == 60 and ck.lineage[-1]["step"] == "train"


def test_resume_refuses_changed_settings(image_folder, tiny_model_json, tmp_path):
    out = tmp_path / "run"
    run_cli(*_train_args(image_folder, tiny_model_json, out, steps=5), check=True)
    args = _train_args(image_folder, tiny_model_json, out, steps=10)
    args[args.index("--seed") + 1] = 4
    r = run_cli(*args, "--resume")
    assert r.returncode == 2 and "seed" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_cli_writes_grid_and_npz(image_folder, tiny_model_json, tmp_path):
    out = tmp_path / "run"
    run_cli(*_train_args(image_folder, tiny_model_json, out, steps=5), check=True)
    for solver, nfe in (("ddpm", 20), ("ddim", 5)):
        r = run_cli("sample", out, "--solver", solver, "--nfe", nfe, "-n", 6, "--seed", 1,
                    "--out", tmp_path / solver, check=True)
        assert f"NFE {nfe} per sample" in r.stdout and "images/s" in r.stdout
        import numpy as np
        imgs = np.load(tmp_path / solver / "samples.npz")["images"]
        assert imgs.shape == (6, 16, 16, 1) and imgs.dtype == np.uint8
        assert (tmp_path / solver / "grid.png").stat().st_size > 0
    info = run_cli("info", out, "--json", check=True)
    rec = json.loads(info.stdout)
    assert rec["params"] > 0 and rec["macs_per_image"] > 0 and rec["lineage"][0]["step"] == "train"


@pytest.mark.parametrize("param,weighting", [("eps", "plain"), ("v", "plain"), ("x0", "truncated-snr"),
                                             ("eps", "snr+1")])
def test_objectives_and_weightings_train(tiny_ckpt, param, weighting):
    """A few steps of each objective lower the loss on a fixed batch (the loop learns)."""
    from leandiff.denoiser import Denoiser

    tiny_ckpt.parameterization = param
    torch.manual_seed(0)
    x0 = torch.randn(8, 1, 16, 16).clamp(-1, 1)
    d = Denoiser(tiny_ckpt.net.train(), tiny_ckpt.schedule, param)
    loss_fn = DiffusionLoss(weighting)
    opt = torch.optim.Adam(tiny_ckpt.net.parameters(), lr=3e-3)
    losses = []
    for i in range(30):
        loss = loss_fn(d, x0, torch.Generator().manual_seed(i % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-6:]) < sum(losses[:6])


def test_snr_plus_one_weighting_equals_v_mse(tiny_ckpt):
    """(SNR + 1)·‖x₀ − x̂₀‖² is the v-MSE (Salimans & Ho 2022, §4)."""
    from leandiff.denoiser import Denoiser

    d = Denoiser(tiny_ckpt.net, tiny_ckpt.schedule, "v")
    x0 = torch.randn(4, 1, 16, 16)
    a = DiffusionLoss("snr+1")(d, x0, torch.Generator().manual_seed(0))
    b = DiffusionLoss("plain")(d, x0, torch.Generator().manual_seed(0))
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


def test_x0_weight_adds_the_inverse_snr_weighted_eps_error(tiny_ckpt):
    """For an ε-model λ·‖x₀ − x̂₀‖² = λ/SNR·‖ε − ε̂‖²: the loss equals the per-sample sum computed by hand."""
    from leandiff.denoiser import Denoiser
    from leandiff.schedule import log_snr, q_sample

    d = Denoiser(tiny_ckpt.net, tiny_ckpt.schedule, "eps")
    x0 = torch.randn(6, 1, 16, 16).clamp(-1, 1)
    got = DiffusionLoss("plain", x0_weight=0.01)(d, x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the loss's own draws, in its order
    t = torch.randint(0, d.schedule.T, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        err = (d(q_sample(d.schedule, x0, t, noise), t) - noise).pow(2).flatten(1).mean(1)
    inv_snr = (-log_snr(d.schedule, t)).exp()
    want = err.mean() + 0.01 * (inv_snr * err).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert got.item() > DiffusionLoss("plain")(d, x0, torch.Generator().manual_seed(3)).item()
    with pytest.raises(UserError, match="x0_weight adds to the plain loss only"):
        TrainConfig(weighting="snr+1", x0_weight=0.1)


def test_lr_schedule_shapes():
    cfg = TrainConfig(steps=1000, warmup=100, lr=1.0, min_lr_frac=0.0)
    assert lr_at(cfg, 0) == pytest.approx(0.01) and lr_at(cfg, 99) == pytest.approx(1.0)
    assert lr_at(cfg, 999) < 1e-4
    r = TrainConfig(steps=1000, warmup=0, lr=1.0, min_lr_frac=0.0, lr_schedule="cosine-restarts", restart_period=300)
    assert lr_at(r, 0) == pytest.approx(1.0) and lr_at(r, 300) == pytest.approx(1.0) and lr_at(r, 299) < 1e-3


DDP_WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import TINY_UNET
from leandiff.checkpoint import Checkpoint
from leandiff.models import build_network
from leandiff.schedule import Schedule
from leandiff.train import TrainConfig, train
from leandiff.checkpoint import weights_hash
arch = {{"type": "diffusers.UNet2DModel", "config": TINY_UNET}}
torch.manual_seed(0)
ck = Checkpoint(net=build_network(arch), arch=arch, schedule=Schedule("linear"))
images = torch.rand(64, 1, 16, 16) * 2 - 1
cfg = TrainConfig(steps=6, batch_size=16, warmup=2, sample_every=0, checkpoint_every=3)
train(cfg, {out!r}, init=ck, images=images, progress=False)
rank = dist.get_rank()
open({out!r} + f"/rank{{rank}}.txt", "w").write(weights_hash(ck.net.state_dict()))
"""


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    p = subprocess.run([*torchrun, str(script)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    h0, h1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert h0 == h1
    # rank 0 wrote the checkpoint, and it trained on both ranks' halves of the batch
    assert load_checkpoint(tmp_path).meta["train"]["world_size"] == 2


def test_resuming_a_finished_run_returns_what_it_wrote(tiny_ckpt, tmp_path):
    import copy

    from leandiff.train import train

    images = torch.rand(8, 1, 16, 16) * 2 - 1
    cfg = TrainConfig(steps=3, batch_size=4, warmup=1, checkpoint_every=3, sample_every=0)
    first = train(cfg, tmp_path, init=copy.deepcopy(tiny_ckpt), images=images, progress=False)
    again = train(cfg, tmp_path, init=copy.deepcopy(tiny_ckpt), images=images, resume=True, progress=False)
    assert first.meta["train"]["completed_steps"] == 3
    assert again.meta["train"] == first.meta["train"] and again.lineage == first.lineage
    assert again.hash() == first.hash()


def test_sample_and_eval_default_to_the_recorded_spacing(tiny_ckpt):
    tiny_ckpt.meta["sampler"] = {"solver": "ddim", "nfe": 2, "spacing": "trailing"}
    assert tiny_ckpt.default_spacing() == "trailing" and tiny_ckpt.default_spacing("leading") == "leading"
    del tiny_ckpt.meta["sampler"]
    assert tiny_ckpt.default_spacing(solver="ddim") == "logsnr"  # the schedule's default (linear β)
