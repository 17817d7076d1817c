"""Studies: a grid of (checkpoint or base + recipe) × solver × NFE × runtime, evaluated cell by
cell, resumable, with a report and findings computed from the measured numbers.

A study is a TOML file (read with ``tomllib``)::

    title = "MiniDiff Table 1: samplers at equal NFE"
    n = 256            # generated samples per cell
    seed = 0
    batch_size = 256
    solvers = ["ddim", "dpmpp-2m"]
    nfe = [10, 20]
    runtimes = ["eager"]          # "ckpt": the runtime the checkpoint records (e.g. a cache step's)

    [[models]]
    name = "base"
    ckpt = "zoo:mnist-tiny"

    [[models]]
    name = "cached"
    base = "zoo:mnist-tiny"
    recipe = "cache(interval=3)"

    [[models]]
    name = "cached-int8"
    base = "model:cached"         # an earlier row's checkpoint, built once and reused
    recipe = "quant(w=8, a=8)"

    [[findings]]                  # a paper's claim, checked against the measured cells
    claim = "DPM-Solver++ beats DDIM at 10 NFE"
    metric = "fid_dom"            # a key of the row's quality or cost dict
    a = { model = "base", solver = "dpmpp-2m", nfe = 10 }
    b = { model = "base", solver = "ddim", nfe = 10 }
    relation = "a < b*factor"     # or "a > b*factor"
    factor = 1.0

Each finished cell is appended to ``DIR/results.jsonl`` at once; a rerun skips cells already
there (so a killed study resumes). Compressed checkpoints are built once into
``DIR/ckpts/<hash of base + recipe>`` (``apply_recipe`` itself resumes finished steps). The
classifier and reference statistics are loaded once per dataset and shared by every cell. At the
end the report (``leandiff.evaluate.write_report``) is written to ``DIR/report`` and the findings
— each stated as "agrees" or "disagrees" with the two measured numbers and their ratio — to
``DIR/findings.md``.
"""
from __future__ import annotations

import hashlib
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

RELATIONS = {
    "a < b*factor": lambda a, b, f: a < b * f,
    "a > b*factor": lambda a, b, f: a > b * f,
}


@dataclass(frozen=True)
class Model:
    name: str  # label used in cells and findings
    ckpt: str | None = None  # a checkpoint path or zoo:NAME
    base: str | None = None  # with recipe: the checkpoint the recipe starts from, or model:NAME (an earlier row)
    recipe: str | None = None  # a compression recipe (leandiff.recipe grammar)


@dataclass(frozen=True)
class Study:
    title: str  # report title
    models: tuple[Model, ...]  # checkpoints / base+recipe rows of the grid
    solvers: tuple[str, ...]  # solver names
    nfe: tuple[int, ...]  # network evaluations per sample
    runtimes: tuple[str, ...] = ("eager",)  # runtime names; "ckpt" = the checkpoint's own
    n: int = 256  # samples per cell
    seed: int = 0  # sampling seed
    batch_size: int = 256  # images per solver call
    latency: bool = False  # also measure per-evaluation latency per cell (slow)
    findings: tuple[dict, ...] = field(default_factory=tuple)  # claims checked against the cells


def load_study(path: str | Path) -> Study:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study file not found: {p}")
    try:
        d = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: invalid TOML: {e}") from None
    for k in ("models", "solvers", "nfe"):
        if not d.get(k):
            raise UserError(f"{p}: missing or empty {k!r}")
    models = []
    for i, m in enumerate(d["models"]):
        if "name" not in m or not (("ckpt" in m) ^ ("base" in m and "recipe" in m)):
            raise UserError(f"{p}: models[{i}] needs name and either ckpt or base + recipe")
        models.append(Model(m["name"], m.get("ckpt"), m.get("base"), m.get("recipe")))
    if len({m.name for m in models}) != len(models):
        raise UserError(f"{p}: model names must be unique")
    for i, m in enumerate(models):
        ref = _base_ref(m)
        if ref is not None and ref not in {e.name for e in models[:i]}:
            raise UserError(f"{p}: models[{i}] ({m.name}): base = {m.base!r} names no earlier model of this study")
    for i, f in enumerate(d.get("findings", [])):
        missing = [k for k in ("claim", "metric", "a", "b") if k not in f]
        if missing:
            raise UserError(f"{p}: findings[{i}] is missing {', '.join(missing)}")
        if f.get("relation", "a < b*factor") not in RELATIONS:
            raise UserError(f"{p}: findings[{i}].relation must be one of {', '.join(RELATIONS)}")
    return Study(title=d.get("title", p.stem), models=tuple(models), solvers=tuple(d["solvers"]),
                 nfe=tuple(int(x) for x in d["nfe"]), runtimes=tuple(d.get("runtimes", ["eager"])),
                 n=int(d.get("n", 256)), seed=int(d.get("seed", 0)), batch_size=int(d.get("batch_size", 256)),
                 latency=bool(d.get("latency", False)), findings=tuple(d.get("findings", [])))


def cells(study: Study) -> list[dict]:
    return [{"model": m.name, "solver": s, "nfe": k, "runtime": r, "n": study.n, "seed": study.seed}
            for m in study.models for s in study.solvers for k in study.nfe for r in study.runtimes]


def cell_key(c: dict) -> str:
    return json.dumps({k: c[k] for k in ("model", "solver", "nfe", "runtime", "n", "seed")}, sort_keys=True)


MODEL_REF = "model:"


def _base_ref(m: Model) -> str | None:
    """NAME when the model's base is ``model:NAME`` (another row of the study), else None."""
    return m.base[len(MODEL_REF):] if m.base and m.base.startswith(MODEL_REF) else None


def recipe_dir(out: Path, m: Model, models: dict[str, Model] | None = None) -> Path:
    """DIR/ckpts/<hash>: of base + recipe; a ``model:NAME`` base hashes as NAME's own directory, so
    a row built on another row is rebuilt when that row's recipe changes."""
    base = m.base
    ref = _base_ref(m)
    if ref is not None:
        parent = (models or {}).get(ref)
        if parent is None:
            raise UserError(f"study model {m.name}: base {m.base!r} names no model of this study")
        base = f"{MODEL_REF}{parent.ckpt or recipe_dir(out, parent, models).name}"
    h = hashlib.sha256(f"{base}\n{m.recipe}".encode()).hexdigest()[:16]
    return out / "ckpts" / h


def model_checkpoint(out: Path, m: Model, log=print, models: dict[str, Model] | None = None, device: str = "cpu"):
    """The model's checkpoint: loaded, or built once by its recipe into DIR/ckpts/<hash> and reused
    (a ``model:NAME`` base is NAME's checkpoint, built first when it is not yet)."""
    from .checkpoint import load_checkpoint
    from .recipe import apply_recipe, parse_recipe

    if m.ckpt:
        return load_checkpoint(m.ckpt)
    d = recipe_dir(out, m, models)
    if (d / "leandiff.json").is_file():
        return load_checkpoint(d)
    steps = parse_recipe(m.recipe)  # validate before loading anything
    ref = _base_ref(m)
    if ref is not None:
        parent = models[ref]
        base = model_checkpoint(out, parent, log=log, models=models, device=device)
        base_name = parent.ckpt or str(recipe_dir(out, parent, models))
    else:
        base, base_name = load_checkpoint(m.base), m.base
    log(f"study: building {m.name} = {base_name} > {m.recipe} into {d}")
    apply_recipe(base, steps, d, log=log, device=device)
    return load_checkpoint(d)


def run_study(study: Study, out_dir: str | Path, *, progress: bool = True, log=print,
              device: str = "cpu") -> list[dict]:
    """Evaluate every unfinished cell, append it to OUT/results.jsonl, then write the report. Recipes and
    cells compute on ``device`` (a leandiff.device spec); a cell whose runtime runs only on the CPU runs there."""
    from .evaluate import EvalConfig, append_row, evaluate_checkpoint, read_rows
    from .evaluate.harness import resolve_dataset
    from .runtime import row_device, runtime_label

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = out / "results.jsonl"
    done = {r["study_cell_key"]: r for r in read_rows([res])} if res.exists() else {}
    todo = cells(study)
    models = {m.name: m for m in study.models}
    ckpts, shared = {}, {}
    t_start = time.perf_counter()
    for i, c in enumerate(todo):
        key = cell_key(c)
        if key in done:
            log(f"[{i + 1}/{len(todo)}] {c['model']} {c['solver']}-{c['nfe']} {c['runtime']}: done, skipped")
            continue
        if c["model"] not in ckpts:
            ckpts[c["model"]] = model_checkpoint(out, models[c["model"]], log=log, models=models, device=device)
        ck = ckpts[c["model"]]
        rt = runtime_label(ck.sampling_defaults()[2]) if c["runtime"] == "ckpt" else c["runtime"]
        cfg = EvalConfig(solver=c["solver"], nfe=c["nfe"], n=c["n"], seed=c["seed"], batch_size=study.batch_size,
                         runtime=rt, spacing=ck.default_spacing(solver=c["solver"]), inception=False, device=str(row_device(rt, device)),
                         **({} if study.latency else {"latency": None}))
        ds = resolve_dataset(ck, None)
        if ds not in shared:  # the classifier and reference statistics, loaded once per dataset
            shared[ds] = _shared(ck, cfg)
        t0 = time.perf_counter()
        row = evaluate_checkpoint(ck, cfg, progress=progress, log=log, **shared[ds])
        row.update({"study_cell": c, "study_cell_key": key, "study_model": c["model"], "study_runtime": rt,
                    "study_seconds": time.perf_counter() - t0})
        append_row(res, row)
        done[key] = row
        log(f"[{i + 1}/{len(todo)}] {c['model']} {c['solver']}-{c['nfe']} {rt}: FID-dom "
            f"{row['quality']['fid_dom']:.4f} ({row['study_seconds']:.0f} s, {time.perf_counter() - t_start:.0f} s so far)")
    rows = [done[cell_key(c)] for c in todo]
    write_findings(study, rows, out)
    from .evaluate import write_report

    write_report(rows, out / "report", title=study.title)
    return rows


def _shared(ck, cfg) -> dict:
    """Classifier and reference statistics for ``evaluate_checkpoint``, when the harness exposes them."""
    from .evaluate import load_classifier, reference_stats
    from .evaluate.harness import resolve_dataset

    ds = resolve_dataset(ck, cfg.dataset)
    clf = load_classifier(cfg.classifier or ds)
    return {"classifier": clf, "reference": reference_stats(clf, ds, cfg.data_dir)}


def _metric(row: dict, metric: str) -> float:
    for part in ("quality", "cost"):
        if metric in (row.get(part) or {}):
            return float(row[part][metric])
    raise UserError(f"finding metric {metric!r} is not in the rows' quality or cost")


def _find(rows: list[dict], sel: dict) -> dict:
    hits = [r for r in rows if all(r["study_cell"].get(k) == v for k, v in sel.items())]
    if len(hits) != 1:
        raise UserError(f"finding selector {sel} matches {len(hits)} cells, expected exactly 1")
    return hits[0]


def evaluate_findings(study: Study, rows: list[dict]) -> list[dict]:
    """Each finding with the two measured values, their ratio and "agrees"/"disagrees"."""
    out = []
    for f in study.findings:
        a, b = _metric(_find(rows, f["a"]), f["metric"]), _metric(_find(rows, f["b"]), f["metric"])
        rel, factor = f.get("relation", "a < b*factor"), float(f.get("factor", 1.0))
        ok = RELATIONS[rel](a, b, factor)
        out.append({"claim": f["claim"], "metric": f["metric"], "a": f["a"], "b": f["b"], "a_value": a,
                    "b_value": b, "ratio": a / b if b else float("inf"), "relation": rel, "factor": factor,
                    "verdict": "agrees" if ok else "disagrees"})
    return out


def write_findings(study: Study, rows: list[dict], out: Path) -> Path:
    from .io import write_json, write_text

    fs = evaluate_findings(study, rows)
    lines = [f"# {study.title}: findings", "",
             "Each claim is checked against this study's measured cells (N, seed and protocol in results.jsonl).", ""]
    for f in fs:
        lines.append(f"- **{f['verdict']}** — {f['claim']}: {f['metric']} a={f['a_value']:.4g} ({f['a']}) vs "
                     f"b={f['b_value']:.4g} ({f['b']}); a/b = {f['ratio']:.3f}; tested {f['relation']} "
                     f"with factor {f['factor']}.")
    if not fs:
        lines.append("(no findings declared)")
    write_json(out / "findings.json", fs)
    write_text(out / "findings.md", "\n".join(lines) + "\n")
    return out / "findings.md"
