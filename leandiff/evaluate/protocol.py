"""The results row's protocol and its files: the schema, the columns of the Markdown tables, flattening for
CSV, and the JSONL results files (append one row, read many)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError

SCHEMA = "leandiff-eval/1"


COLUMNS = [  # (header, getter, format)
    ("checkpoint", lambda r: r["checkpoint"], "{}"),
    ("solver", lambda r: r["protocol"]["solver"], "{}"),
    ("NFE", lambda r: r["protocol"]["nfe_used"], "{:g}"),
    ("runtime", lambda r: r["protocol"]["runtime"], "{}"),
    ("N", lambda r: r["protocol"]["n"], "{}"),
    ("FID-dom", lambda r: r["quality"]["fid_dom"], "{:.3f}"),
    ("KID×1e3", lambda r: r["quality"]["kid"] * 1e3, "{:.3f}"),
    ("±", lambda r: r["quality"]["kid_std"] * 1e3, "{:.3f}"),
    ("IS", lambda r: r["quality"]["is"], "{:.2f}"),
    ("prec", lambda r: r["quality"]["precision"], "{:.3f}"),
    ("recall", lambda r: r["quality"]["recall"], "{:.3f}"),
    ("MSE", lambda r: r["quality"]["mse"], "{:.4f}"),
    ("conf", lambda r: r["quality"]["confidence"], "{:.3f}"),
    ("label H", lambda r: r["quality"]["label_entropy"], "{:.3f}"),
    ("img/s", lambda r: r["cost"]["sampling_images_per_s"], "{:.1f}"),
    ("ms/eval@16", lambda r: (r["cost"].get("latency_ms") or {}).get("16"), "{:.2f}"),
    ("MMAC", lambda r: r["cost"].get("macs_per_eval_spent", r["cost"]["macs_per_image"]) / 1e6, "{:.1f}"),
    ("params", lambda r: r["cost"]["params"], "{:,}"),
]


def _fmt(fmt: str, v) -> str:
    if v is None:
        return "—"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown_header() -> str:
    heads = [c[0] for c in COLUMNS]
    return "| " + " | ".join(heads) + " |\n|" + "|".join("---" for _ in heads) + "|"


def markdown_row(row: dict) -> str:
    return "| " + " | ".join(_fmt(fmt, _safe(get, row)) for _, get, fmt in COLUMNS) + " |"


def _safe(get, row):
    try:
        return get(row)
    except (KeyError, TypeError):
        return None


def flatten(row: dict, prefix: str = "") -> dict:
    """Nested row -> flat {"quality.fid_dom": …} for CSV (lists become ';'-joined strings)."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ";".join(str(x) for x in v)
        else:
            out[key] = v
    return out


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_row(path: str | Path, row: dict) -> None:
    """Append one row to a JSONL results file (one line, flushed and fsynced)."""
    import json
    import os

    path = Path(path)
    line = json.dumps(row, default=_json_default, sort_keys=True) + "\n"
    size = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if size is not None:  # a full disk may have taken half the line: cut it off, keep the earlier rows
            try:
                os.truncate(path, size)
            except OSError:
                pass
        raise UserError(f"cannot append to {path}: {e.strerror or e}") from None


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Replace a JSONL results file with ``rows`` (atomically; keys starting with '_' are not written)."""
    import json

    from ..io import write_text

    write_text(path, "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")},
                                        default=_json_default, sort_keys=True) + "\n" for r in rows))


def read_rows(paths) -> list[dict]:
    """Rows from one or more JSONL results files (blank lines skipped; a bad line is an error)."""
    import json

    rows = []
    for p in paths:
        p = Path(p)
        try:
            lines = p.read_text().splitlines()
        except OSError as e:
            raise UserError(f"{p}: cannot read results ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise UserError(f"{p}: binary data, not JSON lines") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: not a JSON row ({e.msg})") from None
            if not isinstance(row, dict) or row.get("schema") != SCHEMA:
                raise UserError(f"{p}:{i}: not a leandiff eval row (schema {SCHEMA})")
            row.setdefault("_source", str(p))
            rows.append(row)
    return rows


def check_results_file(path: str | Path) -> None:
    """Refuse, before any work, a results file to append to that exists but is not one: every line must be
    a leandiff eval row and the last must be complete. A missing or empty file is fine (a new one)."""
    p = Path(path)
    if not p.exists():
        return
    if not p.is_file():
        raise UserError(f"{p}: not a results file (not a regular file)")
    try:
        read_rows([p])
    except UserError as e:
        detail = str(e).removeprefix(str(p)).lstrip(":").strip()  # "1: not a JSON row (...)" -> "line 1: ..."
        detail = f"line {detail}" if detail[:1].isdigit() else detail
        raise UserError(f"{p} is not a leandiff results file ({detail}); refusing to append to it "
                        "(give a new file or one written by leandiff eval)") from None
    data = p.read_bytes()
    if data and not data.endswith(b"\n"):
        raise UserError(f"{p}: its last row is cut off (no newline at the end); refusing to append to it")
