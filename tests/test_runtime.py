"""The runtime registry: every runtime is described and runs inside a solver close to eager; runtimes are
specs in the recipe grammar (old names still read); a missing int8 model is an error."""
import pytest
import torch

from conftest import saved_mnist_unet
from leandiff.errors import UserError
from leandiff.runtime import RUNTIMES, get_runtime, parse_runtime, runtime_denoiser, runtime_label
from leandiff.sample import SampleConfig, sample_all

# how close each runtime's samples stay to eager fp32's (mean |difference| over a 4-step DDIM run) (fake-quant is a simulation of a quantized model:
# on an unquantized checkpoint it is refused; ORT needs an ONNX export, covered by test_quant; OpenVINO is
# an optional extra, covered by tests/compress/test_openvino.py)
TOLERANCE = {"eager": 1e-6, "bf16": 0.05, "compile": 1e-4, "dynamic-int8": 0.05, "cache": None, "channels-last": 1e-5,
             "compile-bf16": 0.05}
GPU_ONLY = {"fp16"}  # fp16 autocast: on GPUs only (tests/test_device.py, marked gpu)


def test_every_runtime_is_described_and_has_a_tolerance_or_a_reason():
    for name, spec in RUNTIMES.items():
        assert spec.description, name
    assert set(TOLERANCE) | {"ort", "ort-int8", "fake-quant", "openvino", "openvino-bf16", "openvino-int8"} | GPU_ONLY == set(RUNTIMES)


@pytest.mark.parametrize("name", ["eager", "bf16", "dynamic-int8", "cache", "channels-last"])
def test_runtime_runs_inside_a_solver_close_to_eager(tiny_ckpt, name):
    cfg = SampleConfig("ddim", 4, n=2, seed=0)
    ref = sample_all(runtime_denoiser(tiny_ckpt, "eager"), (1, 16, 16), cfg)
    x = sample_all(runtime_denoiser(tiny_ckpt, name), (1, 16, 16), cfg)
    assert torch.isfinite(x).all() and x.shape == ref.shape
    if TOLERANCE[name] is not None:
        assert (x - ref).abs().mean() <= TOLERANCE[name]


def test_runtime_specs_parse_with_the_recipe_grammar_and_old_names_still_read():
    assert runtime_label("cache-nu-bf16:3") == runtime_label("cache(interval=3,schedule=nonuniform,bf16=true)") \
        == "cache(schedule=nonuniform,bf16=true)"
    assert runtime_label("cache:12") == "cache(interval=12)"  # no cap: a parameter, not a list of names
    assert runtime_label({"name": "cache", "args": {"interval": 2}}) == "cache(interval=2)"
    assert runtime_label("eager") == "eager" and runtime_label("ort-int8(calib=qdiff)") == "ort-int8(calib=qdiff)"
    name, cfg = parse_runtime("cache(interval=5)")
    assert name == "cache" and cfg.interval == 5 and "every 5 calls" in get_runtime("cache(interval=5)").description


@pytest.mark.parametrize("bad, says", [("nope", "unknown runtime 'nope'"), ("cache(k=2)", "unknown argument 'k'"),
                                       ("cache(interval=0)", "interval must be"), ("eager(x=1)", "unknown argument"),
                                       ("ort-int8(calib=foo)", "unknown calib"), ("cache(", "expected NAME")])
def test_a_bad_runtime_spec_is_one_line(bad, says):
    with pytest.raises(UserError, match=says):
        get_runtime(bad)


def test_ort_int8_without_an_int8_model_is_an_error_not_a_silent_calibration(tiny_ckpt):
    with pytest.raises(UserError, match="no int8 model"):
        get_runtime("ort-int8")(tiny_ckpt)


# ------------------------------------------------------------ every runtime inside every solver ---------------

# The spec each runtime is run with here: ORT/OpenVINO int8 calibrated on the fly (the tiny checkpoint has no int8
# model of its own); fake-quant runs the checkpoint that quant(runtime=fake) made.
CONTRACT_SPEC = {"ort-int8": "ort-int8(calib=uniform)", "openvino-int8": "openvino-int8(calib=uniform)"}
# the int8 runtimes' samples are compared with eager's only loosely: a random network's int8 error is large
INT8_TOLERANCE = 0.5


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def runtime_ckpts(tmp_path_factory):
    """(plain tiny checkpoint saved to disk, its fake-quant twin); the ORT/OpenVINO cache in a temp directory."""
    from leandiff.checkpoint import load_checkpoint
    from leandiff.compress import artifacts
    from leandiff.recipe import apply_recipe

    d = tmp_path_factory.mktemp("rt")
    saved_mnist_unet(d / "plain", sample_size=16, timesteps=100)
    plain = load_checkpoint(d / "plain")
    fake = apply_recipe(load_checkpoint(d / "plain"), "quant(n=8,steps=2,calib=uniform)", d / "fake", progress=False,
                        log=lambda s: None)
    old, artifacts.CACHE = artifacts.CACHE, d / "cache"
    yield plain, fake
    artifacts.CACHE = old


@pytest.mark.parametrize("name", sorted(set(RUNTIMES) - GPU_ONLY))
def test_every_runtime_runs_inside_every_solver(runtime_ckpts, name):
    """Every CPU runtime drives every solver (3 steps, same seed) to finite samples of the right shape, close to
    eager fp32's where the runtime computes the same function (a tolerance above); a runtime of an optional extra
    is skipped where the extra is not installed."""
    from leandiff.solvers import MODEL_SPECIFIC, SOLVERS, nfe_per_step

    if name.startswith("openvino") and not (_have("openvino") and (name != "openvino-int8" or _have("nncf"))):
        pytest.skip("optional extra leandiff[openvino] not installed")
    if name.startswith("ort") and not _have("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    plain, fake = runtime_ckpts
    ck = fake if name == "fake-quant" else plain
    spec = CONTRACT_SPEC.get(name, name)
    if name == "openvino-bf16":
        from leandiff.compress.openvino import has_bf16

        if not has_bf16():
            pytest.skip("this CPU has no bf16 kernels in OpenVINO (test_openvino checks the error line)")
    den = runtime_denoiser(ck, spec)
    ref_den = runtime_denoiser(ck, "eager")
    tol = TOLERANCE.get(name, INT8_TOLERANCE if "int8" in name else 0.05)
    for solver in sorted(set(SOLVERS) - set(MODEL_SPECIFIC)):
        cfg = SampleConfig(solver, 3 * nfe_per_step(solver), n=2, seed=0)
        x = sample_all(den, (1, 16, 16), cfg)
        assert torch.isfinite(x).all() and x.shape == (2, 1, 16, 16), f"{spec} in {solver}"
        if tol is not None:
            ref = sample_all(ref_den, (1, 16, 16), cfg)
            assert (x - ref).abs().mean() <= tol, f"{spec} in {solver}: mean |x - eager| {(x - ref).abs().mean():.4f}"
