"""The report answers "which one should I use?": recommendations per budget from the rows' own numbers,
ratios to the root reference and the parent, best-of-column marks, rows written before the newer fields
still render, and (where Debian's chromium is installed) the page renders with every image loaded."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from leandiff.evaluate.protocol import SCHEMA
from leandiff.evaluate.report import parent_rows, reference_ratios, root_references, write_report
from leandiff.io import save_grid

BASE, STUDENT = "b" * 16, "s" * 16


def _row(tmp: Path, name: str, weights: str, solver: str, nfe: int, fid: float, ips: float, *, runtime="eager",
         origin=None, parent=None, mb=3.9, se=0.01, params=980_161, nonzero=None, load=None, new=True):
    grid = tmp / f"{len(list(tmp.glob('*.png'))):02d}.png"
    save_grid(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(nfe)) * 2 - 1, grid)
    q = {"fid_dom": fid, "kid": fid / 1e3, "kid_std": 1e-4, "is": 5.0, "precision": 0.8, "recall": 0.8,
         "mse": 0.02, "confidence": 0.9, "label_entropy": 2.2}
    cost = {"params": params, "params_nonzero": nonzero or params, "macs_per_image": 90_100_000,
            "weights_bytes": int(3.9 * 2**20), "sampling_images_per_s": ips, "latency_ms": {"16": 100.0 / ips}}
    r = {"schema": SCHEMA, "checkpoint": name, "weights": weights, "dataset": "mnist", "lineage": ["train"],
         "protocol": {"solver": solver, "nfe": nfe, "nfe_used": nfe, "runtime": runtime, "spacing": "logsnr",
                      "n": 1000, "seed": 0},
         "quality": q, "cost": cost, "grid": str(grid)}
    if new:  # the fields this version records
        q["fid_dom_se"] = se
        q["fid_dom_ci"] = [fid - 1.96 * se, fid + 1.96 * se]
        cost["runtime_bytes"] = int(mb * 2**20)
        if nonzero:
            cost["macs_per_image_nonzero"] = 63_000_000
        cost["load"] = {"sampling": load or {"loadavg_1m": 1.0, "cores": 2}, "latency": load or {"loadavg_1m": 1.0, "cores": 2}}
        r.update(origin=origin or weights, parent=parent)
    return r


@pytest.fixture
def rows(tmp_path):
    g = tmp_path / "grids"
    g.mkdir()
    return [
        _row(g, "zoo:m [model card, N=2048]", BASE, "ddpm", 1000, 0.40, 0.5),  # 1: the root reference
        _row(g, "zoo:m", BASE, "dpmpp-3m-sde", 10, 0.42, 60.0, se=0.02),  # 2: best <= 10, within 1.10
        _row(g, "zoo:m", BASE, "dpmpp-2m", 10, 0.43, 70.0, se=0.02),  # 3: tied with 2 (intervals overlap)
        dict(_row(g, "zoo:m", BASE, "ddim", 4, 9.0, 150.0), warnings=["N=64 is too small for KID: subsets of 32"]),  # 4
        _row(g, "zoo:m-pd4", STUDENT, "ddim", 4, 3.6, 200.0, parent=BASE, origin=BASE),  # 5: best <= 4
        _row(g, "zoo:m-pd4 > int8", STUDENT, "ddim", 4, 3.8, 330.0, runtime="ort-int8", parent=STUDENT,
             origin=BASE, mb=1.1),  # 6
        _row(g, "zoo:m > int8", BASE, "dpmpp-3m-sde", 10, 0.43, 140.0, runtime="ort-int8", parent=BASE,
             mb=1.2, se=0.02, load={"loadavg_1m": 5.0, "cores": 2}),  # 7: fastest and smallest within 1.10
        _row(g, "zoo:m > sparse30", "p" * 16, "ddim", 20, 5.0, 30.0, parent=BASE, origin=BASE, nonzero=690_000),  # 8
    ]


def test_ratios_are_to_the_root_reference_and_the_parent(rows):
    ratios = reference_ratios(rows)
    assert ratios[5] == pytest.approx(3.8 / 0.40)  # the int8 student over the base's DDPM-1000, not over itself
    assert ratios[4] == pytest.approx(3.6 / 0.40)
    parents = parent_rows(rows)
    assert parents[5] is rows[4]  # the same sampler on the model before int8
    assert parents[6] is rows[1]  # the base's eager row with the same solver, NFE and spacing
    assert parents[0] is None and parents[1] is None  # the reference itself; a row of the reference's weights
    assert all(r is rows[0] for r in root_references(rows))


class _Page(HTMLParser):
    """The summary's answers (question -> linked row text), table cells by row, image sources."""

    def __init__(self):
        super().__init__()
        self.answers, self.cells, self.imgs, self.best = {}, {}, [], set()
        self._dt = self._in_dd = self._row = None
        self._text = ""
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "dt":
            self._dt, self._text = True, ""
        if tag == "dd":
            self._in_dd, self._text = True, ""
        if tag == "tr" and (a.get("id") or "").startswith("row-"):
            self._row = int(a["id"][4:])
            self.cells[self._row] = []
        if tag == "td" and self._row is not None:
            self._cell = ""
            if "best" in (a.get("class") or ""):
                self.best.add((self._row, len(self.cells[self._row])))
        if tag == "img":
            self.imgs.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "dt" and self._dt:
            self._q, self._dt = self._text.strip(), None
        if tag == "dd" and self._in_dd:
            self.answers[self._q] = self._text.strip()
            self._in_dd = None
        if tag == "td" and self._cell is not None:
            self.cells[self._row].append(self._cell)
            self._cell = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        self._text += data
        if self._cell is not None:
            self._cell += data


def test_summary_names_the_best_rows_and_the_table_marks_them(rows, tmp_path):
    index = write_report(rows, tmp_path / "report")
    page = _Page()
    page.feed(index.read_text())
    a = page.answers
    assert a["Best quality at ≤ 4 NFE"].startswith("#5 zoo:m-pd4 · ddim-4")
    assert a["Best quality at ≤ 10 NFE"].startswith("#2 zoo:m · dpmpp-3m-sde-10")
    assert "#3" in a["Best quality at ≤ 10 NFE"] and "overlap" in a["Best quality at ≤ 10 NFE"]
    assert a["Best quality at ≤ 20 NFE"].startswith("#2 ")
    assert a["Fastest within 1.10× of the reference"].startswith("#7 zoo:m > int8")
    assert "under load" in a["Fastest within 1.10× of the reference"]
    assert a["Smallest within 1.10× of the reference"].startswith("#7 ")
    heads = re.findall(r"<th[^>]*>([^<]+)</th>", index.read_text())
    fid, params, mmac = heads.index("FID-dom"), heads.index("params"), heads.index("MMAC")
    assert (1, fid) in page.best and not any((i, fid) in page.best for i in range(2, 9))
    assert page.cells[8][params].startswith("690,000") and "of 980,161" in page.cells[8][params]
    assert "nz" in page.cells[8][mmac] and (8, mmac) in page.best
    assert "⚠" in page.cells[7][heads.index("img/s")] and "⚠" not in page.cells[6][heads.index("img/s")]
    assert "⚠" in page.cells[4][heads.index("KID×1e3")] and "⚠" not in page.cells[3][heads.index("KID×1e3")]
    for src in page.imgs:
        assert (tmp_path / "report" / src).is_file(), src
    gallery = [s for s in page.imgs if s.startswith("grids/")]
    assert gallery[0].startswith("grids/real-mnist") and len(gallery) == len(rows) + 1, "the real images come first"
    svg = (tmp_path / "report" / "fid_vs_time.svg").read_text()
    assert svg.count("<title>") == len(rows) and "#6 zoo:m-pd4 &gt; int8" in svg


def test_report_prints_the_same_answers_as_the_page(rows, tmp_path):
    from click.testing import CliRunner

    from leandiff.cli import main
    from leandiff.evaluate.protocol import write_rows

    write_rows(tmp_path / "r.jsonl", rows)
    r = CliRunner().invoke(main, ["report", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Best quality at ≤ 4 NFE: #5 zoo:m-pd4 · ddim-4")
    assert any(line.startswith("Fastest within 1.10× of the reference: #7 zoo:m > int8") for line in lines)


def test_rows_from_before_the_new_fields_still_render(tmp_path):
    g = tmp_path / "grids"
    g.mkdir()
    old = [_row(g, "zoo:m", BASE, "ddim", 50, 6.7, 30.0, new=False), _row(g, "zoo:m", BASE, "ddim", 10, 9.0, 60.0, new=False)]
    index = write_report(old, tmp_path / "report")
    text = index.read_text()
    assert "Best quality at ≤ 10 NFE" in text and "#2 zoo:m · ddim-10" in text
    assert "no row is within 1.10×" not in text or "closest" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) {
    return {src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}; });
  var answers = Array.from(document.querySelectorAll('#summary dd a')).map(function (a) { return a.textContent; });
  var pre = document.createElement('pre'); pre.id = 'check';
  pre.textContent = JSON.stringify({imgs: imgs, answers: answers,
                                    svg: document.querySelectorAll('.plot svg .pt').length});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser (Debian: apt-get install chromium)")
def test_report_renders_in_a_real_browser(rows, tmp_path):
    index = write_report(rows, tmp_path / "report")
    probe = index.with_name("probe.html")  # the page with a checker appended: the report itself stays as written
    probe.write_text(index.read_text().replace("</body>", _CHECK + "</body>"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="check">(.*?)</pre>', r.stdout, re.S)
    assert found, r.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&"))
    assert check["imgs"] and all(i["ok"] for i in check["imgs"]), [i for i in check["imgs"] if not i["ok"]]
    assert len(check["imgs"]) == len(rows) + 2  # the NFE plot, the real grid, one grid per row
    assert check["answers"][:3] == [a for a in check["answers"][:3] if a.startswith(("#5 ", "#2 "))]
    assert check["answers"][0].startswith("#5 zoo:m-pd4") and check["answers"][3].startswith("#7 zoo:m > int8")
    assert check["svg"] == len(rows)
