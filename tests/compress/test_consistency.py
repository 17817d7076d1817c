"""Consistency distillation (Song et al. 2023, Alg. 2) and consistency sampling (Alg. 1)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.compress.consistency import (CDConfig, CDLoss, consistency_distill, discretisation, karras_sigmas,
                                           pseudo_huber, sigma_range, student_parameterization, teacher_step)
from leandiff.denoiser import Denoiser, cm_base_skip, cm_coefficients
from leandiff.compress.training import Training
from leandiff.errors import UserError
from leandiff.schedule import Schedule, alpha_sigma, t_of_edm_sigma
from leandiff.spec import bind

SCHED = Schedule("linear")


pytestmark = pytest.mark.usefixtures("one_thread")


class RandomF(torch.nn.Module):
    def forward(self, x, t):
        return torch.tanh(1.7 * x + 0.002 * t.to(x.dtype).reshape(-1, 1, 1, 1)) + 0.3


@pytest.mark.parametrize("base", [None, "eps", "v", "x0", "edm"])
def test_boundary_condition_holds_exactly_at_sigma_min(base):
    lo, _ = sigma_range(SCHED, CDConfig())
    param = f"cm(sigma_data=0.5,sigma_min={lo!r})" if base is None else student_parameterization(base, lo)
    d = Denoiser(RandomF(), SCHED, param)
    t0 = t_of_edm_sigma(SCHED, torch.tensor([lo])).float()
    assert t0.item() == 0.0  # the schedule's own smallest σ is t = 0
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    a, _ = alpha_sigma(SCHED, t0.double())
    assert torch.allclose(d.x0(x, t0.expand(3)), x / a.item(), atol=1e-12, rtol=0)
    c_skip, c_out, _ = cm_coefficients(torch.tensor(lo, dtype=torch.float64), 0.5, lo)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    assert cm_base_skip(torch.tensor(lo, dtype=torch.float64), lo).item() == 1.0
    # away from the boundary the network matters
    t = torch.full((3,), 500.0)
    assert not torch.allclose(d.x0(x, t), x / alpha_sigma(SCHED, t.double())[0].reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("teacher", ["eps", "v", "x0", "edm(sigma_data=0.25)"])
def test_the_student_starts_as_its_teacher_away_from_the_boundary(teacher):
    """The cm student over its teacher's parameterization, on the teacher's own network: f is exactly
    c_skip·x̄ + (1 − c_skip)·(the teacher's x̂₀), and c_skip is below 1e-4 from a hundred σ_min up."""
    lo, _ = sigma_range(SCHED, CDConfig())
    param = student_parameterization(teacher, lo)
    assert param.endswith(f"base={teacher.split('(')[0]})")
    t_d, s_d = Denoiser(RandomF(), SCHED, teacher), Denoiser(RandomF(), SCHED, param)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for t in (3.0, 50.0, 500.0, 999.0):
        a, sg = alpha_sigma(SCHED, torch.tensor(t, dtype=torch.float64))
        c = cm_base_skip(sg / a, lo).item()
        x0_t, x0_s = t_d.x0(x, t), s_d.x0(x, t)
        assert torch.allclose(x0_s, c * x / a.item() + (1 - c) * x0_t, rtol=0, atol=1e-10)
        assert (c < 1e-4) == ((sg / a).item() > 100 * lo)
        assert torch.equal(t_d.net_input(x, t)[0], s_d.net_input(x, t)[0])  # what the network sees is the teacher's
    # the old App. C reading of a v network (F = out, σ_d = 0.5) is nowhere near it
    raw = Denoiser(RandomF(), SCHED, f"cm(sigma_data=0.5,sigma_min={lo!r})")
    if teacher == "v":
        assert (raw.x0(x, 500.0) - t_d.x0(x, 500.0)).abs().max() > 0.1


def test_a_cm_over_a_base_trains_and_converts_as_its_base():
    from leandiff.denoiser import target_scale
    lo = 0.01
    for base in ("eps", "v", "x0"):
        param = f"cm(sigma_min={lo},base={base})"
        snr = torch.tensor([0.01, 1.0, 100.0])
        assert torch.equal(target_scale(param, snr), target_scale(base, snr))
        x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
        t = torch.tensor([10.0, 700.0])
        assert torch.equal(Denoiser(None, SCHED, param).target(x0, noise, t), Denoiser(None, SCHED, base).target(x0, noise, t))


def test_the_discretisation_reaches_the_samplers_first_timestep():
    cos = Schedule("cosine")
    lo, _, ts = discretisation(cos, CDConfig(n=18, sigma_max=80.0))
    assert len(ts) == 19 and ts[-1].item() == cos.T - 1 and 990 < ts[-2].item() < 992 and ts[0].item() == 0.0
    lo, _, ts = discretisation(SCHED, CDConfig(n=18))  # the schedule's own end: nothing added
    assert len(ts) == 18 and ts[-1].item() == pytest.approx(SCHED.T - 1, abs=1e-3)


def test_discretisation_is_karras_rho():
    s = karras_sigmas(0.002, 80.0, 18, 7.0)
    assert s[0].item() == pytest.approx(0.002) and s[-1].item() == pytest.approx(80.0)
    i = 5
    assert s[i].item() == pytest.approx((0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7)
    assert (s[1:] > s[:-1]).all()


S = 0.4  # data x₀ ~ N(0, S²)


class GaussEps(torch.nn.Module):
    def forward(self, x, t):
        a, sg = alpha_sigma(SCHED, t.double())
        a, sg = a.to(x.dtype).reshape(-1, 1, 1, 1), sg.to(x.dtype).reshape(-1, 1, 1, 1)
        return sg * x / (a ** 2 * S ** 2 + sg ** 2)


def exact_flow(x, t, s):
    """The exact probability-flow map of N(0, S²) data from t to s."""
    a_t, s_t = alpha_sigma(SCHED, t.double())
    a_s, s_s = alpha_sigma(SCHED, s.double())
    r = ((a_s ** 2 * S ** 2 + s_s ** 2) / (a_t ** 2 * S ** 2 + s_t ** 2)).sqrt()
    return x * r.reshape(-1, 1, 1, 1)


def test_cd_target_is_the_exact_ode_step_to_solver_accuracy():
    """The teacher step behind each CD target, on an exact Gaussian denoiser, is the exact ODE map up to
    the solver's error: Heun is second order (halving σ-steps divides the error by ~4), Euler first."""
    teacher = Denoiser(GaussEps(), SCHED, "eps")
    x = torch.randn(256, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lo, hi = sigma_range(SCHED, CDConfig())
    errs = {}
    for solver in ("heun", "euler"):
        for n in (18, 35, 69):
            # one step of the N-point Karras grid (a fixed step in σ^(1/ρ)) ending at σ = 1
            du = (hi ** (1 / 7) - lo ** (1 / 7)) / (n - 1)
            sig = torch.tensor([(1.0 + du) ** 7, 1.0], dtype=torch.float64)
            t_hi, t_lo = (v.expand(256) for v in t_of_edm_sigma(SCHED, sig))
            step = teacher_step(teacher, x, t_hi, t_lo, solver)
            errs[solver, n] = (step - exact_flow(x, t_hi, t_lo)).abs().max().item() / x.abs().max().item()
    assert errs["heun", 18] < 1e-2
    for solver, order in (("heun", 2), ("euler", 1)):
        # error per step ~ h^(order+1): refining by 2 divides it by about 2^(order+1)
        ratio = errs[solver, 35] / errs[solver, 69]
        assert ratio > 2 ** (order + 1) * 0.6, (solver, errs)
    assert errs["heun", 35] < errs["euler", 35]


class ExactConsistency(torch.nn.Module):
    """The exact consistency function of N(0, S²) data as an x₀-predicting network: the probability-flow
    map from t to t = 0, in EDM's variables (x̄ = x/α)."""

    def forward(self, x, t):
        a0 = alpha_sigma(SCHED, torch.zeros(1, dtype=torch.float64))[0].item()
        return exact_flow(x, t, torch.zeros_like(t)) / a0


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_consistency_sampling_of_an_exact_consistency_function_lands_on_the_data_law(nfe):
    """Alg. 1: one step of the exact consistency function is already the data law; re-noising and
    mapping again keeps it (the marginal at every re-noised τ is the exact one)."""
    from leandiff.schedule import timesteps
    from leandiff.solvers import get_solver

    d = Denoiser(ExactConsistency(), SCHED, "x0")
    x_T = torch.randn(20000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = get_solver("consistency")(d, x_T, timesteps(SCHED, nfe, "trailing"), generator=torch.Generator().manual_seed(4))
    assert d.nfe == nfe
    assert abs(out.std().item() / S - 1) < 0.02 and abs(out.mean().item()) < 0.01


def test_pseudo_huber():
    a, b = torch.zeros(2, 3), torch.tensor([[0.0, 0, 0], [3.0, 4.0, 0]])
    assert pseudo_huber(a, b, 1.0).tolist() == pytest.approx([0.0, math.sqrt(26) - 1])


def _tiny_cd(tiny_ckpt, mu=0.0):
    cfg = CDConfig(n=6, mu=mu, solver="euler")
    lo, hi = sigma_range(SCHED, cfg)
    ts = t_of_edm_sigma(SCHED, karras_sigmas(lo, hi, cfg.n)).float()
    teacher = Denoiser(copy.deepcopy(tiny_ckpt.net).eval(), SCHED, "eps")
    net = copy.deepcopy(tiny_ckpt.net).train()
    return cfg, Denoiser(net, SCHED, student_parameterization("eps", lo)), CDLoss(teacher, net, ts, cfg, 256, (lo, hi))


def test_one_cd_update_lowers_the_consistency_loss(tiny_ckpt):
    torch.manual_seed(0)
    _, student, loss = _tiny_cd(tiny_ckpt)
    x0 = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = torch.optim.Adam(student.net.parameters(), lr=2e-4)

    def value():
        return loss(student, x0, torch.Generator().manual_seed(7))

    before = value()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = value()
    assert after.item() < before.item()


def test_the_target_network_follows_the_student_by_mu(tiny_ckpt):
    _, student, loss = _tiny_cd(tiny_ckpt, mu=0.5)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    loss(student, x0, torch.Generator().manual_seed(0))  # first call: θ⁻ = θ₀
    w0 = next(loss.target.parameters()).clone()
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(1.0)
    loss(student, x0, torch.Generator().manual_seed(0))
    assert torch.allclose(next(loss.target.parameters()), w0 + 0.5)
    state = loss.state_dict()
    _, _, fresh = _tiny_cd(tiny_ckpt, mu=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(next(fresh.target.parameters()), next(loss.target.parameters())) and fresh.started


def test_a_cd_student_reloads_and_samples_with_its_own_sampler(tiny_ckpt, image_folder, tmp_path):
    from leandiff.sample import SampleConfig, sample_all

    src = tmp_path / "teacher"
    save_checkpoint(tiny_ckpt, src)
    out = consistency_distill(load_checkpoint(src), tmp_path / "cd", CDConfig(n=6, nfe=2, train=Training(steps=2, batch_size=4)),
                              dataset=f"folder:{image_folder}", progress=False)
    save_checkpoint(out, tmp_path / "student")
    back = load_checkpoint(tmp_path / "student")
    assert back.parameterization.startswith("cm(") and back.parameterization.endswith(f"base={tiny_ckpt.parameterization})")
    assert back.meta["distill"]["method"] == "cd"
    solver, nfe, runtime = back.sampling_defaults()
    assert (solver, nfe, back.default_spacing()) == ("consistency", 2, "trailing")
    x = sample_all(back.denoiser(), (1, 16, 16), SampleConfig(solver, nfe, n=3, spacing=back.default_spacing()))
    assert torch.isfinite(x).all() and back.denoiser().nfe == 0  # sample_all counts on its own denoiser


def test_bad_cd_settings_are_user_errors():
    for kw in ({"n": 1}, {"solver": "rk4"}, {"mu": 1.0}, {"steps": 0}, {"sigma_min": 2.0, "sigma_max": 1.0},
               {"lr": 0.0}, {"ema_decay": 1.0}):
        with pytest.raises(UserError):
            bind(CDConfig, kw, "cd")


def test_the_continuous_grid_pairs_points_one_rho_step_apart_anywhere_on_it():
    """grid=continuous: every pair is one step of the N-point ρ-grid apart (in σ^{1/ρ}), its lower end
    anywhere in [σ_min, σ_{N−1}] rather than on the N points; the extra top pair is kept as it is."""
    cos = Schedule("cosine")
    cfg = CDConfig(n=6, sigma_max=80.0)
    lo, _, ts = discretisation(cos, cfg)
    loss = CDLoss(Denoiser(RandomF(), cos, "v"), RandomF(), ts, cfg, 16, sigma_ends=(lo, 80.0))
    g = torch.Generator().manual_seed(0)
    n = torch.randint(0, len(ts) - 1, (4000,), generator=g)
    t_lo, t_hi = loss._continuous(ts[n], ts[n + 1], n, g)
    top = n == len(ts) - 2
    assert top.any() and torch.equal(t_hi[top], ts[-1].expand(int(top.sum())))

    def root(t):
        a, s = alpha_sigma(cos, t.double())
        return (s / a) ** (1 / 7)

    step = (80.0 ** (1 / 7) - lo ** (1 / 7)) / (cfg.n - 1)
    assert torch.allclose(root(t_hi[~top]) - root(t_lo[~top]), torch.full_like(t_lo[~top], step, dtype=torch.float64),
                          rtol=0, atol=2e-3)
    on_grid = (t_lo[~top, None] - ts[None, :-1]).abs().min(1).values < 1e-3
    assert on_grid.float().mean() < 0.01  # not the N points
    assert t_lo[~top].min() < ts[1] and t_hi[~top].max() > ts[-3]  # and the whole grid is covered
