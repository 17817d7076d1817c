"""Table-driven bad inputs across the CLI: each gives exactly one line on stderr, exit code 2,
no traceback, and leaves no output file behind."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from leandiff.checkpoint import save_checkpoint
from leandiff.cli import main


@pytest.fixture
def files(tmp_path, tiny_ckpt, tiny_model_json):
    good = tmp_path / "good"
    save_checkpoint(tiny_ckpt, good)
    raw = (good / "model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "random.safetensors").write_bytes(os.urandom(2048))
    (tmp_path / "random.ckpt").write_bytes(os.urandom(2048))
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "leandiff.json").write_text("{nope")
    nan = tmp_path / "nan"
    with torch.no_grad():
        for p in tiny_ckpt.net.parameters():
            p.fill_(float("nan"))
            break
    save_checkpoint(tiny_ckpt, nan)
    (tmp_path / "badmodel.json").write_text(json.dumps({"block_out_channels": "wide"}))
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    return {"good": good, "tmp": tmp_path, "model": tiny_model_json}


def _cases(f):
    g, t = str(f["good"]), f["tmp"]
    out = str(t / "out")
    return {
        "missing checkpoint": ["info", str(t / "nope")],
        "truncated safetensors": ["info", str(t / "truncated.safetensors")],
        "random-bytes safetensors": ["sample", str(t / "random.safetensors"), "--out", out],
        "random-bytes ckpt": ["info", str(t / "random.ckpt")],
        "pickled checkpoint": ["info", str(t / "pickled.pt")],
        "foreign diffusers model": ["info", str(t / "foreign")],
        "corrupt metadata JSON": ["info", str(t / "notjson")],
        "NaN weights": ["sample", str(t / "nan"), "--out", out],
        "unknown zoo model": ["info", "zoo:does-not-exist"],
        "unknown solver": ["sample", g, "--solver", "rk99", "--out", out],
        "unknown spacing": ["sample", g, "--spacing", "cubic", "--out", out],
        "NFE zero": ["sample", g, "--nfe", "0", "--out", out],
        "NFE negative": ["sample", g, "--nfe", "-5", "--out", out],
        "NFE above T": ["sample", g, "--solver", "ddim", "--nfe", "1001", "--out", out],
        "zero samples": ["sample", g, "-n", "0", "--out", out],
        "negative samples": ["sample", g, "-n", "-3", "--out", out],
        "eta out of range": ["sample", g, "--eta", "2", "--nfe", "2", "-n", "1", "--out", out],
        "NFE not a number": ["sample", g, "--nfe", "ten", "--out", out],
        "unwritable output": ["sample", g, "--nfe", "2", "-n", "1", "--out", str(t / "readonly" / "sub")],
        "unknown dataset": ["train", "--dataset", "imagenet", "--steps", "1", "--out", out],
        "wrong dataset path": ["train", "--dataset", "mnist", "--data-dir", str(t / "nowhere"), "--steps", "1", "--out", out],
        "wrong image shape for model": ["train", "--dataset", "mnist", "--model", str(f["model"]), "--steps", "1", "--out", out],
        "unknown model": ["train", "--model", "gpt-5", "--steps", "1", "--out", out],
        "malformed model config": ["train", "--model", str(t / "badmodel.json"), "--steps", "1", "--out", out],
        "zero steps": ["train", "--steps", "0", "--out", out],
        "negative batch": ["train", "--batch-size", "-1", "--out", out],
        "bad init checkpoint": ["train", "--init", str(t / "random.ckpt"), "--steps", "1", "--out", out],
        "unknown command": ["frobnicate"],
        "missing --out": ["sample", g],
    }


def test_every_bad_input_gives_one_line_and_exit_2(files, capsys):
    if os.geteuid() == 0:
        os.chmod(files["tmp"] / "readonly", 0o500)  # root ignores modes: use a path under a file instead
    failures = []
    cases = _cases(files)
    if os.geteuid() == 0:
        (files["tmp"] / "afile").write_text("x")
        cases["unwritable output"][-1] = str(files["tmp"] / "afile" / "sub")
    for name, args in cases.items():
        with pytest.raises(SystemExit) as e:
            main(args, prog_name="leandiff")
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        if e.value.code != 2 or len(lines) != 1 or "Traceback" in err or not lines[0].startswith("leandiff: error:"):
            failures.append(f"{name}: exit {e.value.code}, stderr {err!r}")
        if (files["tmp"] / "out").exists() and any((files["tmp"] / "out").rglob("*")):
            failures.append(f"{name}: left files in the output directory")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 25
