"""Contract tests for every registered solver (and a few diffusers peers through the adapter).

The workhorse is Gaussian data x₀ ~ N(μ, diag s²): x_t = α x₀ + σ ε is N(α μ, α²s² + σ²), its exact
denoiser is ε*(x, t) = σ (x − α μ) / (α² s² + σ²), and its probability-flow ODE is solved in closed form,
x_t = α_t μ + sqrt(α_t² s² + σ_t²) · z with z = (x_T − α_T μ)/sqrt(α_T² s² + σ_T²) fixed along the flow. The diffusers comparisons use a random tiny
``UNet2DModel``. Everything is small: the whole file runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from leandiff.denoiser import Denoiser
from leandiff.errors import UserError
from leandiff.sample import SampleConfig, SampleStats, sample_all
from leandiff.schedule import SPACINGS, Schedule, alpha_sigma, log_snr, timesteps as make_timesteps
from leandiff.solvers import DETERMINISTIC, GENERIC, SOLVERS, get_solver, nfe_per_step

SCHED = Schedule("linear")
PEERS = ("diffusers:DPMSolverMultistepScheduler", "diffusers:EulerDiscreteScheduler")


pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianNet(torch.nn.Module):
    """The exact network for x₀ ~ N(μ, diag s²) in any parameterization (μ, s: scalars or per-pixel tensors)."""

    def __init__(self, schedule: Schedule, s, parameterization: str = "eps", mu=0.0):
        super().__init__()
        self.schedule, self.s, self.parameterization, self.mu = schedule, s, parameterization, mu

    def forward(self, x, t):
        a, sg = alpha_sigma(self.schedule, t.double())
        shape = (-1,) + (1,) * (x.ndim - 1)
        a, sg = a.to(x.dtype).reshape(shape), sg.to(x.dtype).reshape(shape)
        var = a ** 2 * self.s ** 2 + sg ** 2
        centred = x - a * self.mu
        eps, x0 = sg * centred / var, self.mu + a * self.s ** 2 * centred / var
        return {"eps": eps, "x0": x0, "v": a * eps - sg * x0}[self.parameterization]


def gaussian_denoiser(s, parameterization: str = "eps", mu=0.0, schedule: Schedule = SCHED) -> Denoiser:
    return Denoiser(GaussianNet(schedule, s, parameterization, mu), schedule, parameterization)


def lambda_uniform(n: int, t_hi: float = 999, t_lo: float = 0) -> torch.Tensor:
    """n fractional timesteps uniform in log-SNR from t_hi down to t_lo (a smooth grid to refine)."""
    lam = log_snr(SCHED, torch.arange(SCHED.T)).numpy()
    target = np.linspace(lam[int(t_hi)], lam[int(t_lo)], n)
    return torch.tensor(np.interp(target, lam[::-1], np.arange(SCHED.T, dtype=np.float64)[::-1]))


def x_T(shape=(1024, 1, 4, 4), seed=1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- the Gaussian contract ---------

@pytest.mark.parametrize("name", list(GENERIC) + list(PEERS))
def test_gaussian_data_std(name):
    """With enough steps every solver lands on the data distribution: sample std within 2% of s."""
    s = 0.5
    steps = 250 if name.startswith("diffusers:") else SCHED.T  # every integer step
    ts = make_timesteps(SCHED, steps, "linspace")
    out = get_solver(name)(gaussian_denoiser(s), x_T(), ts, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out).all()
    assert abs(out.std().item() / s - 1) < 0.02, f"{name}: std {out.std().item():.4f} vs s = {s}"


def _ode_errors(name: str, ns, s: float = 0.3) -> list[float]:
    """RMS error at the end against the exact ODE solution on λ-uniform grids of n steps.

    Every solver's last step (t = 0 → clean data) is the same map x ↦ x̂₀(x, 0), so the reference is
    that map applied to the exact ODE state at t = 0: the error is the discretisation error alone."""
    D, x = gaussian_denoiser(s), x_T((256, 1, 2, 2))
    a, sg = alpha_sigma(SCHED, torch.tensor([999.0, 0.0]))
    var = a ** 2 * s ** 2 + sg ** 2
    ref = D.predict(x * (var[1] / var[0]).sqrt().item(), 0.0)[1]
    return [(get_solver(name)(D, x, lambda_uniform(n)) - ref).pow(2).mean().sqrt().item() for n in ns]


# observed order (least-squares slope of log error vs log steps) that each deterministic solver must reach
ORDERS = {"ddim": 0.9, "euler": 0.9, "ams-ddim": 0.9, "heun": 1.8, "dpmpp-2m": 1.8, "dpmpp-3m": 2.7}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_ode_order_of_convergence(name):
    ns = [10, 20, 40, 80] if name != "dpmpp-2m" else [20, 40, 80, 160]  # 2M's warm-up step needs a few more
    errs = _ode_errors(name, ns)
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), f"{name}: error does not fall {errs}"
    order = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    print(f"{name}: errors {['%.2e' % e for e in errs]} observed order {order:.2f}")
    assert order >= ORDERS[name], f"{name}: observed order {order:.2f} < {ORDERS[name]}"


def test_every_deterministic_solver_has_an_order_requirement():
    assert set(DETERMINISTIC) == set(ORDERS) and set(DETERMINISTIC) <= set(SOLVERS)


@pytest.mark.parametrize("name", list(SOLVERS) + ["diffusers:DPMSolverMultistepScheduler"])
def test_parameterizations_agree(name):
    """eps-, v- and x0-parameterized exact networks are the same model: every solver gives the same samples."""
    ts = make_timesteps(SCHED, 20, "leading")
    outs = {p: get_solver(name)(gaussian_denoiser(0.5, p), x_T((64, 1, 4, 4)), ts,
                                generator=torch.Generator().manual_seed(3)) for p in ("eps", "v", "x0")}
    tol = 1e-5 if name.startswith("diffusers:") else 1e-9  # diffusers computes in float32
    for p in ("v", "x0"):
        torch.testing.assert_close(outs[p], outs["eps"], rtol=tol, atol=tol, msg=f"{name}: {p} vs eps")


def test_euler_is_ddim():
    """Euler in EDM's scaled variables is DDIM with η = 0 (DDIM eq. 14, Karras et al. 2022 §3)."""
    D, ts = gaussian_denoiser(0.5), make_timesteps(SCHED, 10, "leading")
    torch.testing.assert_close(get_solver("euler")(D, x_T(), ts), get_solver("ddim")(D, x_T(), ts),
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------- every solver on every spacing, against the exact law --

# Data N(μ, diag s²) on 1×4×4 with a non-zero per-pixel mean, so that a solver must get the mean right too.
LAW_MU = 0.5 * torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(20), dtype=torch.float64)
LAW_S = 0.2 + 0.6 * torch.rand((1, 4, 4), generator=torch.Generator().manual_seed(21), dtype=torch.float64)
LAW_N = 2000  # samples per row: the sampling noise of the relative std is about 1/sqrt(2N) = 1.6 %
LAW_NFE = (10, 20, 50, 100)


@functools.lru_cache(maxsize=None)
def _law_runs(name: str, spacing: str, kind: str = "linear") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(z, samples at each NFE of LAW_NFE) from one x_T on a ``kind`` schedule; z is x_T's exact
    probability-flow coordinate, so the exact ODE endpoint is μ + s·z and its state at t is
    α_t μ + sqrt(α_t² s² + σ_t²)·z."""
    sched = SCHED if kind == "linear" else Schedule(kind)
    D, x = gaussian_denoiser(LAW_S, mu=LAW_MU, schedule=sched), x_T((LAW_N, 1, 4, 4), seed=22)
    a, sg = alpha_sigma(sched, torch.tensor(999.0))
    z = (x - a * LAW_MU) / (a ** 2 * LAW_S ** 2 + sg ** 2).sqrt()
    outs = [get_solver(name)(D, x, make_timesteps(sched, nfe // nfe_per_step(name), spacing),
                             generator=torch.Generator().manual_seed(23)) for nfe in LAW_NFE]
    return z, outs


def _law_errors(outs: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """RMS over pixels of the relative std error and of the mean error in units of s, per NFE."""
    std = [((o.std(0) / LAW_S - 1) ** 2).mean().sqrt().item() for o in outs]
    mean = [(((o.mean(0) - LAW_MU) / LAW_S) ** 2).mean().sqrt().item() for o in outs]
    return std, mean


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(GENERIC))
def test_gaussian_law_converges_on_every_spacing(name, spacing):
    """Mean and std of the samples approach the exact law as the NFE grows (10 → 100), on every spacing:
    no row grows beyond the sampling noise, and the last is close. dpmpp-3m-sde on leading failed this
    before the multistep order limit (std error 2.3 → 5.7 → 2.9 → 1.0, the state's std at t = 0 several
    times the true one)."""
    std, mean = _law_errors(_law_runs(name, spacing)[1])
    msg = f"{name} on {spacing}: std errors {['%.3f' % e for e in std]}, mean errors {['%.3f' % e for e in mean]}"
    print(msg)
    for errs, noise in ((std, 2 / (2 * LAW_N) ** 0.5), (mean, 2 / LAW_N ** 0.5)):
        assert all(b <= a + noise for a, b in zip(errs, errs[1:])), f"grows with NFE: {msg}"
        assert errs[-1] <= max(0.6 * errs[0], 2 * noise), f"does not converge: {msg}"
    assert std[-1] < 0.10 and mean[-1] < 0.10, f"far from the law at NFE {LAW_NFE[-1]}: {msg}"


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_probability_flow_map_converges_on_every_spacing(name, spacing):
    """Deterministic solvers approach the exact probability-flow map x_T ↦ μ + s·z: max error falls with
    the NFE, down to the floor that the common last step x ↦ x̂₀(x, t = 0) leaves on grids ending at t = 0
    (x̂₀ at σ_0 = 0.01 is the posterior mean, not the ODE endpoint: ~σ_0²/(2 s²) relative, < 2e-3 here)."""
    z, outs = _law_runs(name, spacing)
    errs = [(o - (LAW_MU + LAW_S * z)).abs().max().item() for o in outs]
    msg = f"{name} on {spacing}: max |x − x_exact| {['%.2e' % e for e in errs]}"
    print(msg)
    assert all(b < a or b < 2e-3 for a, b in zip(errs, errs[1:])), msg
    assert errs[-1] < 0.25 * errs[0], msg


_AMS_ON_COSINE = pytest.mark.xfail(strict=True, reason=(
    "known, not fixed: AMS's momentum averages increments of x̄ = x/sqrt(ᾱ), ~2e4 times the data scale on the "
    "first cosine step, and b = 0.98 keeps 2 % of it out of that step (std error at 100 NFE: 4.4 trailing, 0.66 logsnr)"))


@pytest.mark.parametrize("spacing", ["trailing", "logsnr"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=_AMS_ON_COSINE) if n == "ams-ddim" else n for n in GENERIC])
def test_gaussian_law_on_the_cosine_schedule(name, spacing):
    """On the cosine schedule the first timestep has ᾱ ≈ 2.4e-9 (σ̄ = σ/α ≈ 2e4), and trailing grids jump from
    there to σ̄ ≈ 6-30 in one step. Heun's trapezoid in σ̄ weighted the end slope by half of that jump and
    returned noise (std error ~100 at 10 NFE; FID-dom 1,509 on zoo:mnist-tiny-v2); every solver must land on the law."""
    std, mean = _law_errors(_law_runs(name, spacing, "cosine")[1])
    msg = f"{name} on cosine/{spacing}: std errors {['%.3f' % e for e in std]}, mean errors {['%.3f' % e for e in mean]}"
    print(msg)
    assert std[-1] < 0.10 and mean[-1] < 0.10, msg


# minimum observed order on the "logsnr" spacing (NFE 10 → 100), per family
LOGSNR_ORDERS = {"ddim": 0.9, "euler": 0.9, "ams-ddim": 0.9, "heun": 1.8, "dpmpp-2m": 1.7, "dpmpp-3m": 2.7}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_order_on_the_logsnr_spacing(name):
    """On the spacing uniform in log-SNR (integer timesteps) each deterministic solver reaches its family's
    order against the exact flow to t = 0 followed by the common last step x ↦ x̂₀(x, 0)."""
    assert set(LOGSNR_ORDERS) == set(DETERMINISTIC)
    z, outs = _law_runs(name, "logsnr")
    a, sg = alpha_sigma(SCHED, torch.tensor(0.0))
    at_0 = a * LAW_MU + (a ** 2 * LAW_S ** 2 + sg ** 2).sqrt() * z
    ref = gaussian_denoiser(LAW_S, mu=LAW_MU).predict(at_0, 0.0)[1]
    errs = [(o - ref).abs().max().item() for o in outs]
    order = -np.polyfit(np.log(LAW_NFE), np.log(errs), 1)[0]
    print(f"{name}: max errors {['%.2e' % e for e in errs]} observed order {order:.2f}")
    assert order >= LOGSNR_ORDERS[name], f"{name}: observed order {order:.2f} < {LOGSNR_ORDERS[name]} ({errs})"


def test_multistep_order_limits_long_steps_only():
    """The order rule: full order on steady grids, first order on a step > MAX_STEP_RATIO × the last."""
    from leandiff.solvers.dpmpp import MAX_STEP_RATIO, multistep_order

    assert multistep_order([], 1.0) == 1
    assert multistep_order([0.5, 0.5], 0.5) == 3
    assert multistep_order([0.5, 0.6], 0.7) == 3  # trailing's gently growing steps
    assert multistep_order([0.5, 0.6], 0.6 * MAX_STEP_RATIO + 0.1) == 1  # leading's last step into t = 0
    assert multistep_order([0.1, 0.6], 0.7) == 2  # the earlier jump limits only the third point


# ---------------------------------------------------------------- tiny UNet vs diffusers --------

@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the scale of b (a random network drives samples far beyond [-1, 1])."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def _diffusers_loop(scheduler, unet, x, generator=None, **step_kwargs) -> list[torch.Tensor]:
    xs = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator, **step_kwargs).prev_sample
            xs.append(x)
    return xs


def _ours(name, unet, x, timesteps, generator=None, parameterization="eps", **opts) -> list[torch.Tensor]:
    xs = []
    get_solver(name)(Denoiser(unet, SCHED, parameterization), x, timesteps, generator=generator,
                     callback=lambda d: xs.append(d["x"]), **opts)
    return xs


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_step_for_step(unet, eta):
    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    sch.set_timesteps(10)
    x = x_T((2, 1, 8, 8), dtype=torch.float32)
    ref = _diffusers_loop(sch, unet, x, torch.Generator().manual_seed(4), eta=eta)
    ours = _ours("ddim", unet, x, make_timesteps(SCHED, 10, "leading"), torch.Generator().manual_seed(4), eta=eta)
    assert torch.equal(sch.timesteps, make_timesteps(SCHED, 10, "leading"))
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert _max_rel(a, b) <= 1e-5, f"step {i}: {_max_rel(a, b):.2e}"


def test_ddpm_equals_diffusers_step_for_step(unet):
    """The foundation's must-show: DDPM ancestral sampling equals DDPMScheduler with the same noise."""
    sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        variance_type="fixed_small", timestep_spacing="leading")
    sch.set_timesteps(20)
    x = x_T((2, 1, 8, 8), dtype=torch.float32)
    ref = _diffusers_loop(sch, unet, x, torch.Generator().manual_seed(5))
    ours = _ours("ddpm", unet, x, sch.timesteps, torch.Generator().manual_seed(5))
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert _max_rel(a, b) <= 1e-5, f"step {i}: {_max_rel(a, b):.2e}"


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_equals_diffusers(unet, parameterization, steps):
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                      lower_order_final=True, final_sigmas_type="zero",
                                      timestep_spacing="trailing",
                                      prediction_type={"eps": "epsilon", "v": "v_prediction"}[parameterization])
    sch.set_timesteps(steps)
    x = x_T((2, 1, 8, 8), dtype=torch.float32)
    ref = _diffusers_loop(sch, unet, x)
    ours = _ours("dpmpp-2m", unet, x, make_timesteps(SCHED, steps, "trailing"), parameterization=parameterization)
    assert torch.equal(sch.timesteps, make_timesteps(SCHED, steps, "trailing"))
    assert _max_rel(ours[-1], ref[-1]) <= 1e-4


def test_dpmpp_2m_sde_equals_diffusers_with_the_same_noise(unet):
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint",
                                      final_sigmas_type="zero", timestep_spacing="trailing")
    sch.set_timesteps(20)
    x = x_T((2, 1, 8, 8), dtype=torch.float32)
    ref = _diffusers_loop(sch, unet, x, torch.Generator().manual_seed(6))
    ours = _ours("dpmpp-2m-sde", unet, x, sch.timesteps, torch.Generator().manual_seed(6))
    assert _max_rel(ours[-1], ref[-1]) <= 1e-4


@pytest.mark.parametrize("sde,ode", [("dpmpp-2m-sde", "dpmpp-2m"), ("dpmpp-3m-sde", "dpmpp-3m")])
def test_sde_solvers_without_noise_are_their_ode_solvers(unet, sde, ode):
    """η = 0 removes the fresh noise and the extra contraction: the SDE solver is the ODE solver, step for step."""
    ts = make_timesteps(SCHED, 12, "trailing")
    x = x_T((2, 1, 8, 8), dtype=torch.float32)
    for a, b in zip(_ours(sde, unet, x, ts, torch.Generator().manual_seed(12), eta=0.0), _ours(ode, unet, x, ts),
                    strict=True):
        assert _max_rel(a, b) <= 1e-6
    D = gaussian_denoiser(0.5)
    torch.testing.assert_close(get_solver(sde)(D, x_T(), ts, eta=0.0), get_solver(ode)(D, x_T(), ts),
                               rtol=1e-10, atol=1e-10)


def test_dpmpp_3m_sde_noise_level_interpolates():
    """Partial noise (0 < η < 1) still samples the data distribution, and differs from both ends."""
    s, D, ts = 0.5, gaussian_denoiser(0.5), make_timesteps(SCHED, 200, "logsnr")
    outs = {eta: get_solver("dpmpp-3m-sde")(D, x_T(), ts, generator=torch.Generator().manual_seed(13), eta=eta)
            for eta in (0.0, 0.5, 1.0)}
    assert abs(outs[0.5].std().item() / s - 1) < 0.02
    assert (outs[0.5] - outs[0.0]).abs().max() > 1e-2 and (outs[0.5] - outs[1.0]).abs().max() > 1e-2


@pytest.mark.parametrize("name,ours,steps", [("DDIMScheduler", "ddim", 10),
                                             ("DPMSolverMultistepScheduler", "dpmpp-2m", 20)])
def test_adapter_runs_diffusers_like_its_twin(unet, name, ours, steps):
    """The adapter builds the scheduler from the Denoiser and honours the scheduler's own timesteps."""
    D = Denoiser(unet, SCHED, "eps")
    build = get_solver(f"diffusers:{name}")
    x = x_T((2, 1, 8, 8), dtype=torch.float32)
    seen = []
    D.nfe = 0
    out = build(D, x, list(range(steps)), callback=lambda d: seen.append(d["t"]))
    assert D.nfe == steps
    twin = get_solver(ours)(Denoiser(unet, SCHED, "eps"), x, torch.tensor(seen))
    assert _max_rel(out, twin) <= 1e-4
    assert build is get_solver(f"diffusers:{name}")  # one function per class name


def test_adapter_reports_the_nfe_it_spends():
    D = gaussian_denoiser(0.5)
    assert nfe_per_step("diffusers:HeunDiscreteScheduler") == 2
    D.nfe = 0
    get_solver("diffusers:HeunDiscreteScheduler")(D, x_T((8, 1, 2, 2)), list(range(5)))
    assert D.nfe == 2 * 5 - 1  # no correction at the last step, as our heun


@pytest.mark.parametrize("base", ["ddim", "ddpm"])
def test_ams_with_no_momentum_is_the_plain_sampler(unet, base):
    ts = make_timesteps(SCHED, 10, "leading")
    x = x_T((2, 1, 8, 8), dtype=torch.float32)
    opts = {"eta": 0.5} if base == "ddim" else {}
    plain = _ours(base, unet, x, ts, torch.Generator().manual_seed(7), **opts)
    ams = _ours(f"ams-{base}", unet, x, ts, torch.Generator().manual_seed(7), a=0.0, b=1.0, c=0.0, zeta=0.0, **opts)
    for i, (p, q) in enumerate(zip(plain, ams, strict=True)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=f"step {i}")
    # and exactly (to float64 rounding) on the Gaussian problem
    D = gaussian_denoiser(0.5)
    p = get_solver(base)(D, x_T(), ts, generator=torch.Generator().manual_seed(8), **opts)
    q = get_solver(f"ams-{base}")(D, x_T(), ts, generator=torch.Generator().manual_seed(8),
                                  a=0.0, b=1.0, c=0.0, zeta=0.0, **opts)
    torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-10)


def test_ams_momentum_changes_the_trajectory():
    D, ts = gaussian_denoiser(0.5), make_timesteps(SCHED, 10, "leading")
    plain = get_solver("ams-ddim")(D, x_T(), ts, a=0.0, b=1.0, c=0.0, zeta=0.0)
    assert (get_solver("ams-ddim")(D, x_T(), ts, a=0.5, b=0.5) - plain).abs().max() > 1e-3
    assert (get_solver("ams-ddim")(D, x_T(), ts, a=0.0, b=1.0, c=0.1) - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- options and boundaries --------

@pytest.mark.parametrize("name", list(SOLVERS) + list(PEERS))
def test_clip_x0_keeps_samples_in_range(unet, name):
    """With clip_x0 (sample.generate's default) a random network still gives finite samples, in range
    for the solvers whose last step returns x̂₀."""
    D = Denoiser(unet, SCHED, "eps")
    cannot_clip = name == "diffusers:EulerDiscreteScheduler"  # no clip_sample, no thresholding: it says so
    with pytest.warns(UserWarning, match="cannot clip") if cannot_clip else contextlib.nullcontext():
        out = get_solver(name)(D, 3 * x_T((2, 1, 8, 8), dtype=torch.float32), make_timesteps(SCHED, 6, "trailing"),
                               generator=torch.Generator().manual_seed(9), clip_x0=True)
    assert torch.isfinite(out).all()
    if name in ("euler", "heun", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "dpmpp-3m-sde", "euler-maruyama"):
        assert out.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("name,opts", [("ddim", {"eta": 1.5}), ("ddim", {"eta": -0.1}),
                                       ("ams-ddim", {"eta": 2.0}), ("ams-ddim", {"a": 1.0}),
                                       ("ams-ddpm", {"c": 1.0}), ("ams-ddpm", {"b": 0.0}),
                                       ("ams-ddpm", {"zeta": -1.0}), ("dpmpp-2m-sde", {"eta": 1.2}),
                                       ("dpmpp-3m-sde", {"eta": -0.5})])
def test_bad_options_fail_loudly(name, opts):
    with pytest.raises(UserError, match=list(opts)[0]):
        get_solver(name)(gaussian_denoiser(0.5), x_T((2, 1, 2, 2)), [999, 500], **opts)


def test_bad_names_and_timesteps_fail_loudly():
    with pytest.raises(UserError, match="unknown solver"):
        get_solver("dpm++")
    with pytest.raises(UserError, match="no scheduler class"):
        get_solver("diffusers:NoSuchScheduler")
    with pytest.raises(UserError, match="no scheduler class"):
        get_solver("diffusers:UNet2DModel")
    with pytest.raises(UserError, match="strictly decreasing"):
        get_solver("heun")(gaussian_denoiser(0.5), x_T((2, 1, 2, 2)), [500, 600])


def test_generate_reports_honest_nfe():
    """sample.generate derives steps from the NFE; heun spends 2N − 1 (no correction at σ = 0)."""
    D = gaussian_denoiser(0.5)
    for solver, nfe, spent in [("heun", 10, 9), ("dpmpp-3m", 7, 7), ("ams-ddpm", 5, 5),
                               ("diffusers:DPMSolverMultistepScheduler", 6, 6)]:
        stats = SampleStats()
        x = sample_all(D, (1, 2, 2), SampleConfig(solver=solver, nfe=nfe, n=4, clip_x0=False), stats)
        assert x.shape == (4, 1, 2, 2) and stats.nfe == spent, (solver, stats.nfe)


def test_truncated_start_from_a_noised_reference():
    """Diffusing true samples to t = 400 and solving from there lands on the data again, in fewer steps."""
    from leandiff.solvers.truncated import truncated_start

    s, D = 0.5, gaussian_denoiser(0.5)
    x_ref = s * x_T(seed=10)
    x, ts = truncated_start(D, x_ref, make_timesteps(SCHED, 100, "logsnr"), 400,
                            generator=torch.Generator().manual_seed(11))
    assert ts[0] <= 400 and len(ts) < 100
    D.nfe = 0
    out = get_solver("dpmpp-2m")(D, x, ts)
    assert D.nfe == len(ts)
    assert abs(out.std().item() / s - 1) < 0.02
    with pytest.raises(UserError, match="no timestep"):
        truncated_start(D, x_ref, [999, 500], 100)


def test_unknown_options_fail_loudly_before_sampling():
    with pytest.raises(UserError, match="heun has no option eta; its options: clip_x0"):
        sample_all(gaussian_denoiser(0.5), (1, 2, 2), SampleConfig(solver="heun", nfe=4, n=2, opts={"eta": 0.5}))
    with pytest.raises(UserError, match="no option beta"):
        sample_all(gaussian_denoiser(0.5), (1, 2, 2),
                   SampleConfig(solver="diffusers:DDIMScheduler", nfe=4, n=2, opts={"beta": 1}))
