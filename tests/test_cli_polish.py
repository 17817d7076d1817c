"""The CLI as a new user meets it: eval refuses a file that is not a results file and leaves it as it was,
one name per checkpoint, the Inception notice only when asked, small-N warnings, complete help."""
from __future__ import annotations

import json
import re

import click
import pytest
from click.testing import CliRunner

from leandiff.cli import main


def _run(args):
    return CliRunner().invoke(main, args, terminal_width=80)


@pytest.mark.parametrize("content", [b"my notes about the runs\nsecond line\n",
                                     b'{"schema": "leandiff-eval/1"}',  # a cut-off last row
                                     b"\x89PNG\r\n\x1a\n\x00\x01binary"])
def test_eval_refuses_an_out_that_is_not_a_results_file_and_leaves_it_untouched(tmp_path, content):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    before = notes.stat().st_mtime_ns
    r = _run(["eval", "zoo:mnist-tiny", "-n", "64", "--out", str(notes)])
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "notes.txt" in r.stderr and "Traceback" not in r.stderr
    assert notes.read_bytes() == content and notes.stat().st_mtime_ns == before
    assert not (tmp_path / "notes-grids").exists()


def test_eval_names_a_shipped_model_as_zoo_and_warns_on_small_n(tmp_path):
    out = tmp_path / "results.jsonl"
    r = _run(["eval", "zoo:mnist-tiny", "--solver", "ddim", "--nfe", "2", "-n", "64", "--no-latency",
              "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    row = json.loads(out.read_text())
    assert row["checkpoint"] == "zoo:mnist-tiny"
    assert "zoo:mnist-tiny" in r.stdout and "leandiff/zoo" not in r.stdout
    assert "Inception" not in r.stderr + r.stdout  # not asked for: not mentioned
    assert "too small for KID" in r.stderr and "too small for precision/recall" in r.stderr
    assert row["warnings"] and row["quality"]["fid_dom_ci"][0] <= row["quality"]["fid_dom"]
    # a second row appends to the results file it wrote
    r = _run(["eval", "zoo:mnist-tiny", "--solver", "ddim", "--nfe", "3", "-n", "64", "--no-latency",
              "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2


def test_info_names_zoo_models_and_prints_the_whole_lineage():
    r = _run(["info", "zoo:mnist-tiny-pd4"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("zoo:mnist-tiny-pd4 ")
    assert "runtime " in r.stdout and "samples by" in r.stdout
    lineage = " ".join(line.strip() for line in r.stdout.splitlines() if line.startswith(("  lineage", " " * 16)))
    meta = json.loads(_run(["info", "zoo:mnist-tiny-pd4", "--json"]).stdout)
    for step in meta["lineage"]:
        for k, v in step.get("settings", step.get("args", {})).items():
            assert f"{json.dumps(k)}: {json.dumps(v)}" in lineage, k  # every value whole, none cut
    assert meta["name"] == "zoo:mnist-tiny-pd4"


def test_recipes_print_defaults_in_recipe_syntax():
    out = _run(["recipes"]).stdout
    assert "bf16=false" in out and "calib=ndtc" in out
    assert "False" not in out and "'" not in out.split("  ")[0]


def _commands(cmd, path=()):
    yield list(path), cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))


@pytest.mark.parametrize("path", [p for p, _ in _commands(main)], ids=lambda p: " ".join(p) or "leandiff")
def test_help_is_complete(path):
    cmd = dict((tuple(p), c) for p, c in _commands(main))[tuple(path)]
    r = _run([*path, "--help"])
    assert r.exit_code == 0
    text = r.stdout
    assert not re.search(r"\bissues?\s*#?\d", text, re.I), "help should not mention issue numbers"
    summaries = [line for line in text.split("Commands:")[-1].splitlines()] if "Commands:" in text else []
    assert not any(line.rstrip().endswith("...") for line in summaries), "a command summary is cut"
    for p in cmd.params:
        if isinstance(p, click.Option) and not {"--help", "--version"} & set(p.opts):
            assert p.help, f"{' '.join(path)} {p.opts[0]} has no help"
    if "--spacing" in text:
        from leandiff.schedule import SPACINGS

        spacing_help = " ".join(text.split("--spacing", 1)[1].split("--", 1)[0].split())
        assert all(s in spacing_help for s in SPACINGS), spacing_help


def test_heartbeat_reports_while_the_body_runs_and_stops_after():
    import threading

    from leandiff.io import heartbeat

    lines, seen = [], threading.Event()

    def log(m):
        lines.append(m)
        seen.set()

    with heartbeat("row 3/20", log, every=0.01, enabled=True):
        assert seen.wait(10), "no progress line while the body ran"
    n = len(lines)
    assert all("row 3/20" in m and "so far" in m for m in lines)
    with heartbeat("quiet", log, every=0.01, enabled=False):
        threading.Event().wait(0.05)
    assert len(lines) == n
