"""``leandiff report``: eval rows -> ``index.html`` (tables, sample grids, FID-vs-NFE curves,
FID-vs-time Pareto front), ``report.md`` and ``results.csv``, all in one directory that can be
copied anywhere (grids are copied in; every file the page references lies beside it)."""
from __future__ import annotations

import csv
import html
import shutil
from pathlib import Path

from ..errors import UserError
from ..io import write_text
from .protocol import flatten, markdown_header, markdown_row


def _series_key(r: dict) -> str:
    p = r["protocol"]
    return f"{r['checkpoint']} · {p['solver']} · {p['runtime']}"


def _seconds_per_image(r: dict) -> float | None:
    ips = r["cost"].get("sampling_images_per_s")
    return 1.0 / ips if ips else None


def reference_ratios(rows: list[dict]) -> list[float | None]:
    """FID-dom of each row divided by its reference row in the same set: the same weights' eager row
    with the most network evaluations (ties: the first). A model that is its own only such row (a
    pruned or distilled model evaluated once) is divided by its dataset's eager row with the most
    evaluations instead (the base's 1000-step reference in the demo). None when there is neither."""
    best: dict[str, dict] = {}
    best_ds: dict = {}
    for r in rows:
        if r["protocol"]["runtime"] != "eager":
            continue
        for table, key in ((best, r["weights"]), (best_ds, r.get("dataset"))):
            cur = table.get(key)
            if cur is None or r["protocol"]["nfe_used"] > cur["protocol"]["nfe_used"]:
                table[key] = r
    out = []
    for r in rows:
        ref = best.get(r["weights"])
        if ref is None or ref is r:
            ref = best_ds.get(r.get("dataset"))
        fid_ref = ref["quality"]["fid_dom"] if ref else None
        out.append(r["quality"]["fid_dom"] / fid_ref if fid_ref else None)
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


def _plots(rows: list[dict], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # FID-dom vs NFE, one line per (checkpoint, solver, runtime).
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(_series_key(r), []).append((r["protocol"]["nfe_used"], r["quality"]["fid_dom"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FID-dom (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_nfe.png")
    plt.close(fig)
    made.append(("fid_vs_nfe.png", "FID-dom against NFE"))

    # FID-dom vs seconds per image, with the Pareto front.
    idx = [i for i, r in enumerate(rows) if _seconds_per_image(r)]
    if idx:
        pts = [(_seconds_per_image(rows[i]), rows[i]["quality"]["fid_dom"]) for i in idx]
        front = pareto_front(pts)
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="0.6", label="runs")
        for j, i in enumerate(idx):
            p = rows[i]["protocol"]
            ax.annotate(f"{p['solver']}-{p['nfe_used']:g} {p['runtime']}", pts[j], fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.plot([pts[j][0] for j in front], [pts[j][1] for j in front], color="C3", marker="o", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per generated image (sampling, end to end)")
        ax.set_ylabel("FID-dom (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fid_vs_time.png")
        plt.close(fig)
        made.append(("fid_vs_time.png", "FID-dom against sampling time per image, with the Pareto front"))
    return made


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
        name = f"grids/{i:03d}-{src.name}"
        shutil.copyfile(src, out / name)
        names.append(name)
    return names


def write_report(rows: list[dict], out_dir: str | Path, title: str = "leandiff report") -> Path:
    """Write index.html, report.md, results.csv (and plots/grids) to ``out_dir``; return index.html."""
    if not rows:
        raise UserError("report: no rows to report")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    ratios = reference_ratios(rows)
    plots = _plots(rows, out)
    grids = _copy_grids(rows, out)

    # results.csv: every field of every row, flattened.
    flat = [dict(flatten({k: v for k, v in r.items() if not k.startswith("_")}), fid_ratio_to_reference=q)
            for r, q in zip(rows, ratios)]
    keys = sorted({k for f in flat for k in f})
    tmp = out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    tmp.replace(out / "results.csv")

    # report.md
    md = [f"# {title}", "", markdown_header().replace("|\n|", "| FID/ref |\n|", 1) + "---|"]
    for r, q in zip(rows, ratios):
        md.append(markdown_row(r) + (f" {q:.3f} |" if q is not None else " — |"))
    md += ["", "FID/ref: FID-dom over the same weights' eager row with the most NFE in this report; a model "
               "with no other such row (pruned, distilled) over its dataset's eager row with the most NFE.", "",
           "## Protocol", ""]
    for r in rows:
        p = r["protocol"]
        md.append(f"- {_series_key(r)} NFE {p['nfe_used']:g}: N={p['n']}, seed {p['seed']}, spacing {p['spacing']}, "
                  f"feature net {p['feature_net']['name']} ({p['feature_net']['hash']}), reference "
                  f"{p['reference']['dataset']}/{p['reference']['split']} (n={p['reference']['n']}), "
                  f"{r['machine']['cpu']} ×{r['machine']['cpu_count']}, torch {r['machine']['torch']}")
    md += [""] + [f"![{cap}]({name})" for name, cap in plots]
    write_text(out / "report.md", "\n".join(md) + "\n")

    # index.html
    e = html.escape
    head = markdown_header().splitlines()[0].strip("| ").split(" | ") + ["FID/ref", "grid"]
    trs = []
    for r, q, g in zip(rows, ratios, grids):
        cells = markdown_row(r).strip("| ").split(" | ") + [f"{q:.3f}" if q is not None else "—"]
        tds = "".join(f"<td>{e(c)}</td>" for c in cells)
        tds += f'<td><a href="{e(g)}"><img src="{e(g)}" alt="samples" width="96"></a></td>' if g else "<td>—</td>"
        trs.append(f"<tr>{tds}</tr>")
    figs = "".join(f'<figure><img src="{e(n)}" alt="{e(c)}"><figcaption>{e(c)}</figcaption></figure>' for n, c in plots)
    proto = "".join(f"<li>{e(line[2:])}</li>" for line in md if line.startswith("- "))
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f0f0f0; }}
figure {{ display: inline-block; margin: 1em; }}
img {{ image-rendering: pixelated; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<h2>Results</h2>
<table>
<thead><tr>{"".join(f"<th>{e(h)}</th>" for h in head)}</tr></thead>
<tbody>
{chr(10).join(trs)}
</tbody>
</table>
<p>FID/ref: FID-dom divided by the same weights' eager row with the most NFE in this report; a model with no
other such row (pruned, distilled) by its dataset's eager row with the most NFE.
Files: <a href="report.md">report.md</a>, <a href="results.csv">results.csv</a>.</p>
<h2>Plots</h2>
{figs}
<h2>Protocol</h2>
<ul>
{proto}
</ul>
</body>
</html>
"""
    write_text(out / "index.html", page)
    return out / "index.html"
