"""Feature caching (DeepCache-style) for UNet2DModel."""
import pytest
import torch

from leandiff.compress.cache import CacheConfig, CachedUNet, cache_macs, gap, macs_spent
from leandiff.denoiser import call_network
from leandiff.errors import UserError


def _x(n=2):
    torch.manual_seed(1)
    return torch.randn(n, 1, 16, 16)


def test_full_path_equals_network(tiny_ckpt):
    c = CachedUNet(tiny_ckpt.net, CacheConfig(1))
    x, t = _x(), torch.tensor([700, 700])
    with torch.no_grad():
        assert torch.allclose(c(x, t), call_network(tiny_ckpt.net, x, t), atol=1e-5)


def test_interval_one_equals_network_over_a_run(tiny_ckpt):
    c = CachedUNet(tiny_ckpt.net, CacheConfig(1))
    x = _x()
    with torch.no_grad():
        for tv in (900, 600, 300, 10):
            t = torch.full((2,), tv)
            assert torch.allclose(c(x, t), call_network(tiny_ckpt.net, x, t), atol=1e-5)
    assert c.calls == ["full"] * 4


def test_shallow_with_fresh_cache_equals_full(tiny_ckpt):
    c = CachedUNet(tiny_ckpt.net, CacheConfig(3))
    x, t = _x(), torch.tensor([400, 400])
    with torch.no_grad():
        out, f_up = c.full(x, t)
        assert torch.allclose(c.shallow(x, t, f_up), out, atol=1e-5)


def test_uniform_schedule_and_reset_on_new_run(tiny_ckpt):
    c = CachedUNet(tiny_ckpt.net, CacheConfig(3))
    x = _x()
    with torch.no_grad():
        for tv in (999, 800, 600, 400, 200):
            c(x, torch.full((2,), tv))
        assert c.calls == ["full", "shallow", "shallow", "full", "shallow"]
        c(x, torch.full((2,), 999))  # t goes up: a new sampling run starts with a full evaluation
    assert c.calls[-1] == "full"
    # the shallow output differs from the full network (features are reused, not recomputed)
    c.reset()
    with torch.no_grad():
        c(x, torch.full((2,), 999))
        a = c(x, torch.full((2,), 100))
    assert not torch.allclose(a, call_network(tiny_ckpt.net, x, torch.full((2,), 100)), atol=1e-4)


def test_nonuniform_gap():
    cfg = CacheConfig(4, "nonuniform", 1000)
    assert gap(cfg, 500) == 2 and gap(cfg, 900) == 5 and gap(CacheConfig(4), 500) == 4


def test_macs_shallow_cheaper(tiny_ckpt):
    c = CachedUNet(tiny_ckpt.net, CacheConfig(2))
    m = cache_macs(c, (1, 16, 16))
    assert 0 < m["macs_shallow"] < m["macs_full"]
    with torch.no_grad():
        for tv in (900, 700, 500, 300):
            c(_x(1), torch.full((1,), tv))
    s = macs_spent(c, (1, 16, 16))
    assert s["macs_per_image_total"] == 2 * m["macs_full"] + 2 * m["macs_shallow"]


def test_bad_config(tiny_ckpt):
    with pytest.raises(UserError):
        CachedUNet(tiny_ckpt.net, CacheConfig(0))
    with pytest.raises(UserError):
        CachedUNet(tiny_ckpt.net, CacheConfig(2, "zigzag"))


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp-2m-sde"])
def test_every_solver_runs_with_cache_runtime(tiny_ckpt, solver):
    from leandiff.runtime import get_runtime
    from leandiff.sample import SampleConfig, sample_all
    from leandiff.denoiser import Denoiser

    from leandiff.solvers import SOLVERS
    if solver not in SOLVERS:
        pytest.skip(f"{solver} not registered")
    net = get_runtime("cache:2")(tiny_ckpt)
    d = Denoiser(net, tiny_ckpt.schedule, tiny_ckpt.parameterization)
    x = sample_all(d, (1, 16, 16), SampleConfig(solver=solver, nfe=6, n=4, seed=0, batch_size=4))
    assert torch.isfinite(x).all()
    assert "shallow" in net.calls and "full" in net.calls


def test_cache_recipe_step_sets_runtime(tiny_ckpt, tmp_path):
    from leandiff.recipe import apply_recipe

    out = apply_recipe(tiny_ckpt, "cache(interval=3, schedule=nonuniform)", tmp_path / "c")
    assert out.meta["runtime"] == {"name": "cache", "args": {"interval": 3, "schedule": "nonuniform", "bf16": False}}
    from leandiff.runtime import runtime_label

    assert runtime_label(out.sampling_defaults()[2]) == runtime_label("cache-nu:3") == "cache(schedule=nonuniform)"
