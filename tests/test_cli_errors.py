"""Table-driven bad inputs across the CLI: each gives exactly one line on stderr, exit code 2,
no traceback, and leaves no output file behind."""
from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from leandiff.checkpoint import Checkpoint, save_checkpoint
from leandiff.cli import main
from leandiff.models import build_network


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
    huge = tmp_path / "huge"  # finite weights whose outputs overflow to Inf while sampling
    with torch.no_grad():
        tiny_ckpt.net.conv_out.weight.fill_(3e38)
    save_checkpoint(tiny_ckpt, huge)
    nan = tmp_path / "nan"
    with torch.no_grad():
        for p in tiny_ckpt.net.parameters():
            p.fill_(float("nan"))
            break
    save_checkpoint(tiny_ckpt, nan)
    (tmp_path / "badmodel.json").write_text(json.dumps({"block_out_channels": "wide"}))
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    # a 3-channel model that says it models MNIST (grey): the classifier cannot score it
    rgb = tmp_path / "rgb"
    arch = {"type": "diffusers.UNet2DModel", "config": {**tiny_ckpt.arch["config"], "in_channels": 3, "out_channels": 3}}
    save_checkpoint(Checkpoint(net=build_network(arch), arch=arch, schedule=tiny_ckpt.schedule,
                               meta={"dataset": "mnist"}), rgb)
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "corrupt_images").mkdir()
    for i in range(3):
        (tmp_path / "corrupt_images" / f"img_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (tmp_path / "results.jsonl").write_text('{"schema": "something-else"}\n')
    return {"good": good, "tmp": tmp_path, "model": tiny_model_json, "rgb": rgb}


class FullDisk:
    """A stand-in for ``builtins.open``: files opened for writing under ``root`` share ``free`` bytes;
    the write that does not fit writes what fits and fails with ENOSPC, as on a full disk."""

    def __init__(self, root: Path, free: int):
        self.root, self.free = Path(root).resolve(), free

    def __call__(self, file, mode="r", *args, **kwargs):
        f = _real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                and Path(file).resolve().is_relative_to(self.root):
            return _Metered(f, self)
        return f


class _Metered:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        n = memoryview(data).nbytes if not isinstance(data, str) else len(data.encode())
        if n > self._disk.free:
            self._f.write(data[:self._disk.free])
            self._f.flush()
            self._disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


_real_open = builtins.open


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
        "weights overflowing in sampling": ["sample", str(t / "huge"), "--solver", "ddim", "--nfe", "3", "-n", "2", "--out", out],
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
        # runtimes, solver options, NFE and counts elsewhere
        "unknown runtime (sample)": ["sample", g, "--runtime", "tpu-v9", "--nfe", "2", "-n", "1", "--out", out],
        "unknown runtime (eval)": ["eval", g, "--runtime", "tpu-v9", "-n", "4", "--out", f"{out}/r.jsonl"],
        "option the solver lacks": ["sample", g, "--solver", "dpmpp-2m", "--nfe", "2", "--eta", "0.5", "-n", "1",
                                    "--out", out],
        "NFE above T (eval)": ["eval", g, "--solver", "ddim", "--nfe", "1001", "-n", "4", "--dataset", "mnist",
                               "--out", f"{out}/r.jsonl"],
        "NFE zero (eval)": ["eval", g, "--nfe", "0", "--out", f"{out}/r.jsonl"],
        "one eval sample": ["eval", g, "-n", "1", "--out", f"{out}/r.jsonl"],
        "zero batch size (sample)": ["sample", g, "--batch-size", "0", "--nfe", "2", "--out", out],
        "zero samples (demo)": ["demo", "-n", "0", "--out", out],
        "bad bench batch sizes": ["bench", g, "--batch-sizes", "1,x", "--out", f"{out}/b.md"],
        # images of the wrong size or channel count for the model
        "wrong image size (eval)": ["eval", g, "--dataset", "mnist", "-n", "4", "--out", f"{out}/r.jsonl"],
        "wrong channel count (eval)": ["eval", str(f["rgb"]), "-n", "4", "--out", f"{out}/r.jsonl"],
        "empty image folder": ["train", "--dataset", f"folder:{t / 'empty_folder'}", "--model", str(f["model"]),
                               "--steps", "1", "--out", out],
        "corrupt image files": ["train", "--dataset", f"folder:{t / 'corrupt_images'}", "--model", str(f["model"]),
                                "--steps", "1", "--out", out],
        "folder is a file": ["train", "--dataset", f"folder:{t / 'badmodel.json'}", "--model", str(f["model"]),
                             "--steps", "1", "--out", out],
        # malformed recipes: checked before any work
        "empty recipe": ["compress", g, "--recipe", "  ", "--out", out],
        "recipe syntax": ["compress", g, "--recipe", "finetune(steps=", "--out", out],
        "recipe missing '>'": ["compress", g, "--recipe", "finetune(steps=1) finetune(steps=1)", "--out", out],
        "unknown recipe step": ["compress", g, "--recipe", "frobnicate(x=1)", "--out", out],
        "unknown recipe argument": ["compress", g, "--recipe", "finetune(stepz=3)", "--out", out],
        "recipe argument type": ["compress", g, "--recipe", "finetune(steps=many)", "--out", out],
        "recipe argument twice": ["compress", g, "--recipe", "finetune(steps=1,steps=2)", "--out", out],
        "recipe stray character": ["compress", g, "--recipe", "finetune(steps=1);rm", "--out", out],
        # errors that surface only when a step runs: still no output left behind
        "recipe step count zero": ["compress", g, "--recipe", "finetune(steps=0)", "--dataset", f"folder:{t / 'empty_folder'}",
                                   "--out", out],
        "recipe on unknown dataset": ["compress", g, "--recipe", "finetune(steps=1)", "--dataset", "imagenet", "--out", out],
        "compress a missing checkpoint": ["compress", str(t / "nope"), "--recipe", "finetune(steps=1)", "--out", out],
        # results files
        "report of foreign rows": ["report", str(t / "results.jsonl"), "--out", out],
        "report of a missing file": ["report", str(t / "missing.jsonl"), "--out", out],
        # a full disk (simulated: see FullDisk): nothing fits
        "full disk": (["sample", g, "--nfe", "2", "-n", "4", "--out", out], 0),
    }


def test_every_bad_input_gives_one_line_and_exit_2(files, capsys, monkeypatch):
    if os.geteuid() == 0:
        os.chmod(files["tmp"] / "readonly", 0o500)  # root ignores modes: use a path under a file instead
    failures = []
    cases = _cases(files)
    if os.geteuid() == 0:
        (files["tmp"] / "afile").write_text("x")
        cases["unwritable output"][-1] = str(files["tmp"] / "afile" / "sub")
    for name, args in cases.items():
        args, free = args if isinstance(args, tuple) else (args, None)
        with pytest.raises(SystemExit) as e, monkeypatch.context() as m:
            if free is not None:
                m.setattr(builtins, "open", FullDisk(files["tmp"] / "out", free))
            main(args, prog_name="leandiff")
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        if e.value.code != 2 or len(lines) != 1 or "Traceback" in err or not lines[0].startswith("leandiff: error:"):
            failures.append(f"{name}: exit {e.value.code}, stderr {err!r}")
        left = [p for p in (files["tmp"] / "out").rglob("*") if p.is_file()] if (files["tmp"] / "out").exists() else []
        if left:
            failures.append(f"{name}: left {[str(p.relative_to(files['tmp'])) for p in left]} in the output directory")
        if (files["tmp"] / "out").exists():
            shutil.rmtree(files["tmp"] / "out")  # each case starts from no output at all
    assert not failures, "\n".join(failures)
    assert len(cases) >= 40


@pytest.mark.parametrize("fits", ["nothing", "the grid only"])
def test_disk_filling_up_mid_write_leaves_nothing(files, capsys, monkeypatch, fits):
    """ENOSPC after a partial write: one line, exit 2, no temp file and no half a result."""
    out = files["tmp"] / "out"
    args = ["sample", str(files["good"]), "--nfe", "2", "-n", "16", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(args, prog_name="leandiff")
    assert e.value.code == 0
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    assert set(sizes) == {"grid.png", "samples.npz"}
    shutil.rmtree(out)
    capsys.readouterr()
    free = 0 if fits == "nothing" else sizes["grid.png"] + sizes["samples.npz"] // 2
    monkeypatch.setattr(builtins, "open", FullDisk(out, free))
    with pytest.raises(SystemExit) as e:
        main(args, prog_name="leandiff")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert [p.name for p in out.iterdir()] == []  # no grid, no npz, no .tmp


def test_results_row_on_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    from leandiff.errors import UserError
    from leandiff.evaluate.harness import append_row

    results = tmp_path / "results.jsonl"
    append_row(results, {"schema": "x", "a": 1})
    before = results.read_bytes()
    monkeypatch.setattr(builtins, "open", FullDisk(tmp_path, 10))  # room for 10 bytes of the next row
    with pytest.raises(UserError, match="No space left"):
        append_row(results, {"schema": "x", "b": "y" * 1000})
    assert results.read_bytes() == before
