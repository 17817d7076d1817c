"""The ``leandiff`` command. A thin layer: each verb fills a config and calls one function.

User errors (:class:`leandiff.errors.UserError`, bad options) print one line on stderr and
exit with code 2; a traceback means a bug in leandiff.
"""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import click

from .device import device_option, resolve_device
from .evaluate.commands import sampler_options
from .errors import UserError
from .schedule import SPACINGS


class _Group(click.Group):
    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
            sys.exit(rv if isinstance(rv, int) else 0)
        except UserError as e:
            _fail(str(e))
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            _fail(e.format_message() + (f" (see: leandiff {e.ctx.info_name if e.ctx else ''} --help)"))
        except click.Abort:
            _fail("aborted", 130)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:
            sys.exit(1)


def _fail(msg: str, code: int = 2):
    msg = " ".join(str(msg).split())  # exactly one line
    click.echo(f"leandiff: error: {msg}", err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="leandiff")
def main():
    """Make image diffusion models lean and measure what each choice cost."""


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def _floats(text: str, what: str) -> tuple[float, ...]:
    """'0.99,0.9999' -> (0.99, 0.9999); '' -> ()."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{what} needs comma-separated numbers, got {text!r}") from None


@main.command()
@click.option("--dataset", default="mnist", show_default=True, help="mnist, fashion-mnist, cifar10 or folder:PATH")
@click.option("--data-dir", default=None, help="directory with the dataset's files (IDX, CIFAR batches)")
@click.option("--model", default="mnist-tiny", show_default=True, help="a named config (see leandiff.models)")
@click.option("--init", "init_ckpt", default=None, help="start from this checkpoint instead of a fresh --model")
@click.option("--steps", type=int, default=10_000, show_default=True, callback=_positive, help="optimizer steps")
@click.option("--batch-size", type=int, default=128, show_default=True, callback=_positive, help="images per step (global, split across DDP processes)")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="peak AdamW learning rate")
@click.option("--warmup", type=int, default=200, show_default=True, help="linear warm-up steps")
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant", "cosine-restarts"]), default="cosine", show_default=True, help="learning-rate schedule after the warm-up")
@click.option("--restart-period", type=int, default=1000, show_default=True, help="cosine-restarts: steps per cycle")
@click.option("--ema-decay", type=float, default=0.999, show_default=True, help="decay of the EMA weights the checkpoint holds")
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="clip the gradient norm to this (0: off)")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True, help="forward-process β schedule")
@click.option("--parameterization", default="eps", show_default=True,
              help="eps, v, x0, or edm (Karras et al. 2022 preconditioning; edm(sigma_data=S), default 0.5)")
@click.option("--weighting", type=click.Choice(["plain", "truncated-snr", "snr+1", "min-snr"]), default="plain",
              show_default=True, help="loss weighting (min-snr: Hang et al. 2023, with --min-snr-gamma)")
@click.option("--min-snr-gamma", type=float, default=5.0, show_default=True, help="γ of min-snr weighting")
@click.option("--noise-levels", type=click.Choice(["auto", "uniform", "lognormal"]), default="auto", show_default=True,
              help="training t: uniform integers, or EDM's lognormal sigma (auto: lognormal for edm)")
@click.option("--p-mean", type=float, default=-1.2, show_default=True, help="lognormal: mean of ln sigma")
@click.option("--p-std", type=float, default=1.2, show_default=True, help="lognormal: std of ln sigma")
@click.option("--ema-decays", default="", help="more EMA decays kept side by side, e.g. 0.99,0.9999 (pick: leandiff ema)")
@click.option("--snapshot-every", type=int, default=0, show_default=True,
              help="keep a copy of the checkpoint every N steps in OUT/snapshots/ (0: never)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the initial weights, data order and noise")
@click.option("--bf16", is_flag=True, help="bf16 autocast (faster on CPUs with AMX/AVX512-bf16)")
@click.option("--sample-every", type=int, default=1000, show_default=True, help="write a sample grid every N steps (0: never)")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, callback=_positive, help="save the checkpoint and training state every N steps")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output checkpoint directory")
@click.option("--resume", is_flag=True, help="continue a killed run from its last saved state")
@device_option
def train(dataset, data_dir, model, init_ckpt, steps, batch_size, lr, warmup, lr_schedule, restart_period,
          ema_decay, grad_clip, schedule, parameterization, weighting, min_snr_gamma, noise_levels, p_mean, p_std,
          ema_decays, snapshot_every, seed, bf16, sample_every, checkpoint_every, out, resume, device):
    """Train a diffusion model into a checkpoint.

    Writes the checkpoint (EMA weights), its training state and sample grids to --out."""
    from .io import ensure_writable_dir
    from .train import TrainConfig, train as run, init_checkpoint, training_images

    cfg = TrainConfig(dataset=dataset, data_dir=data_dir, model=model, schedule=schedule,
                      parameterization=parameterization, weighting=weighting, min_snr_gamma=min_snr_gamma,
                      noise_levels=noise_levels, p_mean=p_mean, p_std=p_std, ema_decays=_floats(ema_decays, "--ema-decays"),
                      snapshot_every=snapshot_every, steps=steps,
                      batch_size=batch_size, lr=lr, warmup=warmup, lr_schedule=lr_schedule,
                      restart_period=restart_period, ema_decay=ema_decay, grad_clip=grad_clip, bf16=bf16,
                      seed=seed, sample_every=sample_every, checkpoint_every=checkpoint_every,
                      device=str(resolve_device(device)))
    init = init_checkpoint(cfg, init_ckpt)
    images = training_images(cfg, init)
    ensure_writable_dir(out)
    ck = run(cfg, out, init=init, images=images, resume=resume)
    click.echo(f"checkpoint: {out}  (weights {ck.hash()}; sample grids in {Path(out) / 'samples'})")


@main.command()
@click.argument("ckpt")
@sampler_options
@click.option("-n", "n", type=int, default=64, show_default=True, help="number of samples")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed (the same seed gives the same images)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output directory (grid.png, samples.npz)")
@device_option
def sample(ckpt, solver, nfe, runtime, spacing, eta, n, seed, batch_size, no_clip, out, device):
    """Sample images from a checkpoint.

    Writes grid.png and samples.npz (uint8) to --out."""
    from .checkpoint import load_checkpoint
    from .io import save_grid, save_npz, to_uint8
    from .models import image_shape
    from .sample import SampleConfig, SampleStats, sample_all

    from .io import ensure_writable_dir

    from .runtime import runtime_denoiser

    dev = resolve_device(device)
    ck = load_checkpoint(ckpt)
    solver, nfe, runtime = ck.sampling_defaults(solver, nfe, runtime)
    spacing = ck.default_spacing(spacing, solver)
    ensure_writable_dir(out)
    opts = {} if eta is None else {"eta": eta}
    cfg = SampleConfig(solver=solver, nfe=nfe, spacing=spacing, n=n, seed=seed, batch_size=batch_size,
                       clip_x0=not no_clip, opts=opts, device=str(dev))
    stats = SampleStats()
    x = sample_all(runtime_denoiser(ck, runtime, dev), image_shape(ck.arch), cfg, stats, progress=True)
    out = Path(out)
    try:
        save_grid(x[:256], out / "grid.png")
        save_npz(out / "samples.npz", images=to_uint8(x))
    except UserError:  # e.g. the disk filled up after the grid: leave no half a result
        (out / "grid.png").unlink(missing_ok=True)
        raise
    click.echo(f"{n} samples with {solver} on {runtime} ({dev}): NFE {stats.nfe} per sample, {stats.images_per_s:.1f} images/s "
               f"-> {out / 'grid.png'}, {out / 'samples.npz'}")


@main.command()
@click.argument("ckpt")
@click.option("--json", "as_json", is_flag=True, help="print the whole record as JSON")
def info(ckpt, as_json):
    """Show a checkpoint: size, MACs, runtime, lineage.

    Architecture, parameters (total and non-zero), MACs per image, schedule, the runtime and sampler
    sample/eval use by default, recorded training time and the whole lineage."""
    import torch

    from .checkpoint import load_checkpoint
    from .cost import count_params, macs_per_image
    from .models import image_shape

    ck = load_checkpoint(ckpt)
    shape = image_shape(ck.arch)
    solver, nfe, runtime = ck.sampling_defaults()
    rec = {"name": ck.name, "path": str(ck.path), "weights": ck.hash(), "architecture": ck.arch,
           "image_shape": list(shape), **count_params(ck.net), "macs_per_image": macs_per_image(ck.net, shape),
           "schedule": ck.schedule.to_dict(), "parameterization": ck.parameterization,
           "runtime_recorded": ck.meta.get("runtime"),
           "sampling_defaults": {"solver": solver, "nfe": nfe, "spacing": ck.default_spacing(None, solver), "runtime": runtime},
           "lineage": ck.lineage, "metrics": ck.meta.get("metrics", {})}
    if as_json:
        click.echo(json.dumps(rec, indent=2))
        return
    cfg = ck.arch["config"]
    channels = cfg.get("block_out_channels")
    surgery = [s.get("kind", "?") for s in ck.arch.get("surgery", [])]
    if surgery and hasattr(ck.net, "down_blocks"):  # pruned: the widths the network has now, per block
        channels = [max((m.out_channels for m in b.modules() if isinstance(m, torch.nn.Conv2d)), default=0)
                    for b in ck.net.down_blocks]
    recorded = "recorded by the checkpoint" if ck.meta.get("runtime") else "none recorded: the default"
    click.echo(f"{ck.name}  weights {rec['weights']}")
    click.echo(f"  network      {ck.arch['type']} channels {channels} "
               f"layers/block {cfg.get('layers_per_block')} image {shape}"
               + (f"; surgery: {', '.join(surgery)}" if surgery else ""))
    click.echo(f"  parameters   {rec['params']:,} ({rec['params_nonzero']:,} non-zero)")
    click.echo(f"  MACs/image   {rec['macs_per_image'] / 1e9:.4f} G")
    click.echo(f"  schedule     {ck.schedule.kind}, T={ck.schedule.T}; predicts {ck.parameterization}")
    click.echo(f"  runtime      {runtime} ({recorded})")
    click.echo(f"  samples by   {solver}, {nfe} NFE, {ck.default_spacing(None, solver)} spacing (what sample/eval use when not told)")
    times = _recorded_times(ck.meta)
    if times:
        click.echo(f"  time spent   {'; '.join(times)}")
    for i, step in enumerate(ck.lineage):
        settings = step.get("settings", step.get("args", {}))  # train records settings, recipe steps args
        items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(settings.items())] if isinstance(
            settings, dict) else [json.dumps(settings)]
        lines, cur = [], f"{step.get('step')} {{"
        for j, item in enumerate(items):  # whole, wrapped between items, never cut
            item += "," if j < len(items) - 1 else ""
            if len(cur) + len(item) > 84 and cur.strip():
                lines.append(cur)
                cur = ""
            cur += ("" if not cur or cur.endswith("{") else " ") + item
        lines.append(cur + "}")
        for k, line in enumerate(lines):
            click.echo((f"  lineage[{i}]   " if k == 0 else " " * 16) + line)


def _recorded_times(meta: dict) -> list[str]:
    """What the checkpoint's making cost, as recorded: training wall/CPU seconds, a step's train seconds."""
    out = []
    for key, rec in meta.items():
        if not isinstance(rec, dict):
            continue
        wall = rec.get("wall_seconds", rec.get("train_seconds"))
        if isinstance(wall, (int, float)):
            cpu = rec.get("cpu_seconds")
            out.append(f"{key} {wall:,.1f} s wall" + (f" ({cpu:,.1f} CPU-s)" if isinstance(cpu, (int, float)) else ""))
    return out


@main.command()
def zoo():
    """List the shipped models (use them anywhere as zoo:NAME)."""
    from .checkpoint import META_NAME, ZOO_DIR
    from .io import read_json

    found = sorted(d for d in ZOO_DIR.iterdir() if (d / META_NAME).is_file()) if ZOO_DIR.is_dir() else []
    if not found:
        click.echo("no shipped models")
    for d in found:
        meta = read_json(d / META_NAME)
        card = read_json(d / "card.json") if (d / "card.json").is_file() else {}
        size = (d / "model.safetensors").stat().st_size / 2**20
        click.echo(f"zoo:{d.name:<16} dataset {meta.get('dataset', '?'):<14} {size:5.1f} MB  "
                   f"{card.get('summary', '')}")


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False), help="output directory (results.jsonl, grids/, ckpts/, report/)")
@click.option("--model", default=None, help="checkpoint to run the demo on  [default: the shipped model its study file names]")
@click.option("-n", "n", type=int, default=None, help="samples per row  [default: 1000; 32 with --fast]")
@click.option("--fast", is_flag=True, help="six tiny rows (N=32): a smoke test of the whole flow")
@device_option
def demo(out, model, n, fast, device):
    """The main job: compress, evaluate, report.

    Samples, compresses and evaluates the shipped MNIST model with one protocol; writes the HTML report."""
    from .demo import DemoConfig, run_demo

    if n is not None and n <= 0:
        raise UserError(f"number of samples must be positive, got {n}")
    cfg = DemoConfig(**({"model": model} if model else {}), n=n, fast=fast, device=str(resolve_device(device)))
    index = run_demo(cfg, out, log=click.echo)
    click.echo(f"open {index}")


@main.command()
@click.argument("ckpt")
@click.option("--recipe", required=True, help='e.g. "prune(method=diff,ratio=0.5) > finetune(steps=600)"')
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output checkpoint directory")
@click.option("--dataset", default=None, help="training/calibration data (default: the checkpoint's)")
@click.option("--data-dir", default=None, help="directory with the dataset's files (IDX, CIFAR batches)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of calibration, fine-tuning and data order")
@device_option
def compress(ckpt, recipe, out, dataset, data_dir, seed, device):
    """Apply a compression recipe to a checkpoint.

    A killed run resumes after its last finished step."""
    from .checkpoint import load_checkpoint
    from .io import ensure_writable_dir
    from .recipe import apply_recipe, parse_recipe

    steps = parse_recipe(recipe)  # the whole recipe is checked before any work
    dev = resolve_device(device)
    ck = load_checkpoint(ckpt, dev)
    fresh = not Path(out).exists()
    ensure_writable_dir(out)
    try:  # progress goes to stdout: stderr holds nothing but an error's one line
        res = apply_recipe(ck, steps, out, dataset=dataset, data_dir=data_dir, seed=seed, log=click.echo, device=dev)
    except UserError:
        # A new output that holds no work yet (only the steps' started.json stamps) is removed; saved
        # work (a step's last good checkpoint or training state) stays, to inspect or resume.
        if fresh and all(p.name == "started.json" for p in Path(out).rglob("*") if p.is_file()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    solver, nfe, runtime = res.sampling_defaults()
    click.echo(f"{out}: {' > '.join(str(s) for s in steps)}; samples with {solver}-{nfe} on {runtime} by default")


@main.command("runtimes")
def runtimes_cmd():
    """List the runtimes and the devices each runs on.

    Marks which of those devices this machine has."""
    import torch

    from .runtime import RUNTIMES, runtime_devices

    here = {"cpu": True, "cuda": torch.cuda.is_available(),
            "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    click.echo("devices here: " + ", ".join(d for d, ok in here.items() if ok))
    for name in sorted(RUNTIMES):
        devices = runtime_devices(name)
        usable = [d for d in devices if here.get(d)]
        click.echo(f"{name:<14} runs on {', '.join(devices):<16} here: {', '.join(usable) or 'none':<12} "
                   f"{RUNTIMES[name].description}")


@main.command("recipes")
def recipes_cmd():
    """List the recipe steps and their arguments."""
    from .recipe import STEPS
    from .spec import REQUIRED, fmt_value

    for name in sorted(STEPS):
        spec = STEPS[name]
        args = ", ".join(f"{k}" if d is REQUIRED else f"{k}={fmt_value(d)}" for k, d in spec.params.items())
        click.echo(f"{name}({args})  {spec.description}")


# --- commands from the other stages register here -------------------------------------------
from .evaluate.commands import bench, classifier, eval_cmd, report  # noqa: E402  (the evaluation verbs)
main.add_command(classifier)
main.add_command(eval_cmd)
main.add_command(bench)
main.add_command(report)


@main.command("export")
@click.argument("ckpt")
@click.option("--onnx", "onnx_out", required=True, type=click.Path(dir_okay=False), help="output .onnx file (dynamic batch)")
def export_cmd(ckpt, onnx_out):
    """Export a checkpoint's network to ONNX (dynamic batch)."""
    from .checkpoint import load_checkpoint
    from .compress.onnx import export_onnx

    click.echo(f"{export_onnx(load_checkpoint(ckpt), onnx_out)}: inputs x [B,C,H,W], t [B]; output [B,C,H,W]")


@main.command("study")
@click.argument("study_toml", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="study directory (results.jsonl, ckpts/, report/)")
@device_option
def study_cmd(study_toml, out_dir, device):
    """Run a study grid (resumable).

    The grid: models × recipes × solvers × NFE × runtimes.
    Cells are appended to OUT/results.jsonl; the report and findings are written at the end."""
    from .study import load_study, run_study

    dev = resolve_device(device)  # a missing device fails before the study is read
    run_study(load_study(study_toml), out_dir, progress=False, log=click.echo, device=str(dev))
    click.echo(f"{out_dir}/report/index.html, {out_dir}/findings.md")


@main.command("ema")
@click.argument("run_dir")
@click.option("--solver", default="dpmpp-3m-sde", show_default=True, help="the proxy's solver")
@click.option("--nfe", type=int, default=10, show_default=True, callback=_positive, help="the proxy's network evaluations per sample")
@click.option("--spacing", default="trailing", show_default=True, help=f"the proxy's timestep spacing: {', '.join(SPACINGS)}")
@click.option("-n", "n", type=int, default=512, show_default=True, callback=_positive, help="samples per EMA")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="write the best EMA's checkpoint here (default: only print the scores)")
@device_option
def ema_cmd(run_dir, solver, nfe, spacing, n, out, device):
    """Pick a run's best EMA by an FID-dom proxy.

    Scores the EMA profiles kept by train --ema-decays with a cheap FID-dom proxy."""
    from .ema import ProxyConfig, select_ema, write_selected
    from .io import ensure_writable_dir

    cfg = ProxyConfig(solver=solver, nfe=nfe, spacing=spacing, n=n, device=str(resolve_device(device)))
    if out:
        ensure_writable_dir(out)
    best, scores = select_ema(run_dir, cfg, log=click.echo)
    click.echo(f"best EMA: {best} (FID-dom {scores[best]:.4f})")
    if out:
        click.echo(f"checkpoint: {write_selected(run_dir, best, scores, cfg, out)}")


if __name__ == "__main__":  # last: `python -m leandiff.cli` (torchrun) must see every command, ema included
    main()
