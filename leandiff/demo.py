"""``leandiff demo``: the project's main job, offline, on the shipped MNIST model.

It samples with a handful of solvers and NFEs, applies the compression methods that need no
training (bf16, real int8 through ONNX Runtime, feature caching, unstructured pruning), adds the
shipped distilled student (alone and stacked with int8), evaluates
every row with the same protocol (same N, seed, classifier, reference split), reads the 1000-step
DDPM reference row from the model card (labelled as such, not re-run: it takes most of an hour
here), and writes the HTML report.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoint import load_checkpoint, resolve
from .cost import LatencyConfig
from .errors import UserError
from .io import ensure_writable_dir, heartbeat
from .runtime import row_device


@dataclass(frozen=True)
class Row:
    """One demo row: a model (the base, or the base after a recipe) sampled by one solver on one runtime."""

    solver: str
    nfe: int
    runtime: str = "eager"  # "" means the runtime the compressed checkpoint records
    recipe: str = ""  # a compression recipe applied to the row's model ("" = the model itself)
    label: str = ""  # short name of the compressed model, e.g. "int8"
    model: str = ""  # another shipped checkpoint made from the base (a distilled student), e.g. zoo:mnist-tiny-pd4
    spacing: str = ""  # timestep spacing ("" = the checkpoint's recorded one, else schedule.DEFAULT_SPACING)


# Compression recipes of the demo (made once per output directory, cached in OUT/ckpts/):
# real int8 through ONNX Runtime with Q-Diffusion's timestep-spread calibration, and 30 %
# unstructured (global magnitude) pruning without fine-tuning. The caching rows need no recipe:
# DeepCache-style feature reuse is a runtime (cache[-nu]:k) of the base model.
INT8 = "quant(w=8,a=8,calib=qdiff,runtime=ort-int8)"
INT8_FAST = "quant(w=8,a=8,calib=qdiff,runtime=ort-int8,n=32,steps=10)"
SPARSE = "prune(method=global,ratio=0.3,structured=false)"
STUDENT = "zoo:mnist-tiny-pd4"  # made from zoo:mnist-tiny by progressive distillation (see its card)

# The rows of the full demo, chosen to fit ~10 minutes on 2 cores.
FULL_ROWS = (Row("ddim", 10), Row("ddim", 20),
             Row("dpmpp-2m", 10), Row("dpmpp-2m", 20), Row("dpmpp-3m", 10),
             Row("heun", 20), Row("ams-ddim", 20), Row("dpmpp-2m-sde", 20),
             # the best sampler at <= 10 NFE in benchmarks/results/solvers_n2048.md
             Row("dpmpp-3m-sde", 10, spacing="trailing"),
             Row("ddim", 20, "bf16"), Row("dpmpp-2m", 10, "bf16"),
             Row("ddim", 20, "", INT8, "int8"), Row("dpmpp-2m", 10, "", INT8, "int8"),
             Row("dpmpp-2m-sde", 20, "", INT8, "int8"),
             # the best stacked recipe found (benchmarks/results/e2e_int8.md): real int8 + dpmpp-3m-sde 10
             Row("dpmpp-3m-sde", 10, "", INT8, "int8", spacing="trailing"),
             Row("dpmpp-2m-sde", 20, "cache-nu:2"), Row("ddim", 20, "cache:2"),
             Row("ddim", 20, "", SPARSE, "sparse30"),
             # the shipped 4-step progressively distilled student, alone and stacked with real int8
             Row("ddim", 4, model=STUDENT), Row("ddim", 4, "", INT8, "int8", STUDENT))
FAST_ROWS = (Row("ddim", 4), Row("dpmpp-2m", 4), Row("ddim", 4, "bf16"),
             Row("ddim", 4, "", INT8_FAST, "int8"), Row("ddim", 4, "cache:2"), Row("ddim", 4, model=STUDENT))


@dataclass(frozen=True)
class DemoConfig:
    model: str = "zoo:mnist-tiny"  # the checkpoint the demo runs on
    n: int = 1000  # samples per row (the MNIST reference split has 1,000 digits)
    seed: int = 0  # one seed for every row
    fast: bool = False  # a few tiny rows: for tests and a first look
    batch_size: int = 500  # images per solver call
    device: str = "cpu"  # leandiff.device spec; rows whose runtime runs only on the CPU (int8) run there

    @property
    def rows(self):
        return FAST_ROWS if self.fast else FULL_ROWS


def card_rows(ckpt_path: Path, label: str) -> list[dict]:
    """The reference rows stored in the model card, relabelled as read, not re-run."""
    card = ckpt_path / "card.json"
    if not card.is_file():
        return []
    rows = json.loads(card.read_text()).get("rows", [])
    for r in rows:
        r["checkpoint"] = f"{label} [model card, N={r['protocol']['n']}]"
    return rows


def run_demo(cfg: DemoConfig, out_dir: str | Path, log=print) -> Path:
    """Run the demo into ``out_dir`` (results.jsonl, grids/, report/); return the report's index.html.
    A rerun skips the rows already in results.jsonl."""
    from .evaluate.classifier import load_classifier
    from .evaluate.harness import EvalConfig, append_row, evaluate_checkpoint, markdown_header, markdown_row, read_rows
    from .evaluate.protocol import write_rows
    from .evaluate.harness import resolve_dataset
    from .evaluate.reference import reference_stats
    from .evaluate.report import write_report

    out = ensure_writable_dir(out_dir)
    t0 = time.perf_counter()
    ck = load_checkpoint(cfg.model)
    dataset = resolve_dataset(ck, None)
    clf = load_classifier(dataset)
    ref = reference_stats(clf, dataset, progress=True)
    results = out / "results.jsonl"
    rows = read_rows([results]) if results.is_file() else []
    done = {(r["protocol"]["solver"], r["protocol"]["nfe"], r["protocol"]["runtime"], r["protocol"]["n"],
             r["checkpoint"], r["protocol"]["spacing"]) for r in rows}
    n = 32 if cfg.fast else cfg.n
    latency = LatencyConfig(batch_sizes=(1, 16), rounds=3, warmup=1) if cfg.fast else LatencyConfig(rounds=3)
    log(f"demo: {cfg.model} ({dataset}), {len(cfg.rows)} rows × N={n}, results in {results}")
    log(markdown_header())
    models = {("", ""): ck}
    timed: dict[tuple[str, str], object] = {}  # (row name, runtime) -> model: the networks of the latency pass
    for i, r in enumerate(cfg.rows, 1):
        if (r.model, "") not in models:  # another shipped checkpoint, used only if made from the demo's model
            other = load_checkpoint(r.model)
            made_from_base = ck.hash() in {st.get("parent") for st in other.lineage}
            if not made_from_base:
                log(f"note: {r.model} was not made from {cfg.model}; its rows are skipped")
            models[(r.model, "")] = other if made_from_base else None
        start = models[(r.model, "")]
        if start is None:
            continue
        if (r.model, r.recipe) not in models:
            with heartbeat(f"row {i}/{len(cfg.rows)}: making {r.label}", log):
                models[(r.model, r.recipe)] = _compressed(start, r, out / "ckpts" / _tag(r), log, cfg.device)
        model = models[(r.model, r.recipe)]
        runtime = r.runtime or model.sampling_defaults()[2]
        name = r.model or cfg.model
        name = f"{name} > {r.label}" if r.recipe else name
        spacing = r.spacing or model.default_spacing(solver=r.solver)
        key = (r.solver, r.nfe, runtime, n, name, spacing)
        timed[(name, runtime)] = model
        if key in done:
            continue
        # latency=None: every row's network is timed afterwards in one pass (see _latency_pass)
        ecfg = EvalConfig(solver=r.solver, nfe=r.nfe, n=n, seed=cfg.seed, runtime=runtime,
                          spacing=spacing, batch_size=min(cfg.batch_size, n), latency=None, inception=False,
                          mse_n=min(n, 1000), device=str(row_device(runtime, cfg.device)))
        # no ':' in file names (cache:2): a relative link "a-cache:2.png" would read as a URL scheme
        grid = out / "grids" / f"{_tag(r)}-{r.solver}-{r.nfe}-{runtime.replace(':', '')}.png"
        with heartbeat(f"row {i}/{len(cfg.rows)}: {name} {r.solver}-{r.nfe} on {runtime}", log):
            row = evaluate_checkpoint(model, ecfg, classifier=clf, reference=ref, grid_path=grid, progress=True,
                                      log=lambda *_: None)
        row["checkpoint"] = name  # the row's recipe, origin and parent come from the model's lineage
        append_row(results, row)
        rows.append(row)
        log(markdown_row(row))
    if any("latency_ms" not in r["cost"] for r in rows):
        with heartbeat("latency of every row's network, one pass", log):
            _latency_pass(rows, timed, latency, log, cfg.device)
        write_rows(results, rows)
    reference = card_rows(resolve(cfg.model), cfg.model)
    if not reference:
        log(f"note: {cfg.model} has no model card; the report has no 1000-step reference row")
    index = write_report(reference + rows, out / "report", title=f"leandiff demo: {cfg.model}")
    log(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {index}")
    return index


def _latency_pass(rows: list[dict], timed: dict, latency: LatencyConfig, log, device: str = "cpu") -> None:
    """Time every (model, runtime) of the rows in one pass, all networks in the same alternating rounds
    (as ``leandiff bench`` does), so that a busy moment does not fall on one row alone; write the figures,
    and the load during the pass, into each row's cost. Each network is timed on its row's device (one
    pass per device: a CPU-only runtime's rows on the CPU)."""
    from dataclasses import asdict

    from .cost import machine_load, measure_latency
    from .models import image_shape
    from .runtime import get_runtime

    if not timed:
        return
    shape = image_shape(next(iter(timed.values())).arch)
    by_device: dict = {}
    for (name, rt), model in timed.items():
        by_device.setdefault(row_device(rt, device), []).append((name, rt, model))
    lat, count = {}, len(timed)
    for dev, items in by_device.items():  # networks of one device built together (a model moves with them)
        nets = {f"{name} [{rt}]": get_runtime(rt, dev)(model) for name, rt, model in items}
        log(f"latency: {len(nets)} networks on {dev} × batch {', '.join(map(str, latency.batch_sizes))}, "
            f"{latency.rounds} alternating rounds")
        lat.update(measure_latency(nets, shape, latency, progress=True, device=dev))
    load = machine_load()
    for r in rows:
        got = lat.get(f"{r['checkpoint']} [{r['protocol']['runtime']}]")
        if got is None:
            continue
        r["cost"]["latency_ms"] = {str(b): v["median_ms"] for b, v in got.items()}
        r["cost"]["latency_ms_per_image"] = {str(b): v["ms_per_image"] for b, v in got.items()}
        r["cost"].setdefault("load", {})["latency"] = load
        r["protocol"]["latency"] = {**asdict(latency), "pass": f"one pass over the {count} networks of the demo"}
    for key, got in lat.items():
        b = max(got)
        log(f"  {key}: {got[b]['median_ms']:.2f} ms per evaluation at batch {b}")


def _tag(row: Row) -> str:
    """A file-name stem unique to the row's model: [other model-]label, or base."""
    model = row.model.replace("zoo:", "").replace("/", "_").replace(":", "_")
    return "-".join(p for p in (model, row.label or ("" if model else "base")) if p)


def _compressed(base, row: Row, ckpt_dir: Path, log, device: str = "cpu"):
    """The base model after ``row.recipe``, made once (resumable) and cached in ``ckpt_dir``."""
    from .recipe import apply_recipe

    log(f"compress: {row.label} = {row.recipe}")
    return apply_recipe(base, row.recipe, ckpt_dir, log=lambda m: log(f"  {m}"), device=device)
