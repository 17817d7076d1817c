import json
import os
import pickle

import pytest
import torch

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.errors import UserError

from conftest import run_cli


def _out(ck, x, t):
    with torch.no_grad():
        return ck.denoiser()(x, t)


def test_round_trip_reproduces_outputs_exactly(tiny_ckpt, tmp_path):
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 400, 999])
    save_checkpoint(tiny_ckpt, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    assert torch.equal(_out(tiny_ckpt, x, t), _out(back, x, t))
    assert back.arch == tiny_ckpt.arch and back.schedule == tiny_ckpt.schedule
    # the safetensors file alone is a complete checkpoint too
    alone = load_checkpoint(tmp_path / "ck" / "model.safetensors")
    assert torch.equal(_out(alone, x, t), _out(back, x, t))
    assert not [p for p in os.listdir(tmp_path / "ck") if p.endswith(".tmp")]


def test_diffusers_model_directory_loads(tiny_ckpt, tmp_path):
    tiny_ckpt.net.save_pretrained(tmp_path / "hf")  # config.json + diffusion_pytorch_model.safetensors
    back = load_checkpoint(tmp_path / "hf")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    assert torch.equal(_out(tiny_ckpt, x, t), _out(back, x, t))


def test_foreign_torch_state_dict_is_read_weights_only(tiny_ckpt, tmp_path):
    save_checkpoint(tiny_ckpt, tmp_path)
    torch.save(tiny_ckpt.net.state_dict(), tmp_path / "foreign.pt")
    back = load_checkpoint(tmp_path / "foreign.pt")
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([100])
    assert torch.equal(_out(tiny_ckpt, x, t), _out(back, x, t))


class _Exploit:
    """Unpickling this would create a file: loading must never execute it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _bad_files(tmp_path, tiny_ckpt):
    save_checkpoint(tiny_ckpt, tmp_path / "good")
    raw = (tmp_path / "good" / "model.safetensors").read_bytes()
    bad = {}
    bad["truncated.safetensors"] = raw[: len(raw) // 2]
    bad["random.safetensors"] = os.urandom(4096)
    bad["random.pt"] = os.urandom(4096)
    bad["pickle.pt"] = pickle.dumps({"weights": [1, 2, 3]})
    bad["empty.safetensors"] = b""
    out = {}
    for name, data in bad.items():
        p = tmp_path / name
        p.write_bytes(data)
        out[name] = p
    return out


def test_bad_checkpoint_files_give_one_line_and_exit_2(tiny_ckpt, tmp_path):
    for name, p in _bad_files(tmp_path, tiny_ckpt).items():
        r = run_cli("info", p)
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("leandiff: error:"), (name, r.stderr)
        assert "Traceback" not in r.stderr


def test_crafted_pickle_executes_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Exploit(str(target))))
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": _Exploit(str(target))}))
    for name in ("evil.pt", "evil.ckpt"):
        with pytest.raises(UserError):
            load_checkpoint(tmp_path / name)
        r = run_cli("info", tmp_path / name)
        assert r.returncode == 2
    assert not target.exists()


def test_nan_weights_and_foreign_metadata_are_refused(tiny_ckpt, tmp_path):
    with torch.no_grad():
        next(tiny_ckpt.net.parameters())[0].fill_(float("nan"))
    save_checkpoint(tiny_ckpt, tmp_path / "nan")
    with pytest.raises(UserError, match="NaN"):
        load_checkpoint(tmp_path / "nan")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "leandiff.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not a leandiff checkpoint"):
        load_checkpoint(tmp_path / "foreign")
    with pytest.raises(UserError, match="no such"):
        load_checkpoint(tmp_path / "missing")


def test_shape_mismatch_is_a_clear_error(tiny_ckpt, tmp_path):
    save_checkpoint(tiny_ckpt, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "leandiff.json").read_text())
    meta["architecture"]["config"]["block_out_channels"] = [8, 24]
    (tmp_path / "ck" / "leandiff.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit"):
        load_checkpoint(tmp_path / "ck")


def test_default_sampler_without_a_record_is_the_measured_best_not_ddim50(tiny_ckpt):
    from leandiff.solvers import DEFAULT_NFE, DEFAULT_SOLVER, SOLVERS

    assert DEFAULT_SOLVER in SOLVERS and (DEFAULT_SOLVER, DEFAULT_NFE) != ("ddim", 50)
    assert tiny_ckpt.sampling_defaults() == (DEFAULT_SOLVER, DEFAULT_NFE, "eager")
    assert tiny_ckpt.sampling_defaults("ddim", 20, "bf16") == ("ddim", 20, "bf16")  # the user's choice wins


def test_default_spacing_follows_the_schedule(tiny_ckpt):
    import dataclasses

    from leandiff.schedule import Schedule

    assert tiny_ckpt.default_spacing(solver="ddim") == "logsnr"  # linear β
    cosine = dataclasses.replace(tiny_ckpt, schedule=Schedule("cosine"))
    assert cosine.default_spacing(solver="ddim") == "trailing" and cosine.default_spacing("leading") == "leading"
    # the default sampler brings its own spacing (3M-SDE at 10 NFE on logsnr is far worse, even on linear β)
    assert tiny_ckpt.default_spacing() == "trailing" == tiny_ckpt.default_spacing(solver="dpmpp-3m-sde")


def test_a_card_recommendation_brings_its_spacing_only_to_its_solver(tiny_ckpt):
    from leandiff.compress.quant import deployed_steps

    tiny_ckpt.meta["sampler"] = {"solver": "dpmpp-3m-sde", "nfe": 10, "spacing": "trailing", "source": "card"}
    assert tiny_ckpt.sampling_defaults() == ("dpmpp-3m-sde", 10, "eager")
    assert tiny_ckpt.default_spacing(solver="dpmpp-3m-sde") == "trailing" == tiny_ckpt.default_spacing()
    assert tiny_ckpt.default_spacing(solver="ddim") == "logsnr"  # another solver: the schedule's default
    assert deployed_steps(tiny_ckpt) == 50  # a recommendation does not bind the network to 10 steps
    # a distilled student's record is a property of the network: its spacing and NFE hold for any solver
    tiny_ckpt.meta["sampler"] = {"solver": "ddim", "nfe": 4, "spacing": "trailing"}
    assert tiny_ckpt.default_spacing(solver="dpmpp-2m") == "trailing" and deployed_steps(tiny_ckpt) == 4


def test_shipped_base_defaults_to_the_sampler_its_card_measured_best():
    ck = load_checkpoint("zoo:mnist-tiny")
    assert ck.sampling_defaults() == ("dpmpp-3m-sde", 10, "eager") and ck.default_spacing(solver="ddim") == "logsnr"
    assert ck.default_spacing(solver="dpmpp-3m-sde") == "trailing"
