"""``leandiff bench``: the cost table of one or more checkpoints under one or more runtimes."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..device import resolve_device
from ..cost import (LatencyConfig, PeakMemory, checkpoint_bytes, count_params, machine_info, macs_per_image,
                    measure_latency)


@dataclass(frozen=True)
class BenchConfig:
    runtimes: tuple = ("eager",)  # names in leandiff.runtime.RUNTIMES
    latency: LatencyConfig = LatencyConfig()  # batch sizes, warm-up, alternating rounds
    solver: str | None = None  # with nfe: also end-to-end images/s of sampling
    nfe: int | None = None
    n: int = 64  # images for the end-to-end figure
    batch_size: int = 64  # solver batch for the end-to-end figure
    device: str = "cpu"  # leandiff.device spec: auto, cpu, cuda[:N], mps


def run_bench(ckpts: list, cfg: BenchConfig = BenchConfig(), progress: bool = False) -> dict:
    """``{"config", "machine", "rows": [{checkpoint, runtime, params, macs_per_image, weights_bytes,
    latency_ms{batch}, ms_per_image{batch}, images_per_s{batch}, peak memory, [sampling_images_per_s]}]}``.
    All (checkpoint, runtime) pairs of one image shape are timed in the same alternating rounds."""
    from ..checkpoint import load_checkpoint
    from ..denoiser import Denoiser, call_network
    from ..models import image_shape
    from ..runtime import get_runtime, runtime_network
    from ..sample import SampleConfig, SampleStats, generate

    device = resolve_device(cfg.device)
    for r in cfg.runtimes:
        get_runtime(r, device)  # unknown runtimes and runtimes that do not run on the device fail first
    loaded = [(ck.name, ck) for ck in (load_checkpoint(c, device) for c in ckpts)]  # zoo:NAME for a shipped model, as eval names it
    rows, nets, by_shape = [], {}, {}
    for label, ck in loaded:
        shape = image_shape(ck.arch)
        static = {**count_params(ck.net), "macs_per_image": macs_per_image(ck.net, shape),
                  "weights_bytes": checkpoint_bytes(ck), "image_shape": list(shape)}
        for r in cfg.runtimes:
            key = f"{label} [{r}]"
            net = runtime_network(ck, r, device)
            # Memory of the first evaluation at the largest batch (includes one-time allocations).
            b = max(cfg.latency.batch_sizes)
            with PeakMemory(device=device) as mem, torch.no_grad():
                call_network(net, torch.zeros(b, *shape, device=device), torch.full((b,), cfg.latency.t, device=device))
            row = {"checkpoint": label, "weights": ck.hash(), "runtime": r,
                   "runtime_description": getattr(get_runtime(r), "description", r), **static,
                   "memory_batch": b, **mem.as_dict()}
            if cfg.solver is not None:
                stats = SampleStats()
                scfg = SampleConfig(solver=cfg.solver, nfe=cfg.nfe, n=cfg.n, batch_size=cfg.batch_size,
                                    device=str(device))
                for _ in generate(Denoiser(net, ck.schedule, ck.parameterization), shape, scfg, stats, progress):
                    pass
                row.update(solver=cfg.solver, nfe=cfg.nfe, nfe_used=stats.nfe,
                           sampling_images_per_s=stats.images_per_s)
            rows.append(row)
            nets[key] = net
            by_shape.setdefault(tuple(shape), []).append((key, row))
    for shape, group in by_shape.items():
        lat = measure_latency({k: nets[k] for k, _ in group}, shape, cfg.latency, progress=progress, device=device)
        for key, row in group:
            row["latency_ms"] = {str(b): v["median_ms"] for b, v in lat[key].items()}
            row["ms_per_image"] = {str(b): v["ms_per_image"] for b, v in lat[key].items()}
            row["images_per_s"] = {str(b): v["images_per_s"] for b, v in lat[key].items()}
    return {"config": asdict(cfg), "machine": machine_info(device), "rows": rows}


def bench_markdown(record: dict) -> str:
    sizes = [str(b) for b in record["config"]["latency"]["batch_sizes"]]
    e2e = record["config"]["solver"] is not None
    gpu = any("peak_gpu_mb" in r for r in record["rows"])
    head = (["checkpoint", "runtime", "params", "non-zero", "MMAC/img", "MB on disk"]
            + [f"ms/eval @{b}" for b in sizes] + [f"img-evals/s @{b}" for b in sizes]
            + ["peak RSS MB", "RSS +MB"] + (["peak GPU MB"] if gpu else []) + (["NFE", "img/s sampling"] if e2e else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in record["rows"]:
        cells = [r["checkpoint"], r["runtime"], f"{r['params']:,}", f"{r['params_nonzero']:,}",
                 f"{r['macs_per_image'] / 1e6:.1f}", f"{r['weights_bytes'] / 2**20:.2f}"]
        cells += [f"{r['latency_ms'][b]:.2f}" for b in sizes] + [f"{r['images_per_s'][b]:.0f}" for b in sizes]
        cells += [str(r["peak_rss_mb"]), str(r["rss_increase_mb"])] + ([str(r.get("peak_gpu_mb"))] if gpu else [])
        if e2e:
            cells += [f"{r['nfe_used']:g}", f"{r['sampling_images_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    m = record["machine"]
    lines.append("")
    gpu_note = (f" Device {m['device']}: {m['gpu']}, {m['gpu_memory_mb']} MiB, driver {m['driver']}, CUDA {m['cuda']}."
                if m.get("gpu_memory_mb") else (f" Device {m['device']}." if m.get("device") else ""))
    lines.append(f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
                 f"{m['platform']}.{gpu_note} Latency: median of {record['config']['latency']['rounds']} alternating rounds "
                 f"after {record['config']['latency']['warmup']} warm-up calls.")
    return "\n".join(lines) + "\n"
