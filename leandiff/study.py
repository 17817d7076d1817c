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

Instead of (or besides) the grid, a study may list its cells one by one, each with its own solver, NFE,
runtime and spacing, and say how the rows are timed and what heads the report (the shipped demo,
``leandiff/studies/demo.toml``, is such a study)::

    [[cells]]
    model = "int8"
    solver = "dpmpp-3m-sde"
    nfe = 10
    runtime = "ckpt"
    spacing = "trailing"          # default: the checkpoint's own for that solver

    latency = { pass = true, batch_sizes = [1, 16, 64], rounds = 3 }   # one alternating pass at the end
    reference_card = "base"       # the model card's rows of that model head the report (read, not re-run)
    grids = true                  # a sample grid per cell in DIR/grids/

A model may carry ``label`` (the rows' checkpoint name; default its checkpoint's) and ``made_from``
(another model of the study: its cells are skipped, with a note, unless its lineage starts from that
model's weights: a shipped student of another base is not compared with this one).

A model whose recipe, or a cell whose runtime, needs an optional extra this install lacks (``openvino``)
is skipped with a note naming the extra, and the rest of the study runs.

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

from .errors import MissingExtra, UserError

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
    label: str | None = None  # the rows' checkpoint name (default: the checkpoint's own, zoo:NAME or its path)
    made_from: str | None = None  # a model of this study whose weights this one's lineage must start from


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
    cells: tuple[dict, ...] = ()  # cells listed one by one ({model, solver, nfe[, runtime, spacing]}), after the grid's
    latency_pass: dict | None = None  # LatencyConfig fields: time every cell's network in one pass at the end
    reference_card: str | None = None  # a model whose card rows head the report
    grids: bool = False  # a sample grid per cell in DIR/grids/
    mse_n: int = 1000  # held-out images of the MiniDiff MSE


def load_study(path: str | Path) -> Study:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study file not found: {p}")
    try:
        d = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: invalid TOML: {e}") from None
    return study_from_dict(d, str(p), p.stem)


CELL_KEYS = ("model", "solver", "nfe", "runtime", "spacing")
LATENCY_KEYS = ("batch_sizes", "rounds", "warmup")


def study_from_dict(d: dict, where: str, default_title: str = "study") -> Study:
    """A study from its TOML table (checked: one line naming ``where`` for every mistake)."""
    p = where
    if not d.get("models"):
        raise UserError(f"{p}: missing or empty 'models'")
    if not d.get("cells"):
        for k in ("solvers", "nfe"):
            if not d.get(k):
                raise UserError(f"{p}: missing or empty {k!r} (or list the cells one by one in [[cells]])")
    models = []
    for i, m in enumerate(d["models"]):
        if "name" not in m or not (("ckpt" in m) ^ ("base" in m and "recipe" in m)):
            raise UserError(f"{p}: models[{i}] needs name and either ckpt or base + recipe")
        models.append(Model(m["name"], m.get("ckpt"), m.get("base"), m.get("recipe"), m.get("label"),
                            m.get("made_from")))
    names = [m.name for m in models]
    if len(set(names)) != len(models):
        raise UserError(f"{p}: model names must be unique")
    for i, m in enumerate(models):
        ref = _base_ref(m)
        if ref is not None and ref not in names[:i]:
            raise UserError(f"{p}: models[{i}] ({m.name}): base = {m.base!r} names no earlier model of this study")
        if m.made_from is not None and m.made_from not in names:
            raise UserError(f"{p}: models[{i}] ({m.name}): made_from = {m.made_from!r} names no model of this study")
    listed = []
    for i, c in enumerate(d.get("cells", [])):
        bad = [k for k in c if k not in CELL_KEYS]
        if bad or not {"model", "solver", "nfe"} <= set(c):
            raise UserError(f"{p}: cells[{i}] needs model, solver and nfe (and may set runtime, spacing); "
                            f"got {', '.join(sorted(c))}")
        if c["model"] not in names:
            raise UserError(f"{p}: cells[{i}]: model {c['model']!r} is not one of the study's models")
        listed.append({k: c[k] for k in CELL_KEYS if k in c})
    lat = d.get("latency", False)
    if isinstance(lat, dict):
        bad = [k for k in lat if k not in ("pass", *LATENCY_KEYS)]
        if bad or lat.get("pass") is not True:
            raise UserError(f"{p}: latency as a table is {{ pass = true, {', '.join(LATENCY_KEYS)} }}; got {lat}")
    elif not isinstance(lat, bool):
        raise UserError(f"{p}: latency must be true, false or a table {{ pass = true, ... }}")
    ref_card = d.get("reference_card")
    if ref_card is not None and ref_card not in names:
        raise UserError(f"{p}: reference_card = {ref_card!r} names no model of this study")
    for i, f in enumerate(d.get("findings", [])):
        missing = [k for k in ("claim", "metric", "a", "b") if k not in f]
        if missing:
            raise UserError(f"{p}: findings[{i}] is missing {', '.join(missing)}")
        if f.get("relation", "a < b*factor") not in RELATIONS:
            raise UserError(f"{p}: findings[{i}].relation must be one of {', '.join(RELATIONS)}")
    return Study(title=d.get("title", default_title), models=tuple(models), solvers=tuple(d.get("solvers", ())),
                 nfe=tuple(int(x) for x in d.get("nfe", ())), runtimes=tuple(d.get("runtimes", ["eager"])),
                 n=int(d.get("n", 256)), seed=int(d.get("seed", 0)), batch_size=int(d.get("batch_size", 256)),
                 latency=lat is True, findings=tuple(d.get("findings", [])), cells=tuple(listed),
                 latency_pass={k: v for k, v in lat.items() if k != "pass"} if isinstance(lat, dict) else None,
                 reference_card=ref_card, grids=bool(d.get("grids", False)), mse_n=int(d.get("mse_n", 1000)))


def cells(study: Study) -> list[dict]:
    """The grid's cells, then the listed ones (runtime "eager" unless given)."""
    grid = [{"model": m.name, "solver": s, "nfe": k, "runtime": r, "n": study.n, "seed": study.seed}
            for m in study.models for s in study.solvers for k in study.nfe for r in study.runtimes]
    return grid + [{"runtime": "eager", **c, "n": study.n, "seed": study.seed} for c in study.cells]


def cell_key(c: dict) -> str:
    """A cell's identity in results.jsonl (a spacing only when the cell names one)."""
    keys = ("model", "solver", "nfe", "runtime", "n", "seed") + (("spacing",) if c.get("spacing") else ())
    return json.dumps({k: c[k] for k in keys}, sort_keys=True)


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
    from .cost import LatencyConfig
    from .evaluate import EvalConfig, append_row, evaluate_checkpoint, read_rows, write_report
    from .evaluate.harness import resolve_dataset
    from .evaluate.protocol import write_rows
    from .io import heartbeat
    from .runtime import row_device, runtime_label

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = out / "results.jsonl"
    done = {r["study_cell_key"]: r for r in read_rows([res])} if res.exists() else {}
    todo = cells(study)
    models = {m.name: m for m in study.models}
    ckpts, shared, timed, skipped, skipped_cells = {}, {}, {}, set(), set()
    t_start = time.perf_counter()

    def checkpoint(name: str):
        """The model's checkpoint; None (the model skipped, with a note) when its recipe needs an optional
        extra this install lacks."""
        if name not in ckpts:
            try:
                with heartbeat(f"study: making {name}", log):
                    ckpts[name] = model_checkpoint(out, models[name], log=log, models=models, device=device)
            except MissingExtra as e:
                m = models[name]
                log(f"note: {m.label or m.ckpt or m.name}: {e}; its cells are skipped")
                ckpts[name] = None
                skipped.add(name)
        return ckpts[name]

    for i, c in enumerate(todo):
        key, m = cell_key(c), models[c["model"]]
        if m.made_from is not None and c["model"] not in skipped:
            ck, base = checkpoint(c["model"]), checkpoint(m.made_from)
            if ck is not None and base is not None and not _made_from(ck, base):
                log(f"note: {m.label or m.ckpt or m.name} was not made from {models[m.made_from].label or m.made_from}; "
                    f"its cells are skipped")
                skipped.add(c["model"])
        if c["model"] in skipped:
            continue
        if key in done and not study.latency_pass:
            log(f"[{i + 1}/{len(todo)}] {c['model']} {c['solver']}-{c['nfe']} {c['runtime']}: done, skipped")
            continue
        ck = checkpoint(c["model"])
        if ck is None:
            continue
        rt = runtime_label(ck.sampling_defaults()[2]) if c["runtime"] == "ckpt" else c["runtime"]
        timed[(c["model"], rt)] = ck
        if key in done:
            continue
        cfg = EvalConfig(solver=c["solver"], nfe=c["nfe"], n=c["n"], seed=c["seed"], batch_size=study.batch_size,
                         runtime=rt, spacing=c.get("spacing") or ck.default_spacing(solver=c["solver"]),
                         inception=False, mse_n=study.mse_n, device=str(row_device(rt, device)),
                         **({} if study.latency and not study.latency_pass else {"latency": None}))
        ds = resolve_dataset(ck, None)
        if ds not in shared:  # the classifier and reference statistics, loaded once per dataset
            shared[ds] = _shared(ck, cfg)
        grid = out / "grids" / f"{c['model']}-{c['solver']}-{c['nfe']}-{rt.replace(':', '')}.png" if study.grids else None
        t0 = time.perf_counter()
        try:
            with heartbeat(f"[{i + 1}/{len(todo)}] {c['model']} {c['solver']}-{c['nfe']} on {rt}", log):
                row = evaluate_checkpoint(ck, cfg, progress=progress, log=log, grid_path=grid, **shared[ds])
        except MissingExtra as e:  # its runtime needs an optional extra this install lacks
            log(f"note: [{i + 1}/{len(todo)}] {c['model']} {c['solver']}-{c['nfe']} on {rt}: {e}; the cell is skipped")
            timed.pop((c["model"], rt), None)
            skipped_cells.add(key)
            continue
        if m.label:
            row["checkpoint"] = m.label
        row.update({"study_cell": c, "study_cell_key": key, "study_model": c["model"], "study_runtime": rt,
                    "study_seconds": time.perf_counter() - t0})
        append_row(res, row)
        done[key] = row
        log(f"[{i + 1}/{len(todo)}] {c['model']} {c['solver']}-{c['nfe']} {rt}: FID-dom "
            f"{row['quality']['fid_dom']:.4f} ({row['study_seconds']:.0f} s, {time.perf_counter() - t_start:.0f} s so far)")
    rows = [done[cell_key(c)] for c in todo if c["model"] not in skipped and cell_key(c) not in skipped_cells]
    if study.latency_pass and any("latency_ms" not in r["cost"] for r in rows):
        with heartbeat("latency of every cell's network, one pass", log):
            latency_pass(rows, timed, LatencyConfig(**{k: tuple(v) if k == "batch_sizes" else v
                                                       for k, v in study.latency_pass.items()}), log, device)
        write_rows(res, rows)
    write_findings(study, rows, out)
    reference = []
    if study.reference_card:
        ref = models[study.reference_card]
        reference = card_rows(ref.ckpt, ref.label or ref.ckpt) if ref.ckpt else []
        if not reference:
            log(f"note: {ref.label or ref.name} has no model card; the report has no 1000-step reference row")
    write_report(reference + rows, out / "report", title=study.title)
    return rows


def _made_from(ck, base) -> bool:
    return base.hash() in {st.get("parent") for st in ck.lineage}


def card_rows(ckpt: str, label: str) -> list[dict]:
    """The rows of a checkpoint's model card (``card.json`` beside it), relabelled as read, not re-run."""
    from .checkpoint import resolve

    card = resolve(ckpt) / "card.json"
    if not card.is_file():
        return []
    rows = json.loads(card.read_text()).get("rows", [])
    for r in rows:
        r["checkpoint"] = f"{label} [model card, N={r['protocol']['n']}]"
    return rows


def latency_pass(rows: list[dict], timed: dict, latency, log, device: str = "cpu") -> None:
    """Time every (model, runtime) of the rows in one pass, all networks in the same alternating rounds
    (as ``leandiff bench`` does), so that a busy moment does not fall on one row alone; write the figures,
    and the load during the pass, into each row's cost. Each network is timed on its row's device (one
    pass per device: a CPU-only runtime's rows on the CPU)."""
    from dataclasses import asdict

    from .cost import machine_load, measure_latency
    from .models import image_shape
    from .runtime import get_runtime, row_device

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
        got = lat.get(f"{r['study_model']} [{r['study_runtime']}]")
        if got is None:
            continue
        r["cost"]["latency_ms"] = {str(b): v["median_ms"] for b, v in got.items()}
        r["cost"]["latency_ms_per_image"] = {str(b): v["ms_per_image"] for b, v in got.items()}
        r["cost"].setdefault("load", {})["latency"] = load
        r["protocol"]["latency"] = {**asdict(latency), "pass": f"one pass over the {count} networks of the study"}
    for key, got in lat.items():
        b = max(got)
        log(f"  {key}: {got[b]['median_ms']:.2f} ms per evaluation at batch {b}")


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
