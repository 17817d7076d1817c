import math

import pytest
import torch

from leandiff.errors import UserError
from leandiff.schedule import Schedule, alpha_sigma, alphas_cumprod, betas, log_snr, q_sample, timesteps


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_matches_schedule_moments(kind):
    """x_t | x_0 ~ N(α_t x_0, σ_t² I): check mean and variance on 10k draws."""
    s = Schedule(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((10_000, 1), 0.7, dtype=torch.float64)
    ac = alphas_cumprod(s)
    for t in (0, 10, 250, 500, 999):
        xt = q_sample(s, x0, torch.full((10_000,), t), torch.randn(x0.shape, generator=g, dtype=torch.float64))
        mean, var = 0.7 * ac[t].sqrt(), 1 - ac[t]
        assert abs(xt.mean().item() - mean) < 4 * math.sqrt(var / 10_000) + 1e-12
        assert abs(xt.var().item() - var) < 0.05 * var + 1e-9


def test_linear_schedule_is_ddpm():
    s = Schedule("linear")
    b = betas(s)
    assert len(b) == 1000 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert alphas_cumprod(s)[-1] < 1e-4  # x_T is essentially pure noise


def test_cosine_schedule_is_nichol_dhariwal():
    s = Schedule("cosine")
    ac = alphas_cumprod(s)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert ac[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)


def test_alpha_sigma_fractional_and_clean():
    s = Schedule("linear")
    a, sg = alpha_sigma(s, torch.tensor([-1.0, 0.0, 0.5, 1.0, 999.0]))
    assert a[0] == 1 and sg[0] == 0
    assert torch.allclose(a ** 2 + sg ** 2, torch.ones(5, dtype=torch.float64))
    lam = log_snr(s, torch.tensor([0.0, 0.5, 1.0]))
    assert lam[1] == pytest.approx(((lam[0] + lam[2]) / 2).item())  # λ is linear between steps
    assert a[1] ** 2 == pytest.approx(alphas_cumprod(s)[0].item())
    with pytest.raises(UserError):
        log_snr(s, 1000.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "quadratic", "logsnr", "karras"])
@pytest.mark.parametrize("steps", [1, 10, 50, 1000])
def test_timestep_spacings(spacing, steps):
    s = Schedule("linear")
    ts = timesteps(s, steps, spacing)
    assert len(ts) == steps and (ts[:-1] > ts[1:]).all()
    assert 0 <= ts.min() and ts.max() <= 999


def test_known_spacings():
    s = Schedule("linear")
    assert timesteps(s, 4, "leading").tolist() == [750, 500, 250, 0]
    assert timesteps(s, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert timesteps(s, 1000, "leading").tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_karras_spacing_follows_edm_formula(kind):
    """EDM eq. 5 with ρ = 7 between min(80, σ(T-1)) and max(0.002, σ(0)), σ = σ_t/α_t: each step is the
    integer t whose σ is nearest (in log) to the formula's; the ends are those nearest to σ_max and σ_min."""
    s, n = Schedule(kind), 12
    ts = timesteps(s, n, "karras")
    sig_all = torch.exp(-log_snr(s, torch.arange(s.T)) / 2)
    hi, lo = min(80.0, sig_all[-1].item()), max(0.002, sig_all[0].item())
    want = [(hi ** (1 / 7) + i / (n - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7 for i in range(n)]
    for t, w in zip(ts.tolist(), want):
        assert (sig_all.log() - math.log(w)).abs().argmin().item() == t
    assert sig_all[ts[0]].item() == pytest.approx(80.0, rel=0.05) and ts[-1] == 0


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5])
def test_bad_step_counts_fail_loudly(bad):
    with pytest.raises(UserError):
        timesteps(Schedule("linear"), bad)
