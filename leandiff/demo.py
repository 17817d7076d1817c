"""``leandiff demo``: the project's main job, offline, on the shipped MNIST model.

The demo is a shipped study file, ``leandiff/studies/demo.toml`` (``demo-fast.toml`` for ``--fast``), run
by the study runner: it samples with a handful of solvers and NFEs, applies the compression methods that
need no training (bf16, real int8 through ONNX Runtime, feature caching, unstructured pruning), adds the
shipped distilled student (alone and stacked with int8), evaluates every row with the same protocol (same
N, seed, classifier, reference split), reads the 1000-step DDPM reference row from the model card
(labelled as such, not re-run: it takes hours here), times every row's network in one pass and
writes the HTML report. ``leandiff study leandiff/studies/demo.toml --out DIR`` runs the same thing.
"""
from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from .io import ensure_writable_dir
from .study import load_study, run_study, study_from_dict

STUDIES = Path(__file__).resolve().parent / "studies"
SHIPPED_MODEL = "zoo:mnist-tiny-v2"  # the model the shipped study files name


@dataclass(frozen=True)
class DemoConfig:
    model: str = SHIPPED_MODEL  # the checkpoint the demo runs on
    n: int | None = None  # samples per row (None: the study file's, 1,000; the fast study's 32)
    fast: bool = False  # a few tiny rows: for tests and a first look
    device: str = "cpu"  # leandiff.device spec; rows whose runtime runs only on the CPU (int8) run there

    @property
    def study_file(self) -> Path:
        return STUDIES / ("demo-fast.toml" if self.fast else "demo.toml")


def demo_study(cfg: DemoConfig):
    """The demo's study: the shipped file, on ``cfg.model`` instead of zoo:mnist-tiny-v2 when another is given,
    with ``cfg.n`` samples per row (batches and the MSE's images at most that many)."""
    if cfg.model == SHIPPED_MODEL:
        study = load_study(cfg.study_file)
    else:
        d = tomllib.loads(cfg.study_file.read_text())
        for m in d["models"]:
            m.update({k: _on(cfg.model, m[k]) for k in ("ckpt", "base", "label") if isinstance(m.get(k), str)})
        d["title"] = d["title"].replace(SHIPPED_MODEL, cfg.model)
        study = study_from_dict(d, str(cfg.study_file), "demo")
    if cfg.n is not None:
        study = replace(study, n=cfg.n, batch_size=min(study.batch_size, cfg.n), mse_n=min(study.mse_n, cfg.n))
    return study


def _on(model: str, text: str) -> str:
    """``text`` with the shipped model's name replaced by ``model`` where it names that model (not zoo:mnist-tiny-v2-pd4)."""
    return model + text[len(SHIPPED_MODEL):] if text == SHIPPED_MODEL or text.startswith(SHIPPED_MODEL + " ") else text


def run_demo(cfg: DemoConfig, out_dir: str | Path, log=print) -> Path:
    """Run the demo into ``out_dir`` (results.jsonl, grids/, ckpts/, report/); return the report's index.html.
    A rerun skips the rows already in results.jsonl."""
    out = ensure_writable_dir(out_dir)
    t0 = time.perf_counter()
    study = demo_study(cfg)
    log(f"demo: {cfg.model}, {len(study.cells)} rows × N={study.n} ({cfg.study_file.name}), "
        f"results in {out / 'results.jsonl'}")
    run_study(study, out, log=log, device=cfg.device)
    index = out / "report" / "index.html"
    log(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {index}")
    return index
