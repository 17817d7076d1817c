"""The evaluation verbs: ``classifier train``, ``eval``, ``bench``, ``report``.
Each body fills a config and calls one function (see harness, cost, report)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..device import device_option, resolve_device
from ..errors import UserError
from ..runtime import RUNTIMES
from ..schedule import SPACINGS


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def sampler_options(f):
    """The sampler options ``sample`` and ``eval`` share: --solver, --nfe, --runtime, --spacing, --eta,
    --batch-size, --no-clip (defaults: the checkpoint's recorded ones, see Checkpoint.sampling_defaults)."""
    opts = [
        click.option("--solver", default=None, help="default: the checkpoint's recorded sampler (a zoo base: the best "
                                                     "its card measured), else dpmpp-3m-sde"),
        click.option("--nfe", type=int, default=None, callback=_positive,
                     help="network evaluations per sample (default: the checkpoint's, else 10)"),
        click.option("--runtime", default=None,
                     help=f"a runtime spec: {', '.join(RUNTIMES)}, with arguments in the recipe grammar, e.g. "
                          "ort-int8(calib=qdiff), cache(interval=3); leandiff runtimes says where each runs "
                          "(default: the checkpoint's, else eager)"),
        click.option("--spacing", default=None,
                     help=f"{', '.join(SPACINGS)} (default: the checkpoint's; else trailing for "
                          "the default solver, and for another solver logsnr on linear-β, trailing on cosine schedules)"),
        click.option("--eta", type=float, default=None,
                     help="DDIM η (0 deterministic, 1 DDPM-like); the noise level of dpmpp-*-sde (1: the SDE, 0: the ODE)"),
        click.option("--batch-size", type=int, default=256, show_default=True, callback=_positive,
                     help="images per solver call"),
        click.option("--no-clip", is_flag=True, help="do not clamp x̂₀ to [-1, 1] inside the solver"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group()
def classifier():
    """The feature network behind FID-dom and KID.

    One small classifier per dataset; FID-dom, KID, IS and precision/recall use its features."""


@classifier.command("train")
@click.option("--dataset", required=True, help="mnist, fashion-mnist or cifar10")
@click.option("--data-dir", default=None, help="directory with the dataset's files (IDX, CIFAR batches)")
@click.option("--epochs", type=int, default=None, callback=_positive, help="default: the shipped classifier's")
@click.option("--seed", type=int, default=None, help="training seed (default: the shipped classifier's)")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="output directory (default: the package's zoo/classifiers/DATASET)")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="also compute and cache the held-out reference statistics")
def classifier_train(dataset, data_dir, epochs, seed, out, reference):
    """Train the feature CNN for a dataset; prints held-out accuracy."""
    from .classifier import classifier_dir, default_config, save_classifier, train_classifier
    from .reference import reference_stats

    cfg = default_config(dataset, data_dir=data_dir, epochs=epochs, seed=seed)
    clf = train_classifier(cfg, progress=True)
    out = Path(out) if out else classifier_dir(dataset)
    save_classifier(clf, out)
    r = clf.record
    click.echo(f"classifier {dataset}: test accuracy {r['test_accuracy']:.4f} on {r['test_images']} held-out images "
               f"(unseen train images {r['unseen_accuracy']}, fit {r['train_accuracy']:.4f} on {r['train_images']}); "
               f"weights {clf.hash} -> {out}")
    if reference:
        stats = reference_stats(clf, dataset, data_dir, progress=True)
        click.echo(f"reference statistics: {stats.n} {dataset}/{stats.split} images, {stats.mean.size} features")


@click.command("eval")
@click.argument("ckpt")
@sampler_options
@click.option("-n", "n", type=int, default=2048, show_default=True, callback=_positive, help="generated samples")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed; also seeds KID subsets, precision/recall subsampling and the MSE noise")
@click.option("--dataset", default=None, help="reference dataset (default: the checkpoint's)")
@click.option("--data-dir", default=None, help="directory with the dataset's files (IDX, CIFAR batches)")
@click.option("--classifier", "classifier_path", default=None, help="classifier directory (default: the shipped one)")
@click.option("--no-latency", is_flag=True, help="skip the per-evaluation latency measurement")
@click.option("--inception", is_flag=True,
              help="also standard Inception FID (needs torch-fidelity and its weights on this machine)")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="results file (JSONL of eval rows) to append to; a new file is created")
@device_option
def eval_cmd(ckpt, solver, nfe, n, runtime, spacing, eta, seed, batch_size, no_clip, dataset, data_dir,
             classifier_path, no_latency, inception, out, device):
    """Score a checkpoint; append one row to --out.

    Samples, embeds and scores; appends one JSON row to the results file --out and prints a Markdown row."""
    from ..cost import LatencyConfig
    from ..io import ensure_writable_dir, heartbeat
    from ..checkpoint import load_checkpoint
    from .harness import EvalConfig, append_row, evaluate_checkpoint, markdown_header, markdown_row
    from .protocol import check_results_file

    check_results_file(out)  # refuse a file that is not a results file before any work, and leave it as it is
    dev = resolve_device(device)
    ck = load_checkpoint(ckpt)
    solver, nfe, runtime = ck.sampling_defaults(solver, nfe, runtime)
    spacing = ck.default_spacing(spacing, solver)
    cfg = EvalConfig(device=str(dev), solver=solver, nfe=nfe, n=n, seed=seed, spacing=spacing, runtime=runtime, batch_size=batch_size,
                     clip_x0=not no_clip, opts={} if eta is None else {"eta": eta}, dataset=dataset,
                     data_dir=data_dir, classifier=classifier_path, latency=None if no_latency else LatencyConfig(),
                     inception=inception)
    out = Path(out)
    grid = _grid_path(out, ckpt, cfg)
    ensure_writable_dir(grid.parent)  # fail before the sampling, not after
    with heartbeat(f"eval {ck.name} {solver}-{nfe} on {runtime}, N={n}", click.echo):  # logs have no progress bar
        row = evaluate_checkpoint(ck, cfg, grid_path=grid, progress=True, log=lambda m: click.echo(m, err=True))
    if row is None:  # a torchrun process other than rank 0: rank 0 writes the row
        return
    row["grid"] = str(grid.relative_to(out.parent)) if row["grid"] else None  # relative to the results file
    append_row(out, row)
    click.echo(markdown_header())
    click.echo(markdown_row(row))


def _grid_path(out: Path, ckpt: str, cfg) -> Path:
    import hashlib

    tag = hashlib.sha256(f"{ckpt}|{cfg}".encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(ckpt.replace("zoo:", "zoo_")).name)[:40]
    return out.parent / f"{out.stem}-grids" / f"{stem}-{cfg.solver}-{cfg.nfe}-{cfg.runtime}-{tag}.png"


@click.command()
@click.argument("ckpts", nargs=-1, required=True)
@click.option("--runtime", "runtimes", multiple=True, default=("eager",), show_default=True,
              help="repeat to compare runtimes in the same alternating rounds")
@click.option("--batch-sizes", default="1,16,64", show_default=True, help="comma-separated batch sizes to time")
@click.option("--rounds", type=int, default=5, show_default=True, callback=_positive, help="alternating timing rounds (the median is reported)")
@click.option("--solver", default=None, help="with --nfe: also measure end-to-end images/s for this solver")
@click.option("--nfe", type=int, default=None, callback=_positive, help="network evaluations per sample (with --solver)")
@click.option("-n", "n", type=int, default=64, show_default=True, callback=_positive, help="images for end-to-end images/s")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="write the Markdown table here and the JSON record beside it (.json); "
                   "without --out the table is printed and nothing is written")
@device_option
def bench(ckpts, runtimes, batch_sizes, rounds, solver, nfe, n, out, device):
    """Cost table of checkpoints under runtimes.

    Parameters, MACs, bytes, latency per evaluation (batch 1/16/64), peak memory."""
    from ..cost import LatencyConfig
    from .bench import BenchConfig, bench_markdown, run_bench
    from ..io import ensure_writable_dir, write_json, write_text

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    if (solver is None) != (nfe is None):
        raise UserError("give --solver and --nfe together (or neither)")
    if out is not None:
        ensure_writable_dir(Path(out).parent)
    cfg = BenchConfig(runtimes=tuple(runtimes), latency=LatencyConfig(batch_sizes=sizes, rounds=rounds),
                      solver=solver, nfe=nfe, n=n, device=str(resolve_device(device)))
    record = run_bench(list(ckpts), cfg, progress=True)
    md = bench_markdown(record)
    if out is not None:
        write_text(out, md)
        write_json(Path(out).with_suffix(".json"), record)
    click.echo(md)


@click.command()
@click.argument("results", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="report directory")
def report(results, out):
    """Write the HTML report of results files.

    index.html (recommendation, table, plots, gallery), report.md and results.csv."""
    from .harness import read_rows
    from .report import summary_lines, write_report

    rows = read_rows(results)
    index = write_report(rows, out)
    for line in summary_lines(rows):
        click.echo(line)
    click.echo(f"report: {index}")
