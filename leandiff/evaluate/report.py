"""``leandiff report``: eval rows -> ``index.html``, ``report.md`` and ``results.csv`` in one directory
that can be copied anywhere (grids are copied in; every file the page references lies beside it).

The page answers "which one should I use?" first: per NFE budget the row with the best FID-dom, the
fastest and the smallest row within 1.10× of the reference, beside the FID-vs-time Pareto plot (an
inline SVG whose points name their row on hover). Then the sortable table (best of each column marked),
a glossary of every column, the FID-vs-NFE plot, a gallery (real held-out images first) and the protocol.

Ratios mean one thing: every row's FID-dom over its *root reference*, the reference row (eager, most
NFE) of the model its lineage started from (the base; DDPM-1000 from the model card in the demo); and,
where that is a different row, over its *parent row*: the model just before the row's last recipe step
(or the same weights on the eager runtime) sampled with the same solver, NFE and spacing.
"""
from __future__ import annotations

import csv
import html
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..io import write_text
from ..schedule import SPACINGS
from .protocol import flatten

WITHIN = 1.10  # "within 1.10× of the reference": the quality bar of the recommendations
BUDGETS = (4, 10, 20)  # NFE budgets of the recommendations
REAL_GRID_N = 64  # held-out images in the gallery's real grid


# --- ratios ----------------------------------------------------------------------------------------

def _nfe(r: dict) -> float:
    return r["protocol"]["nfe_used"]


def _reference_rows(rows: list[dict]) -> tuple[dict, dict]:
    """({weights: its eager row with the most NFE}, {dataset: the same over the dataset}); ties: the first."""
    by_w: dict[str, dict] = {}
    by_ds: dict = {}
    for r in rows:
        if r["protocol"]["runtime"] != "eager":
            continue
        for table, key in ((by_w, r["weights"]), (by_ds, r.get("dataset"))):
            cur = table.get(key)
            if cur is None or _nfe(r) > _nfe(cur):
                table[key] = r
    return by_w, by_ds


def root_references(rows: list[dict]) -> list[dict | None]:
    """Each row's root reference row: the eager row with the most NFE of the weights its lineage started
    from (``row["origin"]``; rows written before it was recorded: their own weights). A row that is its
    own only such row without a recorded origin (an older pruned or distilled row evaluated once), or
    whose origin has no row here, falls back to its dataset's eager row with the most NFE."""
    by_w, by_ds = _reference_rows(rows)
    out = []
    for r in rows:
        ref = by_w.get(r.get("origin") or r["weights"])
        if ref is None or (ref is r and not r.get("origin")):
            ref = by_ds.get(r.get("dataset"))
        out.append(ref)
    return out


def reference_ratios(rows: list[dict]) -> list[float | None]:
    """FID-dom of each row over its root reference row's (see :func:`root_references`); None without one."""
    out = []
    for r, ref in zip(rows, root_references(rows)):
        f = ref["quality"]["fid_dom"] if ref else None
        out.append(r["quality"]["fid_dom"] / f if f else None)
    return out


def parent_rows(rows: list[dict], roots: list[dict | None] | None = None) -> list[dict | None]:
    """Each row's parent row: the model before its last recipe step (``row["parent"]``; else the same
    weights) on the eager runtime with the same solver, NFE and spacing, else that model's reference row.
    None where that is the row itself or its root reference (the ratio would say nothing new)."""
    roots = root_references(rows) if roots is None else roots
    by_w, _ = _reference_rows(rows)

    def same_sampler(a, b):
        pa, pb = a["protocol"], b["protocol"]
        return (pa["solver"], pa["nfe"], pa.get("spacing")) == (pb["solver"], pb["nfe"], pb.get("spacing"))

    out = []
    for r, root in zip(rows, roots):
        w = r.get("parent") or r["weights"]
        cands = [c for c in rows if c["weights"] == w and c["protocol"]["runtime"] == "eager" and same_sampler(c, r)]
        p = cands[0] if cands else by_w.get(w)
        out.append(None if p is None or p is r or p is root else p)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (time, FID), both lower-is-better, sorted by time."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


# --- the rows as the page shows them ------------------------------------------------------------

@dataclass
class _Row:
    i: int  # 1-based number shown in every label
    r: dict
    root: dict | None
    ratio: float | None
    parent: dict | None
    parent_ratio: float | None
    grid: str | None = None


def _g(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ckpt(r: dict) -> str:
    return str(r.get("checkpoint", "?"))


def _sampler(r: dict) -> str:
    p = r["protocol"]
    return f"{p['solver']}-{_nfe(r):g}"


def label(x: _Row) -> str:
    """The one label of a row, used in the summary, plots, gallery and hover texts."""
    p = x.r["protocol"]
    return f"#{x.i} {_ckpt(x.r)} · {_sampler(x.r)} ({p.get('spacing', '?')}) · {p['runtime']}"


def _short(r: dict) -> str:
    """The checkpoint without the zoo: prefix and the model-card note (for the plot's narrow margin)."""
    return _ckpt(r).split(" [")[0].removeprefix("zoo:")


def _family(r: dict) -> str:
    """What a plot marker stands for: the model (card rows with their model) on one runtime."""
    return f"{_ckpt(r).split(' [')[0]} · {r['protocol']['runtime']}"


def _overloaded(r: dict, phase: str) -> dict | None:
    """The load record of a timing phase ("sampling", "latency") when the load exceeded the cores."""
    rec = _g(r, "cost", "load", phase)
    if rec and rec.get("loadavg_1m") is not None and rec.get("cores") and rec["loadavg_1m"] > rec["cores"]:
        return rec
    return None


def _mmac(r: dict) -> float | None:
    c = r["cost"]
    v = c.get("macs_per_eval_spent", c.get("macs_per_image_nonzero", c.get("macs_per_image")))
    return v / 1e6 if v is not None else None


def _nonzero(r: dict) -> int | None:
    return r["cost"].get("params_nonzero", r["cost"].get("params"))


def _mb(r: dict) -> float | None:
    c = r["cost"]
    v = c.get("runtime_bytes", c.get("weights_bytes"))
    return v / 2**20 if v is not None else None


@dataclass(frozen=True)
class Col:
    head: str
    get: Callable[[_Row], object]  # the value (sorted and compared)
    fmt: str = "{}"
    num: bool = True  # numbers right-aligned, text left
    better: str | None = None  # "min" | "max": the best of the column is marked
    gloss: str = ""  # the glossary entry (with units)
    note: Callable[[_Row], str] | None = None  # small text after the value (interval, dense figure, flag)
    title: Callable[[_Row], str] | None = None  # hover text of the cell


def _small_n(x: _Row, metric: str) -> str:
    """⚠ where the row's N was too small for the metric (``eval`` recorded the warning)."""
    return "⚠" if any(metric in w for w in x.r.get("warnings") or []) else ""


def _small_n_title(x: _Row, metric: str) -> str:
    return "; ".join(w for w in x.r.get("warnings") or [] if metric in w)


def _fid_note(x: _Row) -> str:
    se = x.r["quality"].get("fid_dom_se")
    return f"±{1.96 * se:.3f}" if se is not None else ""


def _fid_title(x: _Row) -> str:
    ci = x.r["quality"].get("fid_dom_ci")
    return f"95 % bootstrap interval [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "no interval recorded for this row"


def _load_title(x: _Row, phase: str) -> str:
    rec = _overloaded(x.r, phase)
    return (f"measured while the 1-minute load was {rec['loadavg_1m']:.1f} on {rec['cores']} cores: "
            "shared with other work, slower than the machine can do" if rec else "")


COLUMNS: list[Col] = [
    Col("#", lambda x: x.i, gloss="row number, used in every label of the page"),
    Col("checkpoint", lambda x: _ckpt(x.r), num=False,
        gloss="the model: zoo:NAME for a shipped one, else its path; '> step' marks a model made from it, "
              "'[model card]' a row read from the card, not re-run"),
    Col("lineage", lambda x: " > ".join(s for s in x.r.get("lineage") or [] if s) or "—", num=False,
        title=lambda x: x.r.get("recipe") or "", gloss="the steps that made the weights (hover: the recipe with its arguments)"),
    Col("solver", lambda x: x.r["protocol"]["solver"], num=False, gloss="the sampler (leandiff.solvers)"),
    Col("spacing", lambda x: x.r["protocol"].get("spacing"), num=False,
        gloss=f"how the NFE timesteps are spread over the schedule ({', '.join(SPACINGS)})"),
    Col("NFE", lambda x: _nfe(x.r), "{:g}",
        title=lambda x: (f"asked {x.r['protocol']['nfe']}, used {_nfe(x.r):g}" if x.r["protocol"]["nfe"] != _nfe(x.r)
                         else ""),
        gloss="network evaluations per sample, as counted while sampling (a solver may use fewer than asked, "
              "e.g. Heun's last step is an Euler step; hover shows both)"),
    Col("runtime", lambda x: x.r["protocol"]["runtime"], num=False,
        gloss="how the network executes: eager (fp32 reference), bf16, ort / ort-int8 (ONNX Runtime fp32 / real "
              "int8), cache:K (feature caching), ..."),
    Col("N", lambda x: x.r["protocol"]["n"], gloss="generated samples scored"),
    Col("FID-dom", lambda x: x.r["quality"]["fid_dom"], "{:.3f}", better="min", note=_fid_note, title=_fid_title,
        gloss="Fréchet distance on the shipped classifier's features to the held-out split (unitless, lower is "
              "better); ± is 1.96 × the bootstrap standard error over the generated features: rows whose "
              "intervals overlap may differ by sampling noise alone"),
    Col("×ref", lambda x: x.ratio, "{:.3f}", better="min",
        title=lambda x: f"over {_ckpt(x.root)} · {_sampler(x.root)}" if x.root else "",
        gloss="FID-dom over the root reference: the eager row with the most NFE of the model the lineage started "
              "from (DDPM-1000 from the model card in the demo); 1.10 is the bar of the recommendations"),
    Col("×parent", lambda x: x.parent_ratio, "{:.3f}",
        title=lambda x: f"over {_ckpt(x.parent)} · {_sampler(x.parent)} · eager" if x.parent else "",
        gloss="FID-dom over the parent row: the model before the last recipe step (or the same weights on eager) "
              "with the same solver, NFE and spacing; what the last step or the runtime cost; — where it is the "
              "row itself or the root reference"),
    Col("KID×1e3", lambda x: x.r["quality"]["kid"] * 1e3, "{:.3f}", better="min",
        note=lambda x: _small_n(x, "KID"),
        title=lambda x: (f"± {x.r['quality']['kid_std'] * 1e3:.3f} (std over subsets)"
                         if x.r["quality"].get("kid_std") is not None else "") + " " + _small_n_title(x, "KID"),
        gloss="kernel inception distance on the same features × 1000 (unbiased: may be negative for good rows; "
              "hover: its standard deviation over subsets); ⚠: N too small for KID to mean much"),
    Col("IS", lambda x: x.r["quality"].get("is"), "{:.2f}", better="max",
        gloss="Inception-Score-style exp E KL(p(y|x) ‖ p(y)) on the classifier (1 to the number of classes; higher: "
              "confident and varied)"),
    Col("prec", lambda x: x.r["quality"].get("precision"), "{:.3f}", better="max",
        note=lambda x: _small_n(x, "precision/recall"), title=lambda x: _small_n_title(x, "precision/recall"),
        gloss="precision: share of generated samples inside the real k-NN manifold (0–1, fidelity); ⚠: N too small"),
    Col("recall", lambda x: x.r["quality"].get("recall"), "{:.3f}", better="max",
        note=lambda x: _small_n(x, "precision/recall"), title=lambda x: _small_n_title(x, "precision/recall"),
        gloss="recall: share of real images inside the generated k-NN manifold (0–1, coverage); ⚠: N too small"),
    Col("MSE", lambda x: x.r["quality"].get("mse"), "{:.4f}", better="min",
        gloss="denoising MSE of the network's prediction target on held-out images at one uniform t each "
              "(pixels in [-1, 1]; does not depend on the solver)"),
    Col("conf", lambda x: x.r["quality"].get("confidence"), "{:.3f}", better="max",
        gloss="mean top-class probability of the classifier on generated images (0–1)"),
    Col("label H", lambda x: x.r["quality"].get("label_entropy"), "{:.3f}", better="max",
        gloss="entropy of the predicted-class histogram of the generated images (nats; ln 10 = 2.303 when all "
              "ten digits are equally frequent)"),
    Col("img/s", lambda x: x.r["cost"].get("sampling_images_per_s"), "{:.1f}", better="max",
        note=lambda x: "⚠" if _overloaded(x.r, "sampling") else "", title=lambda x: _load_title(x, "sampling"),
        gloss="generated images per second, end to end (all NFE steps, the row's batch size); ⚠: measured while "
              "the machine's load exceeded its cores"),
    Col("ms/eval@16", lambda x: (_g(x.r, "cost", "latency_ms") or {}).get("16"), "{:.2f}", better="min",
        note=lambda x: "⚠" if _overloaded(x.r, "latency") else "", title=lambda x: _load_title(x, "latency"),
        gloss="milliseconds per network evaluation of a batch of 16 (median of alternating rounds); ⚠ as for img/s"),
    Col("MMAC", lambda x: _mmac(x.r), "{:.1f}", better="min",
        note=lambda x: (f"nz; dense {x.r['cost']['macs_per_image'] / 1e6:.1f}"
                        if "macs_per_image_nonzero" in x.r["cost"] and "macs_per_eval_spent" not in x.r["cost"] else ""),
        gloss="million multiply-accumulates per network evaluation of one image: what feature caching really spent, "
              "for unstructured pruning the non-zero weights' (nz; what a sparse kernel would spend; dense kernels "
              "spend the dense figure)"),
    Col("params", lambda x: _nonzero(x.r), "{:,}", better="min",
        note=lambda x: (f"of {x.r['cost']['params']:,}" if x.r["cost"].get("params_nonzero", x.r["cost"]["params"])
                        != x.r["cost"]["params"] else ""),
        gloss="non-zero parameters (of all parameters, where pruning zeroed some)"),
    Col("MB", lambda x: _mb(x.r), "{:.2f}", better="min",
        gloss="megabytes (2^20 bytes) of what the runtime loads: the int8 ONNX graph for ort-int8, else the weights file"),
]


def _value(col: Col, x: _Row):
    try:
        v = col.get(x)
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _text(col: Col, v) -> str:
    if v is None:
        return "—"
    try:
        return col.fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def _best(rows: list[_Row]) -> dict[str, set[int]]:
    """{column head: the row numbers holding the column's best value}."""
    out = {}
    refs = {id(x.root) for x in rows if x.root is not None}
    for col in COLUMNS:
        if col.better is None:
            continue
        vals = [(v, x.i) for x in rows if isinstance(v := _value(col, x), (int, float))
                and not (col.head == "×ref" and id(x.r) in refs)]  # the reference's own 1.000 says nothing
        if vals:
            target = (min if col.better == "min" else max)(v for v, _ in vals)
            out[col.head] = {i for v, i in vals if v == target}
    return out


# --- the summary -----------------------------------------------------------------------------------

def _overlaps(a: dict, b: dict) -> bool:
    ca, cb = a["quality"].get("fid_dom_ci"), b["quality"].get("fid_dom_ci")
    return bool(ca and cb and ca[0] <= cb[1] and cb[0] <= ca[1])


def recommendations(rows: list[_Row]) -> list[tuple[str, _Row | None, str]]:
    """(question, the row that answers it or None, the evidence) for every question of the summary."""
    out = []
    fid = lambda x: x.r["quality"]["fid_dom"]  # noqa: E731
    for b in BUDGETS:
        cands = sorted((x for x in rows if _nfe(x.r) <= b), key=fid)
        if not cands:
            out.append((f"Best quality at ≤ {b} NFE", None, "no row samples with so few evaluations"))
            continue
        best = cands[0]
        tied = [x for x in cands[1:] if _overlaps(best.r, x.r)]
        why = f"FID-dom {fid(best):.3f}" + (f" ({best.ratio:.2f}× the reference)" if best.ratio else "")
        if tied:
            why += ("; within sampling noise of " + ", ".join(f"#{x.i}" for x in tied[:3])
                    + (" and more" if len(tied) > 3 else "") + " (95 % intervals overlap)")
        elif len(cands) > 1:
            why += f"; next best #{cands[1].i} at {fid(cands[1]):.3f}"
        out.append((f"Best quality at ≤ {b} NFE", best, why))
    refs = {id(x.root) for x in rows if x.root is not None}
    ok = [x for x in rows if x.ratio is not None and x.ratio <= WITHIN and id(x.r) not in refs]  # not the reference
    fast = [x for x in ok if x.r["cost"].get("sampling_images_per_s")]
    if fast:
        x = max(fast, key=lambda x: x.r["cost"]["sampling_images_per_s"])
        flag = " (⚠ timed under load)" if _overloaded(x.r, "sampling") else ""
        out.append((f"Fastest within {WITHIN:.2f}× of the reference", x,
                    f"{x.r['cost']['sampling_images_per_s']:.1f} images/s{flag} at {x.ratio:.2f}× the reference FID-dom"))
    else:
        out.append((f"Fastest within {WITHIN:.2f}× of the reference", None, _none_within(rows)))
    small = [x for x in ok if _mb(x.r) is not None]
    if small:
        x = min(small, key=lambda x: (_mb(x.r), -(x.r["cost"].get("sampling_images_per_s") or 0)))
        out.append((f"Smallest within {WITHIN:.2f}× of the reference", x,
                    f"{_mb(x.r):.2f} MB loaded, {_nonzero(x.r):,} non-zero parameters, at {x.ratio:.2f}× "
                    "the reference FID-dom"))
    else:
        out.append((f"Smallest within {WITHIN:.2f}× of the reference", None, _none_within(rows)))
    return out


def _n_note(rows: list[_Row]) -> str:
    """A warning where rows are compared with a reference scored at another N (FID-dom grows as N shrinks)."""
    pairs = {(x.r["protocol"]["n"], x.root["protocol"]["n"]) for x in rows if x.root is not None}
    diff = sorted({(a, b) for a, b in pairs if a != b})
    if not diff:
        return ""
    return ("Rows scored at N=" + ", ".join(sorted({str(a) for a, _ in diff}, key=int)) + " are compared with a reference "
            "scored at N=" + ", ".join(sorted({str(b) for _, b in diff}, key=int)) + ": FID-dom grows as N shrinks, "
            "so their ratios overstate what they lose.")


def _none_within(rows: list[_Row]) -> str:
    refs = {id(x.root) for x in rows if x.root is not None}
    rated = [x for x in rows if x.ratio is not None and id(x.r) not in refs]
    if not rated:
        return "no row has a reference to compare with"
    x = min(rated, key=lambda x: x.ratio)
    return f"no row is within {WITHIN:.2f}× (closest: #{x.i} at {x.ratio:.2f}×)"


# --- pictures --------------------------------------------------------------------------------------

_MARKERS = "osD^vP*Xph<>"
_SVG_SHAPES = ("circle", "square", "diamond", "up", "down", "plus", "star", "cross", "hexagon", "left", "right", "pentagon")
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#393b79", "#637939")


def _families(rows: list[_Row]) -> dict[str, int]:
    fam: dict[str, int] = {}
    for x in rows:
        fam.setdefault(_family(x.r), len(fam))
    return fam


def _fid_vs_nfe(rows: list[_Row], out: Path) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fam = _families(rows)
    solvers: dict[str, int] = {}
    series: dict[tuple, list[_Row]] = {}
    for x in rows:
        p = x.r["protocol"]
        solvers.setdefault(p["solver"], len(solvers))
        series.setdefault((_family(x.r), p["solver"], p.get("spacing")), []).append(x)
    fig, ax = plt.subplots(figsize=(9.6, 4.8), dpi=100)
    for (family, solver, spacing), xs in series.items():
        xs.sort(key=lambda x: _nfe(x.r))
        k = fam[family]
        ax.plot([_nfe(x.r) for x in xs], [x.r["quality"]["fid_dom"] for x in xs],
                marker=_MARKERS[k % len(_MARKERS)], markersize=7, linestyle="-" if len(xs) > 1 else "none",
                color=_PALETTE[solvers[solver] % len(_PALETTE)], markerfacecolor="none" if k >= len(_MARKERS) else None,
                label=f"{family} · {solver} ({spacing}): " + ", ".join(f"#{x.i}" for x in xs))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FID-dom (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False,
              title="marker: model · runtime; colour: solver", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_nfe.png")
    plt.close(fig)
    return "fid_vs_nfe.png", "FID-dom against NFE: one line per model, runtime, solver and spacing"


def _svg_marker(shape: str, x: float, y: float, s: float, color: str) -> str:
    def poly(pts):
        return f'<polygon points="{" ".join(f"{x + a:.1f},{y + b:.1f}" for a, b in pts)}" fill="{color}" />'

    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{s:.1f}" fill="{color}" />'
    if shape == "square":
        return f'<rect x="{x - s:.1f}" y="{y - s:.1f}" width="{2 * s:.1f}" height="{2 * s:.1f}" fill="{color}" />'
    if shape == "plus":
        w = s / 2.5
        return poly([(-w, -s), (w, -s), (w, -w), (s, -w), (s, w), (w, w), (w, s), (-w, s), (-w, w), (-s, w), (-s, -w),
                     (-w, -w)])
    if shape == "cross":
        return (f'<path d="M{x - s:.1f},{y - s:.1f}L{x + s:.1f},{y + s:.1f}M{x - s:.1f},{y + s:.1f}L{x + s:.1f},'
                f'{y - s:.1f}" stroke="{color}" stroke-width="2.6" />')
    n, rot, inner = {"diamond": (4, 0, None), "up": (3, 0, None), "down": (3, math.pi, None),
                     "left": (3, -math.pi / 2, None), "right": (3, math.pi / 2, None), "star": (5, 0, 0.45),
                     "hexagon": (6, 0, None), "pentagon": (5, 0, None)}[shape]
    corners = 2 * n if inner else n  # a star alternates outer and inner corners
    pts = []
    for k in range(corners):
        a = rot + 2 * math.pi * k / corners
        rad = s * 1.25 * (inner if inner and k % 2 else 1)
        pts.append((rad * math.sin(a), -rad * math.cos(a)))
    return poly(pts)


def _pareto_svg(rows: list[_Row]) -> str | None:
    """FID-dom against seconds per image (log-log) as a self-contained SVG: a marker shape and colour per
    family, the Pareto front joined and labelled (labels pushed apart so that none overlap), every point's
    full label on hover."""
    pts = [(x, 1.0 / x.r["cost"]["sampling_images_per_s"], x.r["quality"]["fid_dom"]) for x in rows
           if x.r["cost"].get("sampling_images_per_s") and x.r["quality"].get("fid_dom", 0) > 0]
    if not pts:
        return None
    fam = _families([p[0] for p in pts])
    W, H, L, R, T, B = 720, 420, 58, 262, 14, 46  # size and margins (the right one holds the front's labels)
    lx = [math.log10(p[1]) for p in pts]
    ly = [math.log10(p[2]) for p in pts]
    x0, x1 = min(lx) - 0.08, max(lx) + 0.08
    y0, y1 = min(ly) - 0.08, max(ly) + 0.08
    px = lambda v: L + (math.log10(v) - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    py = lambda v: T + (y1 - math.log10(v)) / (y1 - y0) * (H - T - B)  # noqa: E731
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="FID-dom against seconds per image" font-family="sans-serif" font-size="11">',
             f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fff" stroke="#999" />']
    for lo, hi, axis in ((x0, x1, "x"), (y0, y1, "y")):  # decade ticks with 1-2-5 steps
        for dec in range(math.floor(lo), math.ceil(hi) + 1):
            for m in (1, 2, 5):
                v = m * 10.0 ** dec
                if not lo <= math.log10(v) <= hi:
                    continue
                txt = f"{v:g}"
                if axis == "x":
                    X = px(v)
                    parts.append(f'<line x1="{X:.1f}" y1="{T}" x2="{X:.1f}" y2="{H - B}" stroke="#eee" />'
                                 f'<text x="{X:.1f}" y="{H - B + 14}" text-anchor="middle">{txt}</text>')
                else:
                    Y = py(v)
                    parts.append(f'<line x1="{L}" y1="{Y:.1f}" x2="{W - R}" y2="{Y:.1f}" stroke="#eee" />'
                                 f'<text x="{L - 4}" y="{Y + 4:.1f}" text-anchor="end">{txt}</text>')
    parts.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 8}" text-anchor="middle">seconds per generated image '
                 '(sampling, end to end)</text>'
                 f'<text transform="translate(14 {(T + H - B) / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 'FID-dom (lower is better)</text>')
    front = pareto_front([(p[1], p[2]) for p in pts])
    parts.append('<polyline fill="none" stroke="#d62728" stroke-width="1.5" stroke-dasharray="4 3" points="'
                 + " ".join(f"{px(pts[j][1]):.1f},{py(pts[j][2]):.1f}" for j in front) + '" />')
    for x, s, f in pts:
        k = fam[_family(x.r)]
        tip = f"{label(x)}: FID-dom {f:.3f}, {s * 1e3:.1f} ms per image"
        parts.append(f'<g class="pt" data-row="{x.i}"><title>{e(tip)}</title>'
                     f'{_svg_marker(_SVG_SHAPES[k % len(_SVG_SHAPES)], px(s), py(f), 5, _PALETTE[k % len(_PALETTE)])}</g>')
    # The front's labels in the right margin, in FID order, at least 13 px apart, joined to their points.
    want = sorted(((py(pts[j][2]), j) for j in front))
    ys, last = [], T - 13
    for y, _ in want:
        last = max(y, last + 13)
        ys.append(last)
    shift = max(0.0, ys[-1] - (H - B)) if ys else 0.0
    ys = [max(T + 4, y - shift) for y in ys]
    for (y, j), ly_ in zip(want, ys):
        x, s, f = pts[j]
        text = f"#{x.i} {_short(x.r)} {_sampler(x.r)} {x.r['protocol']['runtime']}"
        parts.append(f'<line x1="{px(s):.1f}" y1="{y:.1f}" x2="{W - R + 6}" y2="{ly_:.1f}" stroke="#d62728" '
                     f'stroke-width="0.6" /><text x="{W - R + 9}" y="{ly_ + 4:.1f}" font-size="10">{e(text)}</text>')
    parts.append("</svg>")
    legend = "".join(
        f'<li><svg width="14" height="14" viewBox="0 0 14 14">{_svg_marker(_SVG_SHAPES[k % len(_SVG_SHAPES)], 7, 7, 4.5, _PALETTE[k % len(_PALETTE)])}'
        f"</svg> {e(name)}</li>" for name, k in fam.items())
    return "".join(parts), f'<ul class="legend">{legend}</ul>'


def _copy_grids(rows: list[dict], out: Path) -> list[str | None]:
    """Copy each row's grid PNG into out/grids; None where the row has none or it is missing."""
    names = []
    (out / "grids").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        g = r.get("grid")
        src = None
        if g:
            src = Path(g)
            if not src.is_absolute() and r.get("_source"):
                src = Path(r["_source"]).parent / src
        if src is None or not src.is_file():
            names.append(None)
            continue
        name = f"grids/{i + 1:03d}-{src.name}"
        shutil.copyfile(src, out / name)
        names.append(name)
    return names


def _real_grids(rows: list[dict], out: Path) -> list[tuple[str, str]]:
    """A grid of held-out real images per dataset of the rows (seeded, the first ones of a permutation)."""
    import torch

    from ..data import load_dataset
    from ..io import save_grid

    made = []
    for ds in dict.fromkeys(r.get("dataset") for r in rows if r.get("dataset")):
        try:
            held = load_dataset(ds, "test")
        except (UserError, OSError, ValueError, RuntimeError) as err:  # e.g. one that needs --data-dir: say why
            made.append(("", f"real {ds} images: not available here ({err})"))
            continue
        pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:REAL_GRID_N]
        name = f"grids/real-{''.join(c if c.isalnum() or c in '-_' else '_' for c in ds)}.png"
        save_grid(held.images[pick], out / name)
        made.append((name, f"real held-out {ds} images ({held.split} split, {REAL_GRID_N} of {len(held)})"))
    return made


def _png_width(path: Path) -> int | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.width
    except (OSError, ValueError):
        return None


# --- the page --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1800px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.top { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.summary { flex: 1 1 380px; min-width: 300px; }
.summary dt { font-weight: 600; margin-top: 0.6em; }
.summary dd { margin: 0.15em 0 0 0; }
.summary dd a { font-weight: 600; }
.summary .why { color: #555; font-size: 0.9em; }
.plot { flex: 0 1 720px; max-width: 100%; }
.plot svg { max-width: 100%; height: auto; }
.plot .pt:hover { opacity: 0.6; cursor: help; }
.legend { list-style: none; padding: 0; margin: 0.3em 0; font-size: 0.8em; columns: 2; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.78em; }
th, td { border: 1px solid #ddd; padding: 0.15em 0.35em; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; position: sticky; top: 0; }
th[aria-sort="ascending"]::after { content: " ▲"; } th[aria-sort="descending"]::after { content: " ▼"; }
td.t { text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #dff3df; font-weight: 700; }
tbody td:first-child { position: sticky; left: 0; background: #fafafa; }  /* the row number stays in view */
td small { color: #666; font-weight: 400; margin-left: 0.3em; }
tr:target, tr.hl { outline: 2px solid #1f77b4; }
dl.gloss dt { font-weight: 600; float: left; clear: left; width: 7em; }
dl.gloss dd { margin: 0 0 0.3em 7.5em; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; }
.gallery img, figure img { image-rendering: pixelated; max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; max-width: 484px; }
"""

# Click a header to sort by it (numbers by value, text alphabetically); click again to reverse.
_JS = """
document.querySelectorAll('table.results th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var tb = th.closest('table').tBodies[0], asc = th.getAttribute('aria-sort') !== 'ascending';
    th.parentNode.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var key = function (tr) { var v = tr.cells[col].dataset.v; var f = parseFloat(v);
      return v === '' ? null : (isNaN(f) ? v : f); };
    Array.from(tb.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    }).forEach(function (tr) { tb.appendChild(tr); });
  });
});
"""


def _write_csv(rows: list[_Row], out: Path) -> None:
    flat = [dict(flatten({k: v for k, v in x.r.items() if not k.startswith("_")}), fid_ratio_to_reference=x.ratio,
                 fid_ratio_to_parent=x.parent_ratio) for x in rows]
    keys = sorted({k for f in flat for k in f})
    tmp = out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    tmp.replace(out / "results.csv")


def _protocol_line(x: _Row) -> str:
    r, p = x.r, x.r["protocol"]
    fn, ref, m = p.get("feature_net") or {}, p.get("reference") or {}, r.get("machine") or {}
    return (f"{label(x)}: N={p['n']}, seed {p['seed']}, feature net {fn.get('name', '?')} ({fn.get('hash', '?')}), "
            f"reference {ref.get('dataset', '?')}/{ref.get('split', '?')} (n={ref.get('n', '?')}), "
            f"{m.get('cpu', '?')} ×{m.get('cpu_count', '?')}, torch {m.get('torch', '?')}"
            + (f"; {'; '.join(r['warnings'])}" if r.get("warnings") else ""))


def _rows(rows: list[dict]) -> list[_Row]:
    roots = root_references(rows)
    parents = parent_rows(rows, roots)
    ratio = lambda r, ref: (r["quality"]["fid_dom"] / ref["quality"]["fid_dom"]  # noqa: E731
                            if ref and ref["quality"].get("fid_dom") else None)
    return [_Row(i + 1, r, root, ratio(r, root), p, ratio(r, p)) for i, (r, root, p) in enumerate(zip(rows, roots, parents))]


def summary_lines(rows: list[dict]) -> list[str]:
    """The page's answers to "which one should I use?" as plain lines (what ``leandiff report`` prints)."""
    return [f"{q}: " + (f"{label(x)} ({why})" if x else why) for q, x, why in recommendations(_rows(rows))]


def write_report(rows: list[dict], out_dir: str | Path, title: str = "leandiff report") -> Path:
    """Write index.html, report.md, results.csv (and the plots and grids) to ``out_dir``; return index.html."""
    if not rows:
        raise UserError("report: no rows to report")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    xs = _rows(rows)
    for x, g in zip(xs, _copy_grids(rows, out)):
        x.grid = g
    best = _best(xs)
    recs = recommendations(xs)
    nfe_plot = _fid_vs_nfe(xs, out)
    pareto = _pareto_svg(xs)
    if pareto:
        write_text(out / "fid_vs_time.svg", pareto[0] + "\n")
    real = _real_grids(rows, out)
    _write_csv(xs, out)
    e = html.escape

    # report.md
    md = [f"# {title}", "", "## Which one should I use?", ""]
    md += [f"- **{q}**: " + (f"{label(x)}: {why}" if x else why) for q, x, why in recs]
    md += ["", _n_note(xs)] if _n_note(xs) else []
    md += ["", "| " + " | ".join(c.head for c in COLUMNS) + " |", "|" + "|".join("---:" if c.num else "---" for c in COLUMNS) + "|"]
    for x in xs:
        cells = []
        for c in COLUMNS:
            t = _text(c, _value(c, x))
            note = c.note(x) if c.note else ""
            t = f"{t} {note}".strip() if note else t
            cells.append(f"**{t}**" if x.i in best.get(c.head, ()) else t)
        md.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
    md += ["", "Bold: the best of its column.", "", "## Columns", ""] + [f"- **{c.head}**: {c.gloss}" for c in COLUMNS]
    md += ["", "## Protocol", ""] + [f"- {_protocol_line(x)}" for x in xs]
    md += ["", f"![FID-dom against NFE]({nfe_plot[0]})"] + (["", "![FID-dom against time](fid_vs_time.svg)"] if pareto else [])
    write_text(out / "report.md", "\n".join(md) + "\n")

    # index.html
    def link(x: _Row) -> str:
        return f'<a href="#row-{x.i}">{e(label(x))}</a>'

    summary = "".join(f"<dt>{e(q)}</dt><dd>{link(x) if x else '—'}<br><span class=\"why\">{e(why)}</span></dd>"
                      for q, x, why in recs)
    refs = {id(x.root): x.root for x in xs if x.root is not None}
    ref_note = "; ".join(f"{e(_ckpt(r))} · {e(_sampler(r))}, FID-dom {r['quality']['fid_dom']:.3f}" for r in refs.values())
    heads = "".join(f'<th title="{e(c.gloss)}">{e(c.head)}</th>' for c in COLUMNS) + "<th>grid</th>"
    trs = []
    for x in xs:
        tds = []
        for c in COLUMNS:
            v = _value(c, x)
            cls = ("n" if c.num else "t") + (" best" if x.i in best.get(c.head, ()) else "")
            note = c.note(x) if c.note else ""
            tip = c.title(x) if c.title else ""
            tds.append(f'<td class="{cls}" data-v="{e("" if v is None else str(v))}"'
                       + (f' title="{e(tip)}"' if tip else "") + f">{e(_text(c, v))}"
                       + (f"<small>{e(note)}</small>" if note else "") + "</td>")
        tds.append(f'<td class="t" data-v="{x.i}">' + (f'<a href="#grid-{x.i}">grid</a>' if x.grid else "—") + "</td>")
        trs.append(f'<tr id="row-{x.i}">{"".join(tds)}</tr>')
    gloss = "".join(f"<dt>{e(c.head)}</dt><dd>{e(c.gloss)}</dd>" for c in COLUMNS)
    figs = []
    for name, cap in real:
        if name:
            w = _png_width(out / name)
            figs.append(f'<figure><img src="{e(name)}" alt="{e(cap)}"' + (f' width="{2 * w}"' if w else "")
                        + f"><figcaption><b>{e(cap)}</b></figcaption></figure>")
        else:
            figs.append(f"<p>{e(cap)}</p>")
    for x in xs:
        if x.grid:
            w = _png_width(out / x.grid)
            figs.append(f'<figure id="grid-{x.i}"><img src="{e(x.grid)}" alt="samples of {e(label(x))}"'
                        + (f' width="{2 * w}"' if w else "") + f'><figcaption>{link(x)}: FID-dom '
                        f'{x.r["quality"]["fid_dom"]:.3f}</figcaption></figure>')
    proto = "".join(f"<li>{e(_protocol_line(x))}</li>" for x in xs)
    plot = (f'<div class="plot">{pareto[0]}{pareto[1]}<p class="why">FID-dom against seconds per image; dashed: the '
            "Pareto front (no row is both faster and better); hover a point for its row.</p></div>") if pareto else ""
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{e(title)}</h1>
<div class="top">
<section class="summary" id="summary">
<h2>Which one should I use?</h2>
<dl>{summary}</dl>
<p class="why">The reference: {ref_note or "none in these rows"}. “Within {WITHIN:.2f}×”: FID-dom at most {WITHIN:.2f} times
the row's root reference (column ×ref). {e(_n_note(xs))}</p>
</section>
{plot}
</div>
<h2>Results</h2>
<p class="why">Click a column to sort; green: the best of its column; hover a header for what it means.</p>
<div class="scroll">
<table class="results">
<thead><tr>{heads}</tr></thead>
<tbody>
{chr(10).join(trs)}
</tbody>
</table>
</div>
<p>Files: <a href="report.md">report.md</a>, <a href="results.csv">results.csv</a>.</p>
<h2>Columns</h2>
<dl class="gloss">{gloss}</dl>
<h2>FID-dom against NFE</h2>
<figure><img src="{e(nfe_plot[0])}" alt="{e(nfe_plot[1])}"><figcaption>{e(nfe_plot[1])}</figcaption></figure>
<h2>Samples</h2>
<div class="gallery">
{chr(10).join(figs)}
</div>
<h2>Protocol</h2>
<ul>
{proto}
</ul>
<script>{_JS}</script>
</body>
</html>
"""
    write_text(out / "index.html", page)
    return out / "index.html"
