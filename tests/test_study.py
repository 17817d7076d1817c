"""Studies: TOML grids, resumable cells, cached recipe checkpoints, computed findings."""
import json

import pytest

from leandiff.errors import UserError
from leandiff.study import cells, load_study, run_study

STUDY = """
title = "tiny study"
n = 8
seed = 0
batch_size = 8
solvers = ["ddim"]
nfe = [2, 4]
runtimes = ["ckpt"]

[[models]]
name = "base"
ckpt = "zoo:mnist-tiny"

[[models]]
name = "cached"
base = "zoo:mnist-tiny"
recipe = "cache(interval=2)"

[[findings]]
claim = "more steps do not make FID-dom 100x worse"
metric = "fid_dom"
a = { model = "base", nfe = 4 }
b = { model = "base", nfe = 2 }
relation = "a < b*factor"
factor = 100.0
"""


class Killed(Exception):
    pass


def test_study_runs_kills_and_resumes(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(STUDY)
    study = load_study(p)
    assert len(cells(study)) == 4
    out = tmp_path / "out"

    def dying_log(msg):  # "kill" the study right after its third cell (the first recipe cell) is written
        if msg.startswith("[3/4]"):
            raise Killed(msg)

    with pytest.raises(Killed):
        run_study(study, out, progress=False, log=dying_log)
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    logs = []
    rows = run_study(study, out, progress=False, log=logs.append)
    assert len(rows) == 4 and len((out / "results.jsonl").read_text().splitlines()) == 4
    assert sum("skipped" in m for m in logs) == 3
    assert not any("building" in m for m in logs)  # the recipe checkpoint was cached in ckpts/
    assert len(list((out / "ckpts").iterdir())) == 1
    cached = [r for r in rows if r["study_model"] == "cached"]
    assert all(r["study_runtime"] == "cache(interval=2)" for r in cached)  # the checkpoint's runtime spec
    f = json.loads((out / "findings.json").read_text())
    assert f[0]["verdict"] in ("agrees", "disagrees")
    assert f[0]["verdict"] == ("agrees" if f[0]["a_value"] < 100 * f[0]["b_value"] else "disagrees")
    assert (out / "report" / "index.html").is_file() and "findings" in (out / "findings.md").read_text()


def test_rows_needing_a_missing_optional_extra_are_skipped_with_a_note(tmp_path, monkeypatch):
    import sys

    for module in ("openvino", "nncf"):  # as if the openvino extra were not installed
        monkeypatch.setitem(sys.modules, module, None)
    p = tmp_path / "s.toml"
    p.write_text(STUDY.split("[[models]]")[0].replace('runtimes = ["ckpt"]', 'runtimes = ["ckpt", "openvino"]')
                 .replace("nfe = [2, 4]", "nfe = [2]")
                 + '[[models]]\nname = "base"\nckpt = "zoo:mnist-tiny"\n\n[[models]]\nname = "ov8"\n'
                   'base = "zoo:mnist-tiny"\nrecipe = "quant(runtime=openvino-int8,calib=uniform,n=8,steps=2)"\n'
                   'made_from = "base"\n')  # its lineage check needs the checkpoint too
    logs = []
    rows = run_study(load_study(p), tmp_path / "out", progress=False, log=logs.append)
    assert [(r["study_model"], r["study_runtime"]) for r in rows] == [("base", "eager")]
    notes = [m for m in logs if m.startswith("note:")]
    assert len(notes) == 2 and all("leandiff[openvino]" in m or "openvino" in m for m in notes)
    assert "the cell is skipped" in notes[0] and "its cells are skipped" in notes[1]
    assert (tmp_path / "out" / "report" / "index.html").is_file()


@pytest.mark.parametrize("text,msg", [
    ("solvers = ['ddim']\nnfe = [2]\n", "models"),
    ("solvers = ['ddim']\nnfe = [2]\n[[models]]\nname = 'x'\n", "either ckpt"),
    ("solvers = [\n", "invalid TOML"),
])
def test_bad_study_files(tmp_path, text, msg):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=msg):
        load_study(p)


def test_shipped_studies_parse():
    from pathlib import Path

    from leandiff.recipe import parse_recipe

    for p in sorted(Path(__file__).resolve().parents[1].joinpath("studies").glob("*.toml")):
        s = load_study(p)
        for m in s.models:
            if m.recipe:  # every step and every value checked, as `leandiff study` would before running
                parse_recipe(m.recipe)


CHAINED = """
title = "chained rows"
n = 8
batch_size = 8
solvers = ["ddim"]
nfe = [2]
runtimes = ["ckpt"]

[[models]]
name = "pruned"
base = "zoo:mnist-tiny"
recipe = "prune(method=magnitude, ratio=0.3)"

[[models]]
name = "pruned-cached"
base = "model:pruned"
recipe = "cache(interval=2)"
"""


def test_a_row_builds_on_an_earlier_rows_checkpoint(tmp_path):
    """base = "model:NAME" starts the recipe from that row's built checkpoint (built once, reused),
    and the chained row's directory follows the parent's recipe."""
    from leandiff.study import model_checkpoint, recipe_dir

    p = tmp_path / "s.toml"
    p.write_text(CHAINED)
    study = load_study(p)
    models = {m.name: m for m in study.models}
    out = tmp_path / "out"
    logs = []
    rows = run_study(study, out, progress=False, log=logs.append)
    assert sum("building" in m for m in logs) == 2  # the parent once, not again for its child
    pruned, chained = (next(r for r in rows if r["study_model"] == n) for n in ("pruned", "pruned-cached"))
    assert chained["study_runtime"] == "cache(interval=2)" and pruned["study_runtime"] == "eager"
    assert chained["cost"]["params"] == pruned["cost"]["params"] < 980_161  # the pruned network, cached
    child = model_checkpoint(out, models["pruned-cached"], log=logs.append, models=models)
    assert [s["step"] for s in child.lineage][-2:] == ["prune", "cache"]
    other = {**models, "pruned": models["pruned"].__class__("pruned", None, "zoo:mnist-tiny",
                                                            "prune(method=magnitude, ratio=0.5)")}
    assert recipe_dir(out, models["pruned-cached"], other) != recipe_dir(out, models["pruned-cached"], models)


def test_a_row_may_only_build_on_an_earlier_row(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(CHAINED.replace('base = "model:pruned"', 'base = "model:later"'))
    with pytest.raises(UserError, match="names no earlier model"):
        load_study(p)


def test_listed_cells_follow_the_grid_and_a_spacing_is_part_of_a_cells_identity(tmp_path):
    from leandiff.study import cell_key

    p = tmp_path / "s.toml"
    p.write_text(STUDY + '\n[[cells]]\nmodel = "base"\nsolver = "dpmpp-3m-sde"\nnfe = 10\nspacing = "trailing"\n')
    study = load_study(p)
    cs = cells(study)
    assert len(cs) == 5 and cs[-1] == {"model": "base", "solver": "dpmpp-3m-sde", "nfe": 10, "runtime": "eager",
                                       "spacing": "trailing", "n": 8, "seed": 0}
    assert "spacing" not in json.loads(cell_key(cs[0]))  # a grid cell's key is what it was before listed cells
    assert json.loads(cell_key(cs[-1]))["spacing"] == "trailing"


@pytest.mark.parametrize("top, tail, says", [
    ("", '[[cells]]\nmodel = "nope"\nsolver = "ddim"\nnfe = 2\n', "not one of the study's models"),
    ("", '[[cells]]\nmodel = "base"\nsolver = "ddim"\n', "needs model, solver and nfe"),
    ("", '[[cells]]\nmodel = "base"\nsolver = "ddim"\nnfe = 2\neta = 1\n', "needs model, solver and nfe"),
    ('reference_card = "other"\n', "", "reference_card"),
    ("", '[[models]]\nname = "s"\nckpt = "zoo:mnist-tiny-pd4"\nmade_from = "nope"\n', "made_from"),
])
def test_bad_listed_cells_and_settings_are_one_line_errors(tmp_path, top, tail, says):
    p = tmp_path / "s.toml"
    p.write_text(top + STUDY + tail)
    with pytest.raises(UserError, match=says):
        load_study(p)


def test_a_latency_table_must_ask_for_the_pass(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("latency = { rounds = 3 }\n" + STUDY)
    with pytest.raises(UserError, match="pass = true"):
        load_study(p)
    p.write_text("latency = { pass = true, rounds = 3 }\n" + STUDY)
    assert load_study(p).latency_pass == {"rounds": 3}


def test_the_shipped_demo_studies_load_and_name_their_models_rows():
    from leandiff.demo import DemoConfig, demo_study

    for fast in (False, True):
        study = demo_study(DemoConfig(fast=fast))
        assert study.cells and not study.solvers and study.reference_card == "base" and study.latency_pass
        assert {c["model"] for c in study.cells} <= {m.name for m in study.models}
    other = demo_study(DemoConfig(model="runs/mine", n=64))
    labels = {m.name: m.label for m in other.models}
    assert labels["base"] == "runs/mine" and labels["int8"] == "runs/mine > int8"
    assert labels["pd4"] == "zoo:mnist-tiny-v2-pd4"  # another model's name is not rewritten
    assert (other.n, other.batch_size, other.mse_n) == (64, 64, 64)
