"""Shared by the benchmark scripts: the machine description and results written with their command."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from leandiff.cost import machine_info

    return machine_info()


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_results(name: str, figures: dict, markdown: str = "", cmd: str | None = None) -> Path:
    """Write RESULTS/name.json (figures + command + machine) and, if given, RESULTS/name.md; ``cmd``: the
    command that measured the figures, when this run only re-renders them."""
    from leandiff.io import write_json, write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    rec = {"command": cmd or command(), "machine": machine(), **figures}
    write_json(RESULTS / f"{name}.json", rec)
    if markdown:
        m = rec["machine"]
        write_text(RESULTS / f"{name}.md", f"{markdown.rstrip()}\n\nCommand: `{rec['command']}`  \n"
                   f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, {m['platform']}\n")
    return RESULTS / f"{name}.json"


def resumable_rows(out_dir) -> tuple[Path, dict]:
    """(OUT/rows.jsonl, {bench_name: row} already there): the benchmarks that resume row by row."""
    from leandiff.evaluate.harness import read_rows

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    return rows_path, ({r["bench_name"]: r for r in read_rows([rows_path])} if rows_path.exists() else {})
