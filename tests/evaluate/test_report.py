"""eval -> JSONL rows -> report: the HTML references only files that exist and parses cleanly."""
import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from leandiff.cli import main
from leandiff.evaluate.report import pareto_front, reference_ratios
from conftest import saved_mnist_unet


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An untrained 28×28 UNet small enough to sample in a blink, marked as an MNIST model."""
    return saved_mnist_unet(tmp_path_factory.mktemp("ck") / "tiny")


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.stack, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v)
        if tag not in ("meta", "img", "br", "link", "input", "hr"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_eval_rows_and_report(tiny_ckpt, tmp_path):
    results = tmp_path / "results.jsonl"
    runner = CliRunner()
    for nfe, extra in ((2, ["--no-latency"]), (4, [])):
        r = runner.invoke(main, ["eval", tiny_ckpt, "--solver", "ddim", "--nfe", str(nfe), "-n", "40",
                                 "--batch-size", "16", "--out", str(results), *extra])
        assert r.exit_code == 0, r.output
        assert "| FID-dom |" in r.output or "FID-dom" in r.output
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 2
    for row, nfe in zip(rows, (2, 4)):
        p = row["protocol"]
        assert (p["n"], p["solver"], p["nfe"], p["nfe_used"], p["runtime"]) == (40, "ddim", nfe, nfe, "eager")
        assert p["feature_net"]["hash"] and p["reference"]["split"] == "test" and p["reference"]["n"] == 1000
        q = row["quality"]
        assert q["fid_dom"] > 0 and q["kid_std"] >= 0 and 1 <= q["is"] <= 10
        assert 0 <= q["precision"] <= 1 and 0 <= q["recall"] <= 1 and q["mse"] > 0
        assert sum(q["label_hist"]) == 40
        c = row["cost"]
        assert c["params"] > 0 and c["macs_per_image"] > 0 and c["weights_bytes"] > 0
        assert (results.parent / row["grid"]).is_file()
    assert "latency_ms" not in rows[0]["cost"] and set(rows[1]["cost"]["latency_ms"]) == {"1", "16", "64"}

    out = tmp_path / "report"
    r = runner.invoke(main, ["report", str(results), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = (out / "index.html").read_text()
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack
    assert parser.refs, "the page should reference its plots and grids"
    anchors = set(re.findall(r'id="([^"]+)"', page))
    for ref in parser.refs:
        assert (ref[1:] in anchors) if ref.startswith("#") else (out / ref).is_file(), ref
    assert any(ref.startswith("grids/") for ref in parser.refs)
    assert "fid_vs_nfe.png" in parser.refs and (out / "fid_vs_time.svg").is_file() and "<svg" in page
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "FID-dom" in (out / "report.md").read_text()


def test_eval_user_errors_are_one_line(tiny_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["eval", tiny_ckpt, "--runtime", "nope", "-n", "4", "--out", str(tmp_path / "r.jsonl")])
    assert r.exit_code == 2
    assert "unknown runtime 'nope'" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "cannot read results" in r.output


def test_bench_writes_cost_table(tiny_ckpt, tmp_path):
    out = tmp_path / "bench.md"
    r = CliRunner().invoke(main, ["bench", tiny_ckpt, "--runtime", "eager", "--runtime", "bf16",
                                  "--batch-sizes", "1,4", "--rounds", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.with_suffix(".json").read_text())
    assert [row["runtime"] for row in rec["rows"]] == ["eager", "bf16"]
    assert set(rec["rows"][0]["latency_ms"]) == {"1", "4"}
    assert "ms/eval @4" in out.read_text()


def test_pareto_front_and_reference_ratio():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (0.5, 9.0), (4.0, 1.0)]
    assert pareto_front(pts) == [3, 0, 1, 4]
    mk = lambda w, rt, nfe, f: {"weights": w, "protocol": {"runtime": rt, "nfe_used": nfe}, "quality": {"fid_dom": f}}  # noqa: E731
    rows = [mk("a", "eager", 10, 4.0), mk("a", "eager", 100, 2.0), mk("a", "bf16", 100, 3.0), mk("b", "bf16", 10, 1.0)]
    assert reference_ratios(rows) == [2.0, 1.0, 1.5, 0.5]  # b has no eager row: the dataset's reference
    # a distilled model evaluated once is divided by the base's reference, not by itself
    rows = [dict(mk("a", "eager", 1000, 0.5), dataset="m"), dict(mk("s", "eager", 4, 2.0), dataset="m"),
            dict(mk("s", "int8", 4, 3.0), dataset="m"), dict(mk("c", "eager", 4, 8.0), dataset="other")]
    assert reference_ratios(rows) == [1.0, 4.0, 1.5, 1.0]
