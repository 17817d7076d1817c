"""Training throughput (fp32 vs bf16, alternating rounds) and the shipped training run's figures.

    python benchmarks/bench_train.py [--ckpt runs/mnist-tiny] [--rounds 3] [--steps 20]

Prints and writes benchmarks/results/train_mnist_tiny.{json,md} and the DDIM-50 grid (64 samples)
of the trained checkpoint to benchmarks/results/mnist_tiny_ddim50.png.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from _common import RESULTS, write_results
from leandiff.checkpoint import load_checkpoint
from leandiff.io import save_grid
from leandiff.models import image_shape
from leandiff.sample import SampleConfig, SampleStats, sample_all
from leandiff.train import TrainConfig, init_checkpoint, train, training_images


def throughput(bf16: bool, steps: int, images: torch.Tensor) -> float:
    cfg = TrainConfig(dataset="mnist", model="mnist-tiny", steps=steps + 3, batch_size=128, bf16=bf16,
                      sample_every=0, checkpoint_every=10_000)
    init = init_checkpoint(cfg)
    # Time only steps after a 3-step warm-up: run 3 steps, then the rest, timing the rest.
    with tempfile.TemporaryDirectory() as d:
        warm = TrainConfig(**{**cfg.__dict__, "steps": 3})
        train(warm, d, init=init, images=images, progress=False)
        t0 = time.perf_counter()
        train(TrainConfig(**{**cfg.__dict__, "steps": steps}), d, init=init, images=images, progress=False)
        return steps * cfg.batch_size / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="runs/mnist-tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    images = training_images(TrainConfig(), init_checkpoint(TrainConfig()))
    rates = {"fp32": [], "bf16": []}
    for r in range(args.rounds):  # alternating rounds A B A B: the machine is noisy
        for name in ("fp32", "bf16"):
            rates[name].append(throughput(name == "bf16", args.steps, images))
            print(f"round {r}: {name} {rates[name][-1]:.0f} img/s")
    med = {k: statistics.median(v) for k, v in rates.items()}

    ck = load_checkpoint(args.ckpt)
    tr = ck.meta.get("train", {})
    stats = SampleStats()
    x = sample_all(ck.denoiser(), image_shape(ck.arch), SampleConfig("ddim", 50, n=64, seed=0, batch_size=64), stats)
    grid = RESULTS / "mnist_tiny_ddim50.png"
    save_grid(x, grid, nrow=8)

    figures = {"train_images_per_s_median": med, "train_images_per_s_rounds": rates,
               "run": args.ckpt, "run_settings": {k: tr.get(k) for k in ("dataset", "model", "steps", "batch_size", "bf16", "lr", "seed",
                                                       "wall_seconds", "completed_steps", "num_images")},
               "ddim50_grid": grid.name, "ddim50_images_per_s": stats.images_per_s}
    md = (f"# Training mnist-tiny on the bundled MNIST (4,000 train digits)\n\n"
          f"| precision | training images/s (median of {args.rounds} alternating rounds, batch 128) |\n|---|---|\n"
          f"| fp32 | {med['fp32']:.0f} |\n| bf16 autocast | {med['bf16']:.0f} |\n\n"
          f"Training run `{args.ckpt}`: {tr.get('completed_steps')} steps × batch {tr.get('batch_size')}, bf16={tr.get('bf16')}, "
          f"wall time {tr.get('wall_seconds')} s ({(tr.get('wall_seconds') or 0) / 60:.1f} min).\n\n"
          f"DDIM-50 samples (64, seed 0): `{grid.name}`\n")
    write_results("train_mnist_tiny", figures, md)
    print(md)


if __name__ == "__main__":
    main()
