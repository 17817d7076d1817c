"""OpenVINO runtimes (leandiff.compress.openvino): fp32 equals torch, the NNCF int8 model runs inside every
solver, a quant(runtime=openvino-int8) checkpoint reloads and samples with its runtime by default, and a
missing install is one clear line. Skipped where the optional extra (openvino, nncf) is not installed,
except the missing-install tests, which simulate the absence."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from leandiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from leandiff.compress.calibration import CalibConfig, collect
from leandiff.errors import UserError
from leandiff.models import build_network
from leandiff.runtime import get_runtime, runtime_denoiser, runtime_network
from leandiff.sample import SampleConfig, sample_all
from leandiff.schedule import Schedule
from leandiff.solvers import SOLVERS, nfe_per_step

from conftest import ROOT, TINY_UNET

pytestmark = pytest.mark.usefixtures("one_thread")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


HAVE_OV = _importable("openvino") and _importable("nncf")
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="optional extra leandiff[openvino] not installed")


@pytest.fixture(scope="module")
def tiny():
    arch = {"type": "diffusers.UNet2DModel", "config": dict(TINY_UNET)}
    torch.manual_seed(0)
    return Checkpoint(net=build_network(arch).eval(), arch=arch, schedule=Schedule("linear"), meta={"dataset": "test"})


def _images(seed=0):
    return torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.fixture(scope="module")
def int8_dir(tiny, tmp_path_factory):
    from leandiff.compress.openvino import quantize_openvino_int8

    d = tmp_path_factory.mktemp("ov")
    # noised synthetic images keep x_t in the range a random network is fed below (its own trajectories explode)
    save_checkpoint(quantize_openvino_int8(tiny, CalibConfig(collector="real", n=32), d, images=_images()), d)
    return d


@needs_ov
def test_openvino_fp32_equals_torch(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr("leandiff.compress.artifacts.CACHE", tmp_path)  # the cache the conversion writes into
    x, t = torch.randn(5, 1, 16, 16), torch.tensor([0.0, 10.0, 250.5, 600.0, 999.0])
    net = runtime_network(tiny, "openvino")
    with torch.no_grad():
        ref = tiny.net(x, t).sample
    torch.testing.assert_close(net(x, t), ref, atol=1e-4, rtol=0)
    assert net.path.startswith(str(tmp_path)) and net.path.endswith("openvino.gn-reduce.xml")
    assert runtime_network(tiny, "openvino").path == net.path  # converted once, then read from the cache
    torch.testing.assert_close(net(x[:3], t[:3]), ref[:3], atol=1e-4, rtol=0)
    assert len(net.requests) == 2  # static shapes: one compiled model per input shape
    dynamic = runtime_network(tiny, "openvino(static=false)")
    torch.testing.assert_close(dynamic(x, t), ref, atol=1e-4, rtol=0)
    dynamic(x[:3], t[:3])
    assert list(dynamic.requests) == [None]  # one dynamic-batch model for every shape
    from_onnx = runtime_network(tiny, "openvino(source=onnx)")  # converted from the ONNX export instead
    torch.testing.assert_close(from_onnx(x, t), ref, atol=1e-4, rtol=0)
    assert from_onnx.path != net.path


@needs_ov
def test_openvino_leaves_the_calling_thread_unpinned(tiny, monkeypatch, tmp_path):
    # OpenVINO pins its threads by default on Linux; with one thread that pinned the caller to core 0
    monkeypatch.setattr("leandiff.compress.artifacts.CACHE", tmp_path)
    net = runtime_network(tiny, "openvino")
    before = os.sched_getaffinity(0)
    net(torch.randn(2, 1, 16, 16), 10.0)
    assert net.requests[(2, 1, 16, 16)].get_compiled_model().get_property("ENABLE_CPU_PINNING") is False
    assert os.sched_getaffinity(0) == before


@needs_ov
def test_openvino_bf16_is_close_where_the_cpu_has_it(tiny, monkeypatch, tmp_path):
    from leandiff.compress.openvino import has_bf16

    monkeypatch.setattr("leandiff.compress.artifacts.CACHE", tmp_path)
    if not has_bf16():
        with pytest.raises(UserError, match="no bf16"):
            runtime_network(tiny, "openvino-bf16")
        return
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([10.0, 250.0, 600.0, 999.0])
    with torch.no_grad():
        assert _cos(runtime_network(tiny, "openvino-bf16")(x, t), tiny.net(x, t).sample) > 0.999


@needs_ov
def test_int8_model_is_quantized_except_the_kept_layers_and_close_to_fp32(int8_dir):
    import openvino as ov

    ck = load_checkpoint(int8_dir)
    assert ck.meta["runtime"] == {"name": "openvino-int8", "args": {}} and ck.sampling_defaults()[2] == "openvino-int8"
    model = ov.Core().read_model(str(int8_dir / "openvino.int8.xml"))
    ops = list(model.get_ops())
    assert any(op.get_type_name() == "FakeQuantize" for op in ops)  # real int8: OpenVINO runs these in u8/i8

    def quantized_input(op):
        return op.input_value(0).get_node().get_type_name() == "FakeQuantize"

    convs = [op for op in ops if op.get_type_name() == "Convolution"]
    assert any(quantized_input(op) for op in convs)
    kept = [op for op in convs if re.search(r"[./]conv_(in|out)[./]", op.get_friendly_name())]
    assert len(kept) == 2 and not any(quantized_input(op) for op in kept)  # keep_first_last
    net = runtime_network(ck, "openvino-int8")
    assert net.path.endswith("openvino.int8.xml")
    x, t = collect(ck.denoiser(), (1, 16, 16), CalibConfig(collector="real", n=16, seed=1), _images(1))
    with torch.no_grad():
        assert _cos(net(x, t), ck.net(x, t).sample) > 0.9


@needs_ov
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_openvino_int8_runs_inside_every_solver(int8_dir, solver):
    d = runtime_denoiser(load_checkpoint(int8_dir), "openvino-int8")
    out = sample_all(d, (1, 16, 16), SampleConfig(solver=solver, nfe=nfe_per_step(solver) * 3, n=3, batch_size=3))
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all() and d.nfe > 0


@needs_ov
def test_quant_recipe_checkpoint_reloads_and_samples_with_its_runtime_by_default(tiny, tmp_path):
    from leandiff.recipe import apply_recipe

    apply_recipe(tiny, "quant(runtime=openvino-int8,calib=qdiff,n=8,steps=4,interval=2)", tmp_path / "q",
                 progress=False, log=lambda s: None)
    ck = load_checkpoint(tmp_path / "q")
    solver, nfe, runtime = ck.sampling_defaults()
    assert runtime == "openvino-int8" and ck.meta["quant"]["calibration"]["collector"] == "qdiff"
    assert get_runtime(runtime)(ck).path == str(tmp_path / "q" / "openvino.int8.xml")  # its own side file
    out = sample_all(runtime_denoiser(ck, runtime), (1, 16, 16), SampleConfig(solver="ddim", nfe=3, n=2))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


@needs_ov
def test_own_int8_model_is_not_silently_swapped_for_other_options(int8_dir):
    ck = load_checkpoint(int8_dir)  # built with the defaults: scope gemm, GroupNorm reduce
    assert get_runtime("openvino-int8(calib=uniform,groupnorm=reduce)")(ck).path == str(int8_dir / "openvino.int8.xml")
    for asked in ("groupnorm=ov", "scope=nncf"):
        with pytest.raises(UserError, match=f"openvino-int8\\({asked}\\): this checkpoint has its own int8 model"):
            get_runtime(f"openvino-int8(calib=uniform,{asked})")(ck)


def test_openvino_int8_spec_checks_its_arguments():
    with pytest.raises(UserError, match="unknown calib"):
        get_runtime("openvino-int8(calib=nope)")
    with pytest.raises(UserError, match="source must be one of torch, onnx"):
        get_runtime("openvino(source=tf)")
    from leandiff.recipe import parse_recipe

    for bad in ("w=4", "t_groups=2", "observer=mse", "per_channel=false"):
        with pytest.raises(UserError, match="openvino-int8"):
            parse_recipe(f"quant(runtime=openvino-int8,{bad})")


@needs_ov
def test_openvino_int8_without_an_int8_model_is_an_error(tiny):
    with pytest.raises(UserError, match="no int8 model"):
        get_runtime("openvino-int8")(tiny)


@pytest.mark.parametrize("module", ["openvino", "nncf"])
def test_a_missing_install_is_one_line_naming_the_extra(tiny, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import openvino` raises ImportError, as when absent
    from leandiff.recipe import parse_recipe

    with pytest.raises(UserError, match=rf"needs the ({module}|openvino) package.*pip install 'leandiff\[openvino\]'"):
        parse_recipe("quant(runtime=openvino-int8)")  # refused before any step runs
    if module == "openvino":
        for spec in ("openvino", "openvino-bf16", "openvino-int8(calib=qdiff)"):
            with pytest.raises(UserError, match=r"pip install 'leandiff\[openvino\]'"):
                get_runtime(spec)(tiny)


def test_cli_without_openvino_is_one_line_and_exit_2(tiny, tmp_path):
    save_checkpoint(tiny, tmp_path / "m")
    code = ("import sys; sys.modules['openvino'] = None; from leandiff.cli import main; "
            f"main(['sample', {str(tmp_path / 'm')!r}, '--runtime', 'openvino', '--nfe', '2', '-n', '1', "
            f"'--out', {str(tmp_path / 's')!r}])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'leandiff[openvino]'" in lines[0] and "Traceback" not in p.stderr


@needs_ov
def test_keep_leaves_the_named_modules_out_of_nncf_int8(tiny, tmp_path):
    import openvino as ov

    from leandiff.compress.openvino import quantize_openvino_int8
    from leandiff.surgery.quant import in_kept

    ck = quantize_openvino_int8(tiny, CalibConfig(collector="real", n=16), tmp_path, images=_images(), keep=("down_blocks.0",))
    assert ck.meta["quant"]["keep"] == ["down_blocks.0"]
    convs = [op for op in ov.Core().read_model(str(tmp_path / "openvino.int8.xml")).get_ops() if op.get_type_name() == "Convolution"]
    quantized = [op.get_friendly_name() for op in convs if op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    assert quantized and not any(in_kept(n, ("down_blocks.0",)) for n in quantized)
    assert any(in_kept(n, ("down_blocks.1",)) for n in quantized)


def _activation_quantizer_users(xml) -> set[str]:
    """The op types fed by the model's activation FakeQuantize nodes (weights' quantizers excluded)."""
    import openvino as ov

    users = set()
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() not in ("Constant", "Convert"):
            users |= {t.get_node().get_type_name() for o in op.outputs() for t in o.get_target_inputs()}
    return users


@needs_ov
def test_scope_gemm_quantizes_only_gemm_inputs_and_nncf_scope_more(tiny, tmp_path):
    from leandiff.compress.openvino import quantize_openvino_int8

    cc = CalibConfig(collector="real", n=16)
    gemm = quantize_openvino_int8(tiny, cc, tmp_path / "g", images=_images())
    nncf = quantize_openvino_int8(tiny, cc, tmp_path / "n", images=_images(), scope="nncf", bias_correction=True)
    assert gemm.meta["quant"]["scope"] == "gemm" and nncf.meta["quant"]["scope"] == "nncf"
    assert gemm.meta["quant"]["bias_correction"] is False and nncf.meta["quant"]["bias_correction"]
    g, n = _activation_quantizer_users(tmp_path / "g" / "openvino.int8.xml"), _activation_quantizer_users(tmp_path / "n" / "openvino.int8.xml")
    assert "Convolution" in g and g <= {"Convolution", "MatMul"}
    assert n - {"Convolution", "MatMul"}  # NNCF's own placement also quantizes the residual adds / norms


@needs_ov
def test_scope_is_part_of_the_cached_on_the_fly_model(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr("leandiff.compress.artifacts.CACHE", tmp_path)
    a = get_runtime("openvino-int8(calib=uniform)")(tiny).path
    b = get_runtime("openvino-int8(calib=uniform,scope=nncf)")(tiny).path
    assert a != b and a.endswith("openvino.int8-gemm.gn-reduce.xml") and b.endswith("openvino.int8-nncf.gn-reduce.xml")


def test_scope_is_checked():
    from leandiff.recipe import parse_recipe

    with pytest.raises(UserError, match="scope must be one of gemm, nncf"):
        get_runtime("openvino-int8(calib=uniform,scope=all)")
    with pytest.raises(UserError, match="scope must be one of gemm, nncf"):
        parse_recipe("quant(runtime=fake,scope=everything)")
    with pytest.raises(UserError, match="needs runtime=openvino-int8"):
        parse_recipe("quant(runtime=ort-int8,scope=nncf)")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 8, 5, 7), (2, 12, 9)])
def test_reduced_groupnorm_equals_torch_groupnorm(affine, shape):
    from leandiff.compress.openvino import ReducedGroupNorm

    gn = torch.nn.GroupNorm(4, shape[1], eps=1e-5, affine=affine)
    if affine:
        with torch.no_grad():
            gn.weight.normal_(), gn.bias.normal_()
    x = torch.randn(*shape) * 3 + 5  # a mean far from 0: the centred variance keeps it exact
    with torch.no_grad():
        torch.testing.assert_close(ReducedGroupNorm(gn)(x), gn(x), atol=1e-5, rtol=1e-5)


def test_reduced_groupnorm_swaps_every_groupnorm_and_shares_parameters(tiny):
    import copy

    from leandiff.compress.openvino import ReducedGroupNorm, reduced_groupnorm

    net = copy.deepcopy(tiny.net)
    weights = [id(m.weight) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    net = reduced_groupnorm(net)
    assert weights and not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert [id(m.weight) for m in net.modules() if isinstance(m, ReducedGroupNorm)] == weights  # shared, not copied
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t).sample, tiny.net(x, t).sample, atol=1e-5, rtol=1e-5)


@needs_ov
def test_groupnorm_reduce_has_no_groupnormalization_op_and_ov_keeps_it(tiny, monkeypatch, tmp_path):
    from leandiff.compress.openvino import convert

    def types(model):
        return {op.get_type_name() for op in model.get_ops()}

    assert "GroupNormalization" not in types(convert(tiny)) and "ReduceMean" in types(convert(tiny))
    assert "GroupNormalization" in types(convert(tiny, groupnorm="ov"))
    monkeypatch.setattr("leandiff.compress.artifacts.CACHE", tmp_path)
    a, b = runtime_network(tiny, "openvino"), runtime_network(tiny, "openvino(groupnorm=ov)")
    assert a.path != b.path and a.path.endswith("openvino.gn-reduce.xml") and b.path.endswith("openvino.gn-ov.xml")
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.0, 400.0, 999.0])
    torch.testing.assert_close(a(x, t), b(x, t), atol=1e-4, rtol=0)
    q = quantize_openvino_int8_meta(tiny, tmp_path / "q", groupnorm="ov")
    assert q.meta["quant"]["groupnorm"] == "ov"


def quantize_openvino_int8_meta(tiny, out, **kw):
    from leandiff.compress.openvino import quantize_openvino_int8

    return quantize_openvino_int8(tiny, CalibConfig(collector="real", n=8), out, images=_images(), **kw)


def test_groupnorm_is_checked():
    from leandiff.recipe import parse_recipe

    with pytest.raises(UserError, match="groupnorm must be one of reduce, ov"):
        get_runtime("openvino(groupnorm=mvn)")
    with pytest.raises(UserError, match="groupnorm must be one of reduce, ov"):
        get_runtime("openvino-int8(calib=uniform,groupnorm=x)")
    with pytest.raises(UserError, match="needs runtime=openvino-int8"):
        parse_recipe("quant(runtime=ort-int8,groupnorm=ov)")
