"""The device option (leandiff.device): resolution and its errors, the CPU behaviour kept bit for bit, the
plumbing of every solver, runtime, step and metric onto a device (the ``meta`` device stands in for an
accelerator on CPU-only machines: a tensor left on the CPU next to a meta one fails loudly), and the GPU
checks, marked ``gpu`` and skipped without CUDA (benchmarks/device_check.sh runs them on a GPU machine)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from leandiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from leandiff.denoiser import Denoiser
from leandiff.device import device_of, generator, resolve_device
from leandiff.errors import UserError
from leandiff.models import build_network
from leandiff.runtime import RUNTIMES, check_device, get_runtime, runtime_devices, runtime_network
from leandiff.sample import SampleConfig, sample_all
from leandiff.schedule import Schedule, timesteps
from leandiff.solvers import GENERIC, SOLVERS, get_solver

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.sh)")


# --- resolution --------------------------------------------------------------------------------------------

def test_cpu_and_auto_resolve_and_a_missing_device_is_one_user_error():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(UserError, match="not available"):
            resolve_device("cuda")
        with pytest.raises(UserError, match="not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UserError, match="not available"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
        assert resolve_device("auto").type == "cuda"
    for bad in ("tpu", "cuda:x", "cpu:1", ""):
        with pytest.raises(UserError):
            resolve_device(bad)


@pytest.mark.parametrize("verb", [["sample", "zoo:mnist-tiny", "--out", "OUT"], ["train", "--out", "OUT", "--steps", "1"],
                                  ["eval", "zoo:mnist-tiny", "--out", "OUT/r.jsonl"], ["bench", "zoo:mnist-tiny"],
                                  ["compress", "zoo:mnist-tiny", "--recipe", "cache(interval=2)", "--out", "OUT"],
                                  ["demo", "--fast", "--out", "OUT"], ["ema", "OUT"],
                                  ["study", "OUT/s.toml", "--out", "OUT"]])
def test_every_computing_verb_takes_device_and_refuses_a_missing_one_in_one_line(verb, tmp_path):
    args = [str(tmp_path / "o") if a == "OUT" else a.replace("OUT", str(tmp_path / "o")) for a in verb]
    p = run_cli(*args, "--device", "tpu")
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "unknown device 'tpu'" in p.stderr
    assert not (tmp_path / "o").exists()  # refused before any work


def test_a_cpu_only_runtime_refuses_an_accelerator_before_any_work():
    for name in RUNTIMES:
        devices = runtime_devices(name)
        assert "cpu" in devices or name == "fp16", name
        for kind in ("cuda", "mps"):
            if kind not in devices:
                with pytest.raises(UserError, match=f"runtime {name} runs on"):
                    check_device(name, torch.device(kind))
    assert runtime_devices("ort-int8") == ("cpu",)  # real int8 is ONNX Runtime on the CPU


# --- the CPU as before ---------------------------------------------------------------------------------------

def test_cpu_samples_and_training_match_main_before_devices():
    """tests/data/cpu_golden.{json,safetensors} were written by tests/data/make_cpu_golden.py with main's code
    from before device support; the same script's tensors with this code must match them: hash for hash on
    the CPU model the golden was made on, within float tolerance on another (float kernels differ between
    CPU models; the golden's first version, made on an Intel Xeon, did not hash equal on an AMD EPYC with
    either code)."""
    from safetensors.torch import load_file

    golden = json.loads((HERE / "data" / "cpu_golden.json").read_text())
    if golden["torch"] != torch.__version__:
        pytest.skip(f"golden made with torch {golden['torch']}, this is {torch.__version__} (float kernels differ)")
    want = load_file(str(HERE / "data" / "cpu_golden.safetensors"))
    sys.path.insert(0, str(HERE / "data"))
    try:
        import make_cpu_golden
    finally:
        sys.path.remove(str(HERE / "data"))
    got = make_cpu_golden.tensors()
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    if golden.get("cpu") == make_cpu_golden.cpu_name():
        now = make_cpu_golden.golden(got)
        assert now["samples"] == golden["samples"] and now["train"] == golden["train"]


def test_same_seed_same_device_same_images_and_explicit_cpu_equals_the_default(tiny_ckpt):
    d = Denoiser(tiny_ckpt.net, tiny_ckpt.schedule, tiny_ckpt.parameterization)
    for solver in ("ddim", "dpmpp-3m-sde"):
        cfg = dict(solver=solver, nfe=6, n=3, batch_size=2, seed=3)
        a = sample_all(d, (1, 16, 16), SampleConfig(**cfg))
        b = sample_all(d, (1, 16, 16), SampleConfig(**cfg, device="cpu"))
        c = sample_all(d, (1, 16, 16), SampleConfig(**cfg, device="auto" if not torch.cuda.is_available() else "cpu"))
        assert torch.equal(a, b) and torch.equal(a, c) and a.device.type == "cpu"
        other = sample_all(d, (1, 16, 16), SampleConfig(**{**cfg, "seed": 4}))
        assert not torch.equal(a, other)


def test_checkpoints_are_device_free(tiny_ckpt, tmp_path):
    save_checkpoint(tiny_ckpt, tmp_path / "a")
    back = load_checkpoint(tmp_path / "a", "cpu")
    assert back.hash() == tiny_ckpt.hash() and device_of(back.net).type == "cpu"
    meta = load_checkpoint(tmp_path / "a", "meta")
    assert device_of(meta.net).type == "meta"


# --- plumbing onto a device (meta stands in for an accelerator) ------------------------------------------------

def _net(arch, device):
    torch.manual_seed(0)
    return build_network(arch).eval().to(device)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("param", ["eps", "v", "edm"])
def test_every_solver_computes_on_the_device_of_its_input(name, param, tiny_arch):
    param = "cm" if name == "consistency" else param
    d = Denoiser(_net(tiny_arch, "meta"), Schedule("linear"), param)
    x = torch.randn(2, 1, 16, 16).to("meta")
    out = get_solver(name)(d, x, timesteps(d.schedule, 4, "trailing"), generator=torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == x.shape


def test_generate_draws_x_T_on_the_cpu_and_moves_it_once(tiny_arch, monkeypatch):
    """The noise rule: x_T from the CPU generator (seed, batch), then on the device; step noise from the device."""
    import leandiff.sample as sample_mod

    seen = []
    real = sample_mod.get_solver

    def spy(name):
        fn = real(name)

        def wrapped(denoiser, x, ts, *, generator=None, **kw):
            seen.append((x.device.type, generator.device.type))
            return fn(denoiser, x, ts, generator=generator, **kw)
        return wrapped

    monkeypatch.setattr(sample_mod, "get_solver", spy)
    d = Denoiser(_net(tiny_arch, "meta"), Schedule("linear"), "eps")
    cfg = SampleConfig(solver="dpmpp-2m-sde", nfe=4, n=3, batch_size=2)
    with pytest.raises(Exception):  # the final isfinite check cannot read meta data: the plumbing ran
        sample_all(d, (1, 16, 16), cfg)
    assert seen and seen[0] == ("meta", "cpu")  # meta has no generator of its own: the CPU's stands in


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_runtime_runs_on_each_device_it_claims(name, tiny_ckpt, tmp_path):
    """Every runtime makes CPU outputs on the CPU; every runtime claiming an accelerator builds its network on
    the (meta) device and computes there; the others refuse it."""
    ck = tiny_ckpt
    if name == "fake-quant":  # a simulation of a quantized checkpoint: make one
        from leandiff.recipe import apply_recipe
        ck = apply_recipe(ck, "quant(n=8,steps=2,runtime=fake)", tmp_path / "q", progress=False, log=lambda s: None)
    if name.startswith("openvino"):  # an optional extra (in `test`); skipped where it is not installed
        pytest.importorskip("openvino")
    spec = {"ort-int8": "ort-int8(calib=uniform)", "openvino-int8": "openvino-int8(calib=uniform)"}.get(name, name)
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 500.0)
    if name not in ("compile", "compile-bf16", "fp16"):  # compile: too slow for a unit test; fp16: GPUs only
        out = runtime_network(ck, spec, "cpu")(x, t)
        out = getattr(out, "sample", out)
        assert out.device.type == "cpu" and out.shape == x.shape
    if set(runtime_devices(name)) - {"cpu"}:
        net = get_runtime(spec, "meta")(ck)
        assert device_of(ck.net).type == "meta"
        if name in ("compile", "compile-bf16"):  # built on the device; compiled at its first call (slow)
            return
        if name == "cache":  # its schedule reads t on the host (one scalar per call): no meta data to read
            assert all(p.device.type == "meta" for p in net.parameters())
            return
        out = net(x.to("meta"), t.to("meta"))
        assert getattr(out, "sample", out).device.type == "meta"
    else:
        with pytest.raises(UserError):
            get_runtime(spec, "meta")


def test_every_metric_reads_features_from_any_device(tiny_ckpt):
    """The metrics see features and probabilities (moved to the CPU by the accumulator), and the denoising
    MSE draws its noise on the CPU and moves it to the network: the same value whatever device computed."""
    from leandiff.evaluate.metrics import FeatureAccumulator, denoising_mse
    from leandiff.evaluate.quality import METRICS

    assert {"fid_dom", "kid", "is", "pr", "mse", "confidence", "labels"} == set(METRICS)
    acc = FeatureAccumulator()
    f = torch.randn(40, 8, generator=generator(0))
    acc.update(f.to("cpu"), torch.softmax(f[:, :4], 1))
    assert acc.features.shape == (40, 8)
    images = torch.rand(6, 1, 16, 16, generator=generator(1)) * 2 - 1
    d = Denoiser(tiny_ckpt.net, tiny_ckpt.schedule, tiny_ckpt.parameterization)
    a = denoising_mse(d, images, seed=0, batch_size=4)
    b = denoising_mse(d, images, seed=0, batch_size=2)
    assert a == pytest.approx(b, rel=1e-6)


def test_every_recipe_step_result_lives_on_the_recipe_device(tiny_ckpt, image_folder, tmp_path):
    """apply_recipe(device=...) puts the checkpoint, each step's result and the final one on the device
    (the CPU here; every step on CUDA in test_gpu_every_step_follows_the_device)."""
    from leandiff.recipe import apply_recipe

    out = apply_recipe(tiny_ckpt, "cache(interval=2)", tmp_path / "o", device="cpu", progress=False, log=lambda s: None)
    assert device_of(out.net).type == "cpu"
    with pytest.raises(UserError, match="unknown device"):
        apply_recipe(tiny_ckpt, "cache(interval=2)", tmp_path / "p", device="tpu", progress=False, log=lambda s: None)


def test_results_rows_record_the_device_and_the_noise_rule(tmp_path):
    p = run_cli("eval", "zoo:mnist-tiny", "--nfe", "2", "--solver", "ddim", "-n", "8", "--batch-size", "8",
                "--no-latency", "--device", "cpu", "--out", tmp_path / "r.jsonl", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["protocol"]["device"] == "cpu" and "cpu generators" in row["protocol"]["noise"]
    assert row["machine"]["device"] == "cpu"


def test_device_batches_are_the_cpu_batches(tiny_ckpt):
    """On an accelerator the step's indices come from per-epoch permutations kept on the device: the same
    indices as the CPU's _batch_indices (checked here with the device class on the CPU)."""
    from leandiff.train import TrainConfig, _batch_indices, _DeviceBatches

    for world, B in ((1, 8), (2, 8), (4, 12)):
        cfg = TrainConfig(batch_size=B, seed=3)
        for rank in range(world):
            dev = _DeviceBatches(20, cfg, rank, world, torch.device("cpu"))
            for step in range(12):  # several epochs of 20 images, batches straddling them
                assert torch.equal(dev(step), _batch_indices(20, step, cfg, rank, world)), (world, rank, step)


def test_training_inside_a_process_group_of_one_uses_ddp_and_changes_nothing(tiny_ckpt, tmp_path, monkeypatch):
    """The one-GPU DDP case of test_gpu_ddp_training_with_one_gpu_over_nccl, on the CPU over gloo: the loop
    wraps the network in DDP when a process group exists, and with one process the weights are the plain run's."""
    import copy

    import torch.distributed as dist

    from leandiff.train import TrainConfig, train

    images = torch.rand(32, 1, 16, 16, generator=generator(0)) * 2 - 1
    cfg = TrainConfig(steps=3, batch_size=8, warmup=1, sample_every=0, checkpoint_every=3, device="cpu")
    start = copy.deepcopy(tiny_ckpt)
    plain = train(cfg, tmp_path / "plain", init=tiny_ckpt, images=images, progress=False)
    wrapped = []
    real_ddp = torch.nn.parallel.DistributedDataParallel
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda *a, **k: wrapped.append(k) or real_ddp(*a, **k))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29600 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = train(cfg, tmp_path / "ddp", init=start, images=images, progress=False)
    finally:
        dist.destroy_process_group()
    assert wrapped == [{"device_ids": None}]
    assert ddp.hash() == plain.hash()


# --- on a GPU (marked; benchmarks/device_check.sh runs these) ------------------------------------------------------

@pytest.mark.gpu
@cuda
def test_gpu_sampling_same_seed_same_images_and_ode_close_to_the_cpu(tiny_ckpt):
    d_cpu = Denoiser(tiny_ckpt.net, tiny_ckpt.schedule, tiny_ckpt.parameterization)
    ref = sample_all(d_cpu, (1, 16, 16), SampleConfig(solver="dpmpp-2m", nfe=8, n=4, batch_size=4))
    gpu = runtime_network(tiny_ckpt, "eager", "cuda")
    d = Denoiser(gpu, tiny_ckpt.schedule, tiny_ckpt.parameterization)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for solver in ("dpmpp-2m", "dpmpp-3m-sde"):
        cfg = SampleConfig(solver=solver, nfe=8, n=4, batch_size=4, device="cuda")
        a, b = sample_all(d, (1, 16, 16), cfg), sample_all(d, (1, 16, 16), cfg)
        assert a.device.type == "cuda" and torch.equal(a, b)
        if solver == "dpmpp-2m":  # x_T is the CPU's: a deterministic solver lands on the CPU's images
            assert torch.allclose(a.cpu(), ref, atol=1e-3), (a.cpu() - ref).abs().max()


@pytest.mark.gpu
@cuda
def test_gpu_fp16_and_bf16_sampling_within_tolerance_of_fp32(tiny_ckpt):
    out = {}
    for rt in ("eager", "fp16", "bf16", "channels-last"):
        d = Denoiser(runtime_network(tiny_ckpt, rt, "cuda"), tiny_ckpt.schedule, tiny_ckpt.parameterization)
        out[rt] = sample_all(d, (1, 16, 16), SampleConfig(solver="dpmpp-2m", nfe=8, n=8, batch_size=8, device="cuda"))
    # mean |difference| (a pixel near the clipping boundary can flip far): on the CPU, bf16 vs fp32 on this
    # model and solver is 0.0013 (max 0.40), channels-last 7e-8; fp16 has 3 more mantissa bits than bf16
    for rt, tol in (("fp16", 0.005), ("bf16", 0.02), ("channels-last", 1e-4)):
        err = (out[rt] - out["eager"]).abs().mean().item()
        assert err < tol, (rt, err)


@pytest.mark.gpu
@cuda
def test_gpu_ddp_training_with_one_gpu_over_nccl(tiny_ckpt, tmp_path, monkeypatch):
    import torch.distributed as dist

    from leandiff.train import TrainConfig, train

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(k, v)
    images = torch.rand(32, 1, 16, 16, generator=generator(0)) * 2 - 1
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, sample_every=0, checkpoint_every=4, device="cuda")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    try:
        done = train(cfg, tmp_path / "run", init=tiny_ckpt, images=images, progress=False)
        assert dist.get_backend() and device_of(done.net).type == "cuda"
    finally:
        dist.destroy_process_group()
    back = load_checkpoint(tmp_path / "run")  # device-free: loads on the CPU
    assert device_of(back.net).type == "cpu" and back.meta["train"]["device"].startswith("cuda")
    assert back.hash() == done.hash()


@pytest.mark.gpu
@cuda
def test_gpu_bench_reports_peak_gpu_memory_next_to_rss(tmp_path):
    from leandiff.evaluate.bench import BenchConfig, bench_markdown, run_bench
    from leandiff.cost import LatencyConfig

    rec = run_bench(["zoo:mnist-tiny"], BenchConfig(runtimes=("eager", "fp16"), device="cuda",
                                                     latency=LatencyConfig(batch_sizes=(16,), rounds=2)))
    assert all(r["peak_gpu_mb"] > 0 and r["peak_rss_mb"] for r in rec["rows"])
    assert rec["machine"]["gpu"] and rec["machine"]["gpu_memory_mb"] > 0
    assert "peak GPU MB" in bench_markdown(rec)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["prune", "finetune", "kd", "lowrank", "lora", "pd", "oneshot", "cd", "quant", "cache"])
def test_gpu_every_step_follows_the_device(name, tiny_ckpt, image_folder, tmp_path):
    from leandiff.recipe import apply_recipe
    sys.path.insert(0, str(HERE / "compress"))
    try:
        from test_step_contract import CASES
    finally:
        sys.path.remove(str(HERE / "compress"))
    out = apply_recipe(tiny_ckpt, CASES[name], tmp_path / "o", dataset=f"folder:{image_folder}", device="cuda",
                       progress=False, log=lambda s: None)
    assert device_of(out.net).type == "cuda"
    back = load_checkpoint(tmp_path / "o")
    assert device_of(back.net).type == "cpu" and back.hash() == out.hash()
