"""The main job, in its fast mode, on the shipped model: report files exist and hold every row."""
import json
from html.parser import HTMLParser

from conftest import run_cli


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith(("#", "http"))]


def test_demo_fast_mode_writes_report_with_all_rows(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--fast", "--out", out, check=True)
    assert "report:" in r.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["protocol"]["solver"], x["protocol"]["nfe_used"], x["protocol"]["runtime"]) for x in rows] == [
        ("ddim", 4, "eager"), ("dpmpp-2m", 4, "eager"), ("ddim", 4, "bf16"), ("ddim", 4, "ort-int8"),
        ("ddim", 4, "cache:2"), ("ddim", 4, "eager")]
    # the shipped distilled student samples with the spacing it was trained for
    assert rows[-1]["checkpoint"] == "zoo:mnist-tiny-v2-pd4" and rows[-1]["protocol"]["spacing"] == "trailing"
    assert rows[-1]["quality"]["fid_dom"] < rows[0]["quality"]["fid_dom"]  # 4 steps: the student beats DDIM
    assert [x["checkpoint"] for x in rows].count("zoo:mnist-tiny-v2 > int8") == 1
    # latency: one pass over every row's network after the sampling, with the load during it
    assert all(set(x["cost"]["latency_ms"]) == {"1", "16"} and "one pass" in x["protocol"]["latency"]["pass"]
               and x["cost"]["load"]["latency"]["cores"] >= 1 for x in rows)
    # every row knows the model its lineage started from: the base
    assert {x["origin"] for x in rows} == {rows[0]["weights"]} and rows[3]["parent"] == rows[0]["weights"]
    # the caching row prices what it ran: 2 full + 2 shallow evaluations, fewer MACs than the full net
    cached = rows[4]["cost"]
    assert cached["cache_calls"] == {"full": 2, "shallow": 2}
    assert cached["macs_per_eval_spent"] < 0.8 * cached["macs_per_image"]
    assert "macs_per_eval_spent" not in rows[0]["cost"]
    assert all(x["protocol"]["n"] == 32 and x["quality"]["fid_dom"] > 0 for x in rows)
    report = out / "report"
    for name in ("index.html", "report.md", "results.csv"):
        assert (report / name).stat().st_size > 0
    page = (report / "index.html").read_text()
    p = _Refs()
    p.feed(page)
    assert p.refs and all(ref.startswith("#") or (report / ref).is_file() for ref in p.refs), p.refs
    md = (report / "report.md").read_text()
    assert "model card" in md  # the 1000-step reference row, read from the card and labelled
    assert md.count("| zoo:mnist-tiny-v2 |") == 4 and md.count("| zoo:mnist-tiny-v2 > int8 |") == 1
    # a rerun resumes: nothing is evaluated twice
    run_cli("demo", "--fast", "--out", out, check=True)
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
