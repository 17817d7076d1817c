"""Faults: SIGKILL at random points of training, fine-tuning and progressive distillation (``leandiff compress``)
resumes to the same weights with nothing corrupt on disk; NaN/Inf in sampling and training is
caught with its step (and layer) and leaves the last good checkpoint intact; the demo's fast mode
opens no network connection."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.errors import UserError

from conftest import run_cli


@pytest.fixture
def folder_ckpt(tiny_ckpt, image_folder, tmp_path):
    """The tiny 16×16 model, recorded as trained on the blob folder (so recipes find their data)."""
    tiny_ckpt.meta["dataset"] = f"folder:{image_folder}"
    return save_checkpoint(tiny_ckpt, tmp_path / "base")


def _weights(d: Path) -> str:
    return json.loads((d / "leandiff.json").read_text())["weights_sha"]


def _check_nothing_corrupt(root: Path) -> None:
    """Every checkpoint directory under ``root`` loads, every JSON parses, every safetensors file
    opens (temporary files of a killed atomic write are the only things allowed to be partial)."""
    from safetensors import safe_open

    for p in root.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        if p.name == "leandiff.json" and (p.parent / "model.safetensors").is_file():
            load_checkpoint(p.parent)


def _kill_and_resume(args, out: Path, seconds_ref: float, seed: int, resume_flag: tuple = ()) -> float:
    """Start ``leandiff ARGS``, SIGKILL it at a seeded random fraction of the uninterrupted run's
    time, check the disk, then run it again to completion. Returns the kill time."""
    at = random.Random(seed).uniform(0.3, 0.75) * seconds_ref
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    for _ in range(3):  # a machine faster than during the reference run may finish first: kill earlier
        proc = subprocess.Popen([sys.executable, "-m", "leandiff.cli", *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
        assert proc.returncode == 0
        shutil.rmtree(out)
        at /= 2
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at {at:.1f}s"
    if out.exists():
        _check_nothing_corrupt(out)
    # the same thread count as the killed run and the reference: float sums differ across thread counts
    run_cli(*args, *resume_flag, check=True, env={"OMP_NUM_THREADS": "1"})
    return at


def _timed(args) -> float:
    t0 = time.perf_counter()
    run_cli(*args, check=True, env={"OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


@pytest.mark.parametrize("recipe", [
    # 280 steps: the fine-tune saves its state at step 250 and at the end, so a kill may land before
    # or after a saved state, or in the final copy
    "finetune(steps=280,batch_size=8,bf16=false)",
    # conversion to v, then rounds 8 -> 4 -> 2 steps, each resumable
    "pd(from=8,to=2,steps_per_round=30,convert_steps=30,batch_size=8)",
])
def test_sigkilled_compress_resumes_to_identical_weights(folder_ckpt, tmp_path, recipe):
    ref, run = tmp_path / "ref", tmp_path / "run"
    seconds = _timed(["compress", folder_ckpt, "--recipe", recipe, "--out", ref])
    args = ["compress", folder_ckpt, "--recipe", recipe, "--out", run]
    at = _kill_and_resume(args, run, seconds, seed=zlib.crc32(recipe.encode()))
    assert _weights(run) == _weights(ref), f"killed at {at:.1f}s of {seconds:.1f}s"
    assert load_checkpoint(run).lineage[-1]["recipe"] == load_checkpoint(ref).lineage[-1]["recipe"]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    _check_nothing_corrupt(run)


def test_sigkilled_training_at_a_random_point_resumes_to_identical_weights(image_folder, tiny_model_json, tmp_path):
    def args(out):
        return ["train", "--dataset", f"folder:{image_folder}", "--model", tiny_model_json, "--steps", 80,
                "--batch-size", 8, "--checkpoint-every", 7, "--sample-every", 0, "--warmup", 5, "--seed", 4,
                "--out", out]

    ref, run = tmp_path / "ref", tmp_path / "run"
    seconds = _timed(args(ref))
    at = _kill_and_resume(args(run), run, seconds, seed=11, resume_flag=("--resume",))
    assert _weights(run) == _weights(ref), f"killed at {at:.1f}s of {seconds:.1f}s"
    _check_nothing_corrupt(run)


def test_sampling_nan_names_step_timestep_and_layer(tiny_ckpt):
    from leandiff.models import image_shape
    from leandiff.sample import SampleConfig, sample_all

    with torch.no_grad():
        tiny_ckpt.net.down_blocks[1].resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"step 1 \(timestep t=\d+\).*down_blocks\.1\.resnets\.0\.conv1"):
        sample_all(tiny_ckpt.denoiser(), image_shape(tiny_ckpt.arch), SampleConfig("ddim", 4, n=2))


class _NaNLate(torch.nn.Module):
    """A network that turns non-finite only below timestep 500 (the later sampling steps)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        out = self.net(x, t).sample
        return out * float("inf") if float(t.flatten()[0]) < 500 else out


def test_sampling_nan_at_a_later_step_is_caught_there(tiny_ckpt):
    from leandiff.denoiser import Denoiser
    from leandiff.sample import SampleConfig, sample_all, solver_timesteps

    d = Denoiser(_NaNLate(tiny_ckpt.net), tiny_ckpt.schedule)
    cfg = SampleConfig("ddim", 10, n=2, spacing="leading")
    first_bad = next(i for i, t in enumerate(solver_timesteps(d, cfg).tolist()) if t < 500)
    with pytest.raises(UserError, match=rf"at step {first_bad + 1} \("):
        sample_all(d, (1, 16, 16), cfg)


def _train_with(tiny_ckpt, image_folder, out, bad_step, poison):
    """Train 12 steps (checkpoint every 4) with a loss that goes wrong at ``bad_step``."""
    from leandiff.train import DiffusionLoss, TrainConfig, train, training_images

    cfg = TrainConfig(dataset=f"folder:{image_folder}", steps=12, batch_size=8, warmup=1, checkpoint_every=4,
                      sample_every=0, seed=1)
    plain, calls = DiffusionLoss(), []

    def loss_fn(den, x0, g):
        calls.append(1)
        loss = plain(den, x0, g)
        if len(calls) - 1 == bad_step:
            if poison == "loss":
                return loss * float("nan")
            # finite value, NaN gradient: d sqrt(u)/du is infinite at u = 0, times du/dθ = 0
            return loss + (den(x0, torch.zeros(x0.shape[0], dtype=torch.long)).sum() * 0).sqrt()
        return loss

    return train(cfg, out, init=tiny_ckpt, images=training_images(cfg, tiny_ckpt), loss_fn=loss_fn, progress=False)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_training_nan_stops_with_last_good_checkpoint(tiny_ckpt, image_folder, tmp_path, poison):
    out = tmp_path / "run"
    want = "gradient is NaN/Inf at step 9 .first non-finite gradient: " if poison == "gradient" else "loss is nan at step 9"
    with pytest.raises(UserError, match=want):
        _train_with(tiny_ckpt, image_folder, out, bad_step=9, poison=poison)
    ck = load_checkpoint(out)  # loads: no NaN reached the saved weights
    assert ck.meta["train"]["completed_steps"] == 8
    assert all(torch.isfinite(p).all() for p in ck.net.parameters())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


SOCKET_GUARD = textwrap.dedent("""
    import socket, sys
    log = sys.argv[1]

    def blocked(*args, **kwargs):
        with open(log, "a") as f:
            f.write(repr(args) + repr(kwargs) + "\\n")
        raise OSError("network access is blocked in this test")

    for name in ("connect", "connect_ex", "sendto", "sendmsg"):
        setattr(socket.socket, name, blocked)
    socket.create_connection = blocked
    socket.getaddrinfo = blocked
    if sys.argv[2] == "--probe":  # the guard itself must see a connection attempt
        try:
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        except OSError:
            pass
        sys.exit(0)
    from leandiff.cli import main
    main(sys.argv[2:], prog_name="leandiff")
""")


def test_socket_guard_records_a_connection_attempt(tmp_path):
    attempts = tmp_path / "attempts.log"
    subprocess.run([sys.executable, "-c", SOCKET_GUARD, str(attempts), "--probe"], check=True, timeout=60)
    assert "127.0.0.1" in attempts.read_text()


def test_demo_fast_mode_opens_no_network_connection(tmp_path):
    attempts = tmp_path / "attempts.log"
    p = subprocess.run([sys.executable, "-c", SOCKET_GUARD, str(attempts), "demo", "--fast", "--out", tmp_path / "demo"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert not attempts.exists(), attempts.read_text()
    assert (tmp_path / "demo" / "report" / "index.html").is_file()


def _file_size_quota(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_native_writer_failing_mid_file_is_one_line_and_leaves_nothing(image_folder, tiny_model_json, tmp_path):
    """A disk that fills up under safetensors' (Rust) writer: a 16 kB file-size quota stands in for
    it (RLIMIT_FSIZE; an in-process ENOSPC cannot reach native code). One line, exit 2, no temp file."""
    out = tmp_path / "run"
    args = ["train", "--dataset", f"folder:{image_folder}", "--model", tiny_model_json, "--steps", 2,
            "--batch-size", 4, "--checkpoint-every", 1, "--sample-every", 0, "--out", out]
    p = subprocess.run([sys.executable, "-m", "leandiff.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=300, preexec_fn=_file_size_quota(16_000),
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0"))
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leandiff: error: cannot write") and "too large" in lines[0], p.stderr
    assert [f for f in out.rglob("*") if f.is_file()] == []


STUDY_TOML = """
title = "killed study"
n = 16
seed = 0
batch_size = 16
latency = false
solvers = ["ddim"]
nfe = [2, 3]
runtimes = ["ckpt"]

[[models]]
name = "base"
ckpt = "zoo:mnist-tiny"

[[models]]
name = "pruned"
base = "zoo:mnist-tiny"
recipe = "prune(method=magnitude,ratio=0.3) > finetune(steps=30,batch_size=8,bf16=false)"
"""


def test_sigkilled_study_resumes_to_the_same_table(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(STUDY_TOML)
    ref, run = tmp_path / "ref", tmp_path / "run"
    seconds = _timed(["study", toml, "--out", ref])
    at = _kill_and_resume(["study", toml, "--out", run], run, seconds, seed=11)

    def table(d):
        rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
        return {r["study_cell_key"]: (r["weights"], r["quality"]["fid_dom"]) for r in rows}

    assert table(run) == table(ref), f"killed at {at:.1f}s of {seconds:.1f}s"
    assert len(table(run)) == 4
    _check_nothing_corrupt(run)
