"""Quantization: fake-quant error bounds, W8A8 fidelity, calibration collectors' timestep
distributions, ONNX export equivalence, the ort-int8 runtime inside every solver, checkpoints that
know their runtime and reload from data."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.compress import calibration as C, quant as Q
from leandiff.compress.onnx import OrtNetwork, export_onnx, quantize_ort_int8
from leandiff.errors import UserError
from leandiff.models import image_shape
from leandiff.sample import SampleConfig, sample_all
from leandiff.solvers import SOLVERS, nfe_per_step

from conftest import run_cli


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


# --- the quantizer -----------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 16), lo=st.floats(-50, 0), width=st.floats(1e-3, 100), seed=st.integers(0, 2 ** 16))
def test_quantize_dequantize_error_at_most_half_step(bits, lo, width, seed):
    x = lo + width * torch.rand(500, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s, z = Q.affine_params(torch.tensor(lo, dtype=torch.float64), torch.tensor(lo + width, dtype=torch.float64), bits)
    err = (Q.fake_quant(x, s, z, *Q.int_range(bits, False)) - x).abs()
    assert (err <= s / 2 + 1e-9 * (1 + x.abs())).all()


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quant_error_at_most_half_step_per_channel(bits, per_channel):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.01, 3, 16)[:, None, None, None]
    s = Q.weight_scale(w, bits, per_channel, "minmax")
    assert s.numel() == (16 if per_channel else 1)
    sb = s.reshape(-1, 1, 1, 1)
    wq = Q.fake_quant(w, sb, 0.0, *Q.int_range(bits, True))
    assert ((wq - w).abs() <= sb / 2 + 1e-7).all()
    assert len(torch.unique(torch.round(wq / sb))) <= 2 ** bits


def test_mse_observer_never_worse_than_minmax():
    v = torch.randn(20000, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    def err(lo, hi):
        s, z = Q.affine_params(lo, hi, 4)
        return (Q.fake_quant(v, s, z, *Q.int_range(4, False)) - v).pow(2).mean()
    assert err(*Q.OBSERVERS["mse"](v, 4)) <= err(*Q.OBSERVERS["minmax"](v, 4))


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="w must be 2..8"):
        Q.QuantConfig(w_bits=9)
    with pytest.raises(UserError, match="a must be 4..16"):
        Q.QuantConfig(a_bits=3)
    with pytest.raises(UserError, match="unknown observer"):
        Q.QuantConfig(observer="nope")


# --- fake quantization of a network --------------------------------------------------------------------------------

CALIB = Q.CalibConfig(collector="uniform", n=32, steps=4, batch_size=32)


@pytest.fixture(scope="module")
def tiny():
    from leandiff.checkpoint import Checkpoint
    from leandiff.models import build_network
    from leandiff.schedule import Schedule

    from conftest import TINY_UNET
    arch = {"type": "diffusers.UNet2DModel", "config": dict(TINY_UNET)}
    torch.manual_seed(0)
    return Checkpoint(net=build_network(arch).eval(), arch=arch, schedule=Schedule("linear"), meta={"dataset": "test"})


@pytest.mark.parametrize("t_groups", [1, 4])
def test_w8a8_fake_quant_close_to_fp32(tiny, t_groups):
    q = Q.fake_quantize(tiny, Q.QuantConfig(w_bits=8, a_bits=8, t_groups=t_groups), CALIB)
    x, t = Q.collect(tiny.denoiser(), image_shape(tiny.arch), Q.CalibConfig(collector="uniform", n=16, steps=4, seed=1))
    with torch.no_grad():
        ref, out = tiny.net(x, t).sample, q.net(x, t).sample
    assert _cos(ref, out) >= 0.99
    assert not torch.equal(ref, out)  # it did quantize
    layers = [m for m in q.net.modules() if isinstance(m, Q.QuantLayer)]
    assert layers and all(m.a_scale.numel() == t_groups for m in layers)
    assert q.meta["runtime"] == {"name": "fake-quant", "args": {}} and "simulation" in q.meta["quant"]["mode"]
    # kept in full precision by default
    assert not isinstance(q.net.conv_in, Q.QuantLayer) and not isinstance(q.net.conv_out, Q.QuantLayer)
    assert not any(isinstance(m, Q.QuantLayer) for m in q.net.time_embedding.modules())
    if t_groups > 1:  # activation range drifts with t: the groups' scales are not all equal
        assert any(len(set(m.a_scale.tolist())) > 1 for m in layers)


def test_w4_worse_than_w8(tiny):
    x, t = Q.collect(tiny.denoiser(), image_shape(tiny.arch), CALIB)
    with torch.no_grad():
        ref = tiny.net(x, t).sample
        errs = {w: (Q.fake_quantize(tiny, Q.QuantConfig(w_bits=w), CALIB).net(x, t).sample - ref).pow(2).mean() for w in (4, 8)}
    assert errs[4] > errs[8]


def test_fake_quant_checkpoint_reloads_from_data(tiny, tmp_path):
    q = Q.fake_quantize(tiny, Q.QuantConfig(w_bits=4, t_groups=2, observer="percentile"), CALIB)
    save_checkpoint(q, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leandiff.json", "model.safetensors"]
    meta = json.loads((tmp_path / "leandiff.json").read_text())
    assert meta["architecture"]["surgery"][-1]["kind"] == "quant"
    assert meta["quant"]["calibration"]["collector"] == "uniform"
    r = load_checkpoint(tmp_path)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 500.0, 900.0])
    with torch.no_grad():
        assert torch.equal(r.net(x, t).sample, q.net(x, t).sample)
    assert r.sampling_defaults()[2] == "fake-quant"


def test_adaround_lowers_the_layer_error_and_stays_on_the_grid(tiny, tmp_path):
    """AdaRound (w_round=adaround) learns each weight's rounding: every layer's output error on the
    calibration inputs is no worse than rounding to nearest (nearest is kept where it would be) and lower over all, the weights it writes are
    exactly on the quantization grid, and the checkpoint reloads to the same outputs."""
    cfg = Q.QuantConfig(w_bits=4, a_bits=8, w_round="adaround", adaround_iters=60)
    q = Q.fake_quantize(tiny, cfg, CALIB)
    rep = q.meta["quant"]["adaround"]
    layers = {n: m for n, m in q.net.named_modules() if isinstance(m, Q.QuantLayer)}
    assert set(rep) == set(layers)
    assert all(r["mse_adaround"] <= r["mse_nearest"] for r in rep.values())
    assert sum(r["mse_adaround"] for r in rep.values()) < sum(r["mse_nearest"] for r in rep.values())
    assert any(r["flipped"] > 0 for r in rep.values())  # some weights round the other way
    for m in layers.values():
        s = m.w_scale.reshape((-1,) + (1,) * (m.inner.weight.ndim - 1))
        k = m.inner.weight / s
        assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 8
    save_checkpoint(q, tmp_path)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10.0, 500.0, 900.0])
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path).net(x, t).sample, q.net(x, t).sample)
    with pytest.raises(UserError, match="w_round"):
        Q.QuantConfig(w_round="stochastic")


def test_bias_correction_removes_the_mean_output_shift(tiny):
    """With bias_correction each quantized layer's mean output over the calibration inputs equals the
    full-precision layer's (per channel), where without it W4 leaves a shift."""
    plain = Q.fake_quantize(tiny, Q.QuantConfig(w_bits=4, a_bits=8), CALIB)
    fixed = Q.fake_quantize(tiny, Q.QuantConfig(w_bits=4, a_bits=8, bias_correction=True), CALIB)
    calib = Q.collect(tiny.denoiser(), image_shape(tiny.arch), CALIB)
    assert fixed.meta["quant"]["bias_correction_max_shift"]

    # the full-precision inputs of every layer (the plain model's inner layers are the original ones)
    layers = {n: m for n, m in plain.net.named_modules() if isinstance(m, Q.QuantLayer) and m.inner.bias is not None}
    inputs = {n: x for n, (m, x) in zip(layers, Q.layer_inputs(plain.net, list(layers.values()), calib).items())}

    def shifts(q):  # per layer: the largest per-channel mean of (quantized layer − original layer)
        out = []
        with torch.no_grad():
            for n, x in inputs.items():
                m, ref = q.net.get_submodule(n), tiny.net.get_submodule(n)
                ch = 1 if isinstance(ref, torch.nn.Conv2d) else -1
                d = (m(x) - ref(x)).movedim(ch, -1).reshape(-1, ref.bias.numel())
                out.append(d.mean(0).abs().max().item())
        return out

    before, after = shifts(plain), shifts(fixed)
    assert max(before) > 1e-3 and max(after) < 1e-5 * max(1.0, max(before))
    with pytest.raises(UserError, match="bias_correction"):
        from leandiff.recipe import parse_recipe
        parse_recipe("quant(runtime=ort-int8,bias_correction=true)")


# --- collectors ------------------------------------------------------------------------------------------------------

def _ddim_grid(ck, steps):
    from leandiff.sample import solver_timesteps
    return solver_timesteps(ck.denoiser(), SampleConfig(solver="ddim", nfe=steps, spacing="leading"))


def test_qdiff_takes_every_cth_step_equally(tiny):
    cfg = Q.CalibConfig(collector="qdiff", n=40, steps=10, interval=3)
    x, t = Q.collect(tiny.denoiser(), image_shape(tiny.arch), cfg)
    grid = _ddim_grid(tiny, 10)
    want = sorted(float(grid[i]) for i in range(0, 10, 3))
    counts = {v: int((t == v).sum()) for v in t.unique().tolist()}
    assert sorted(counts) == want
    assert set(counts.values()) == {40 // 4}
    assert x.shape == (40, 1, 16, 16) and torch.isfinite(x).all()


def test_uniform_spreads_over_the_trajectory(tiny):
    x, t = Q.collect(tiny.denoiser(), image_shape(tiny.arch), Q.CalibConfig(collector="uniform", n=400, steps=4))
    grid = [float(v) for v in _ddim_grid(tiny, 4)]
    counts = torch.tensor([int((t == v).sum()) for v in grid], dtype=torch.float)
    assert counts.sum() == 400
    chi2 = ((counts - 100) ** 2 / 100).sum().item()
    assert chi2 < 16.3  # χ²(3) 0.999 quantile


def test_ndtc_timesteps_follow_floored_clamped_normal():
    T, cfg = 1000, Q.CalibConfig(collector="ndtc", n=20000, mu=0.4, sigma=0.2)
    t = C.ndtc_timesteps(T, cfg, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= T - 1 and torch.equal(t, t.floor())
    mu, sd = 0.4 * T, 0.2 * T
    for k in (100, 250, 400, 550, 700):  # P(floor(t) <= k) = Φ((k + 1 − μ)/σ)
        want = 0.5 * (1 + math.erf((k + 1 - mu) / (sd * math.sqrt(2))))
        assert abs((t <= k).float().mean().item() - want) < 0.015


def test_ndtc_denoises_down_to_its_own_timestep(tiny):
    cfg = Q.CalibConfig(collector="ndtc", n=24, steps=3, mu=0.5, sigma=0.3)
    x, t = Q.collect(tiny.denoiser(), image_shape(tiny.arch), cfg)
    torch.testing.assert_close(t, C.ndtc_timesteps(tiny.schedule.T, cfg, torch.Generator().manual_seed(cfg.seed)))
    assert x.shape == (24, 1, 16, 16) and torch.isfinite(x).all()
    assert len(t.unique()) > 5


def test_unknown_collector_and_real_without_data(tiny):
    with pytest.raises(UserError, match="unknown calibration collector"):
        Q.collect(tiny.denoiser(), (1, 16, 16), Q.CalibConfig(collector="nope"))
    with pytest.raises(UserError, match="needs training images"):
        Q.collect(tiny.denoiser(), (1, 16, 16), Q.CalibConfig(collector="real"))


# --- ONNX Runtime ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ort")
    # A random network's own trajectories explode (|x| ~ 100); noised synthetic images keep x_t in the
    # range the test feeds, so the int8 graph is compared where it was calibrated.
    ck = quantize_ort_int8(tiny, Q.CalibConfig(collector="real", n=64), d, images=_images())
    save_checkpoint(ck, d)
    return d


def _images(seed=0):
    return torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ort_fp32_equals_torch(tiny, tmp_path):
    p = export_onnx(tiny, tmp_path / "m.onnx")
    x, t = torch.randn(5, 1, 16, 16), torch.tensor([0.0, 10.0, 250.5, 600.0, 999.0])
    with torch.no_grad():
        ref = tiny.net(x, t).sample
    torch.testing.assert_close(OrtNetwork(p)(x, t), ref, atol=1e-4, rtol=0)


def test_ort_int8_checkpoint_knows_runtime_and_calibration(int8_dir):
    ck = load_checkpoint(int8_dir)
    assert ck.meta["runtime"] == {"name": "ort-int8", "args": {}} and ck.sampling_defaults()[2] == "ort-int8"
    assert ck.meta["quant"]["calibration"]["collector"] == "real"
    assert (int8_dir / "model.int8.onnx").is_file()
    assert not (int8_dir / "model.onnx").exists()  # the fp32 graph was only the quantizer's input
    assert ck.meta["quant"]["files"] == ["model.int8.onnx"] and "safetensors" in ck.meta["quant"]["files_note"]
    import onnx  # conv_in / conv_out / time MLP stay fp32 (keep_first_last, keep_time): no quantized weight feeds them
    g = onnx.load(str(int8_dir / "model.int8.onnx")).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    kept = [n for n in g.node if n.op_type in ("Conv", "Gemm") and ("conv_out" in n.name or "time_embedding" in n.name)]
    assert kept and not any(len(n.input) > 1 and n.input[1] in dq_out for n in kept)
    assert any(len(n.input) > 1 and n.input[1] in dq_out for n in g.node if n.op_type == "Conv")
    net = __import__("leandiff.runtime", fromlist=["x"]).runtime_network(ck, "ort-int8")
    assert net.path.endswith("model.int8.onnx")
    x, t = Q.collect(ck.denoiser(), (1, 16, 16), Q.CalibConfig(collector="real", n=16, seed=1), _images(1))
    with torch.no_grad():
        assert _cos(net(x, t), ck.net(x, t).sample) > 0.9


def test_ort_int8_honours_the_percentile_observer_on_an_uneven_calibration_set(tiny, tmp_path):
    """observer=percentile reaches ORT's Percentile calibrator (narrower activation ranges than MinMax);
    40 samples do not split into batches of 32, which ORT's histogram calibrators cannot stack."""
    import onnx
    from onnx import numpy_helper

    from leandiff.compress.onnx import quantize_onnx_int8

    fp32 = export_onnx(tiny, tmp_path / "m.onnx")
    calib = Q.collect(tiny.denoiser(), (1, 16, 16), Q.CalibConfig(collector="real", n=40, seed=2), _images(2))
    scales = {}
    for obs in ("minmax", "percentile"):
        g = onnx.load(str(quantize_onnx_int8(fp32, tmp_path / f"{obs}.onnx", calib, observer=obs))).graph
        init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        # activation scales: QuantizeLinear nodes (weights are stored quantized, dequantized only)
        scales[obs] = [float(init[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear"]
    assert len(scales["minmax"]) == len(scales["percentile"]) > 0
    assert all(p <= m * (1 + 1e-6) for p, m in zip(scales["percentile"], scales["minmax"]))
    assert sum(scales["percentile"]) < 0.99 * sum(scales["minmax"])
    from leandiff.recipe import parse_recipe
    for bad in ("observer=mse", "w_observer=percentile"):
        with pytest.raises(UserError, match="ort-int8 calibrates activations"):
            parse_recipe(f"quant(runtime=ort-int8,{bad})")


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_ort_int8_runs_inside_every_solver(int8_dir, solver):
    from leandiff.runtime import runtime_denoiser

    d = runtime_denoiser(load_checkpoint(int8_dir), "ort-int8")
    nfe = nfe_per_step(solver) * 3
    out = sample_all(d, (1, 16, 16), SampleConfig(solver=solver, nfe=nfe, n=3, batch_size=3))
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    assert d.nfe > 0


def test_dynamic_int8_runtime_runs(tiny):
    from leandiff.runtime import runtime_network

    net = runtime_network(tiny, "dynamic-int8")
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 100.0)
    with torch.no_grad():
        assert _cos(net(x, t).sample, tiny.net(x, t).sample) > 0.99


# --- CLI -------------------------------------------------------------------------------------------------------------

def test_cli_export_and_compress_quant(tiny, tmp_path):
    save_checkpoint(tiny, tmp_path / "base")
    r = run_cli("export", str(tmp_path / "base"), "--onnx", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0
    r = run_cli("compress", str(tmp_path / "base"), "--recipe",
                "quant(w=8,a=8,calib=qdiff,runtime=ort-int8,n=16,steps=4,interval=2)", "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    assert "ort-int8" in r.stdout
    ck = load_checkpoint(tmp_path / "q")
    assert ck.meta["runtime"] == {"name": "ort-int8", "args": {}} and (tmp_path / "q" / "model.int8.onnx").is_file()
    r = run_cli("compress", str(tmp_path / "base"), "--recipe", "quant(w=9)", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "w must be 2..8" in r.stderr


def test_calibration_follows_a_students_own_sampler(tiny, tmp_path):
    """quant(steps=0), the default, calibrates on as many steps as the model is deployed with: a
    distilled student's recorded NFE (every one of its few steps), else 50; leading spacing."""
    import copy

    from leandiff.recipe import apply_recipe

    student = copy.deepcopy(tiny)
    student.meta["sampler"] = {"solver": "ddim", "nfe": 4, "spacing": "trailing"}
    q = apply_recipe(student, "quant(calib=qdiff,n=8)", tmp_path / "s")
    assert {k: q.meta["quant"]["calibration"][k] for k in ("steps", "interval", "spacing")} == \
        {"steps": 4, "interval": 1, "spacing": "leading"}
    base = apply_recipe(copy.deepcopy(tiny), "quant(calib=qdiff,n=8)", tmp_path / "b")
    assert {k: base.meta["quant"]["calibration"][k] for k in ("steps", "interval", "spacing")} == \
        {"steps": 50, "interval": 5, "spacing": "leading"}
    with pytest.raises(UserError, match="steps must be >= 0"):
        apply_recipe(copy.deepcopy(tiny), "quant(steps=-1)", tmp_path / "bad")
    with pytest.raises(UserError, match="unknown spacing 'bogus'"):
        apply_recipe(copy.deepcopy(tiny), "quant(spacing=bogus)", tmp_path / "bad2")
    trailing = apply_recipe(copy.deepcopy(student), "quant(calib=qdiff,n=8,spacing=trailing)", tmp_path / "t")
    assert trailing.meta["quant"]["calibration"]["spacing"] == "trailing"


def test_keep_leaves_the_named_modules_out_of_int8_in_every_quantizer(tiny, tmp_path):
    """quant(keep=a+b): fake-quant wraps no layer under a kept module; ORT's int8 graph feeds no quantized
    weight to a Conv/Gemm under it (and still to others); the step records it; a typo is one clear error."""
    import onnx

    from leandiff.compress.onnx import quantize_onnx_int8
    from leandiff.recipe import parse_recipe
    from leandiff.surgery.quant import QuantConfig, check_keep, in_kept, parse_keep, quantizable

    keep = parse_keep("down_blocks.0+mid_block")
    assert keep == ("down_blocks.0", "mid_block")
    names = quantizable(tiny.net, QuantConfig(keep=keep))
    assert names and not any(n.startswith(("down_blocks.0.", "mid_block.")) for n in names)
    assert any(n.startswith("down_blocks.1.") for n in names)
    assert in_kept("/down_blocks.0/resnets.0/conv1/Conv", keep) and not in_kept("/down_blocks.1/resnets.0/conv1/Conv", keep)
    assert not in_kept("__module.net.up_blocks.0/aten::_convolution/Convolution", ("up_blocks.0.resnets.1",))

    fp32 = export_onnx(tiny, tmp_path / "m.onnx")
    calib = Q.collect(tiny.denoiser(), (1, 16, 16), Q.CalibConfig(collector="real", n=16, seed=3), _images(3))
    g = onnx.load(str(quantize_onnx_int8(fp32, tmp_path / "k.onnx", calib, keep=keep))).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in dq_out}
    assert quantized and not any(in_kept(n, keep) for n in quantized)
    assert any("/down_blocks.1/" in n for n in quantized)

    with pytest.raises(UserError, match="keep=down_blocks.7 is no module of this network"):
        check_keep(tiny.net, ("down_blocks.7",))
    with pytest.raises(UserError, match="module paths joined by"):
        parse_recipe("quant(runtime=ort-int8,keep=\"down blocks\")")
    ck = Q.quantize_ort_int8(tiny, Q.CalibConfig(collector="real", n=8), tmp_path / "q", images=_images(), keep=keep)
    assert ck.meta["quant"]["keep"] == ["down_blocks.0", "mid_block"]


def test_keep_auto_search_keeps_blocks_in_order_of_their_error_until_the_tolerance():
    """choose_keep with a synthetic backend whose error is a known sum over the blocks left in int8."""
    from leandiff.compress.sensitivity import candidates, choose_keep

    weight = {"a": 4e-3, "b": 1e-3, "c": 1e-5}

    def build(keep):
        s = sum(w for b, w in weight.items() if b not in keep) ** 0.5
        return lambda x, t: x * (1 + s)

    held = (torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(40))
    keep, trace = choose_keep(build, lambda x, t: x, held, ["c", "b", "a"], tol=1e-4, log=lambda s: None)
    assert keep == ("a", "b")
    assert [tuple(r["keep"]) for r in trace] == [(), ("c",), ("b",), ("a",), ("a", "b")]
    assert trace[0]["rel_error"] == pytest.approx(sum(weight.values()), rel=1e-4)
    assert trace[-1]["rel_error"] == pytest.approx(1e-5, rel=1e-3)
    assert choose_keep(build, lambda x, t: x, held, ["a", "b"], tol=1e-2, log=lambda s: None)[0] == ()  # already met
    assert choose_keep(build, lambda x, t: x, held, ["c", "b", "a"], tol=1e-9, max_keep=1, log=lambda s: None)[0] == ("a",)


def test_keep_auto_on_ort_int8_records_its_search(tiny, tmp_path, monkeypatch):
    from leandiff.compress.sensitivity import candidates
    from leandiff.recipe import parse_recipe

    assert candidates(tiny.net) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1", "mid_block"]
    monkeypatch.setattr(Q, "load_dataset",
                        lambda *a, **k: type("D", (), {"images": _images()})())
    ck = Q.quant_step(tiny, Q.QuantStep(runtime="ort-int8", calib="real", n=16, keep="auto", keep_tol=1e-12, keep_max=1),
                      type("Ctx", (), {"step_dir": tmp_path, "seed": 0, "dataset": "test", "data_dir": None})())
    auto = ck.meta["quant"]["keep_auto"]
    assert len(auto["trace"]) == 1 + 5 and len(ck.meta["quant"]["keep"]) == 1  # nothing, each block; one kept
    best = min(auto["trace"][1:], key=lambda r: r["rel_error"])
    assert ck.meta["quant"]["keep"] == best["keep"] and best["rel_error"] < auto["trace"][0]["rel_error"]
    with pytest.raises(UserError, match="keep=auto measures a real int8 backend"):
        parse_recipe("quant(keep=auto)")
