"""EDM preconditioning as a parameterization, min-SNR-γ weighting and EMA profiles kept side by side.

The exact-Gaussian checks use data x₀ ~ N(μ, s²) per pixel, whose exact x̂₀(x_t, t) is known in closed
form; expressed in EDM's parameterization (F = (x̂₀ − c_skip·x̄)/c_out from the network's own input
c_in·x̄), every solver must produce what it produces for the same exact model written as ε.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from leandiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from leandiff.denoiser import Denoiser, canonical_parameterization, edm_coefficients, parse_parameterization
from leandiff.errors import UserError
from leandiff.schedule import Schedule, alpha_sigma, log_snr, q_sample, t_of_edm_sigma, t_of_log_snr
from leandiff.solvers import GENERIC, get_solver
from leandiff.train import DiffusionLoss, TrainConfig, draw_timesteps, loss_weight, train

SCHED = Schedule("linear")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the preconditioning itself ------

def test_edm_coefficients_are_the_papers():
    """Karras et al. 2022, Table 1: c_skip = σd²/(σ²+σd²), c_out = σσd/√(σ²+σd²), c_in = 1/√(σ²+σd²)."""
    sd = 0.5
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_coefficients(sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
    # at σ = σ_data the skip and the network share the output equally; the effective target has unit variance
    c_skip, c_out, c_in = edm_coefficients(torch.tensor(sd, dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(0.5) and c_out.item() == pytest.approx(sd / math.sqrt(2))
    # the loss weight λ(σ) = (σ²+σd²)/(σσd)² is exactly 1/c_out², so the plain MSE on F is EDM's loss
    _, c_out, _ = edm_coefficients(sigma, sd)
    lam = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    assert torch.allclose(lam * c_out ** 2, torch.ones_like(sigma))


def test_parameterization_strings():
    assert parse_parameterization("edm") == ("edm", {"sigma_data": 0.5})
    assert parse_parameterization("edm(sigma_data=0.25)") == ("edm", {"sigma_data": 0.25})
    assert parse_parameterization("cm(sigma_min=0.01)") == ("cm", {"sigma_data": 0.5, "sigma_min": 0.01})
    assert canonical_parameterization("edm") == "edm(sigma_data=0.5)"
    assert canonical_parameterization("eps") == "eps"
    assert parse_parameterization("cm(sigma_min=0.01,base=v)") == ("cm", {"sigma_data": 0.5, "sigma_min": 0.01, "base": "v"})
    assert canonical_parameterization("cm(base=v,sigma_min=0.01)") == "cm(sigma_data=0.5,sigma_min=0.01,base=v)"
    for bad in ("edm(sigma=1)", "edm(sigma_data=-1)", "edm(sigma_data=x)", "eps(sigma_data=1)", "foo", "edm(sigma_data=nan)",
                "cm(base=cm)", "cm(base=)", "edm(base=v)"):
        with pytest.raises(UserError):
            parse_parameterization(bad)


def test_fractional_t_from_edm_sigma_inverts_the_schedule():
    for kind in ("linear", "cosine"):
        s = Schedule(kind)
        t = torch.tensor([0.0, 0.25, 3.0, 417.5, 998.75, 999.0], dtype=torch.float64)
        assert torch.allclose(t_of_log_snr(s, log_snr(s, t)), t, atol=1e-9)
        a, sg = alpha_sigma(s, t)
        assert torch.allclose(t_of_edm_sigma(s, sg / a), t, atol=1e-6)
    # out of the schedule's range: clamped to its ends
    assert t_of_edm_sigma(SCHED, torch.tensor([1e-9, 1e9])).tolist() == [0.0, 999.0]


class RandomF(torch.nn.Module):
    """A fixed random nonlinear F(x, t), to check conversions against a direct computation."""

    def forward(self, x, t):
        return torch.tanh(1.3 * x + 0.001 * t.to(x.dtype).reshape(-1, 1, 1, 1)) - 0.2


def test_edm_conversions_agree_with_a_direct_computation():
    sd = 0.5
    d = Denoiser(RandomF(), SCHED, "edm")
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 10.5, 250.0, 700.25, 999.0])
    eps, x0 = d.predict(x, t)
    v = d.v(x, t)
    # EDM's own coordinates: x̄ = x/α, σ̄ = σ/α, D = c_skip·x̄ + c_out·F(c_in·x̄; t)
    a, s = alpha_sigma(SCHED, t.double())
    a, s = a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    sig = s / a
    xb = x / a
    c_skip = sd ** 2 / (sig ** 2 + sd ** 2)
    c_out = sig * sd / (sig ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sig ** 2 + sd ** 2).sqrt()
    D = c_skip * xb + c_out * RandomF()(c_in * xb, t)
    assert torch.allclose(x0, D, atol=1e-12)
    assert torch.allclose(eps, (xb - D) / sig, atol=1e-9)  # EDM's dx̄/dσ̄ is the VP ε̂
    assert torch.allclose(v, a * eps - s * x0, atol=1e-12)
    # the training target makes the conversion exact
    x0_true = torch.randn_like(x)
    noise = torch.randn_like(x)
    xt = q_sample(SCHED, x0_true, t, noise)
    e2, x2 = d.convert(d.target(x0_true, noise, t), xt, t)
    assert torch.allclose(x2, x0_true, atol=1e-10) and torch.allclose(e2, noise, atol=1e-8)


# ---------------------------------------------------------------- exact Gaussian denoiser -------

MU, S = 0.3, 0.4  # data x₀ ~ N(μ, s²) per pixel


def exact_x0(x, t):
    """E[x₀ | x_t] for x₀ ~ N(μ, s²): μ + α s²(x − α μ)/(α² s² + σ²)."""
    a, sg = alpha_sigma(SCHED, t.double())
    a, sg = a.to(x.dtype).reshape(-1, 1, 1, 1), sg.to(x.dtype).reshape(-1, 1, 1, 1)
    return MU + a * S ** 2 * (x - a * MU) / (a ** 2 * S ** 2 + sg ** 2)


class GaussEps(torch.nn.Module):
    def forward(self, x, t):
        a, sg = alpha_sigma(SCHED, t.double())
        a, sg = a.to(x.dtype).reshape(-1, 1, 1, 1), sg.to(x.dtype).reshape(-1, 1, 1, 1)
        return (x - a * exact_x0(x, t)) / sg


class GaussEDM(torch.nn.Module):
    """The same exact model as an EDM network: it sees c_in·x̄ and returns (x̂₀ − c_skip·x̄)/c_out."""

    def __init__(self, sd):
        super().__init__()
        self.sd = sd

    def forward(self, x_in, t):
        a, sg = alpha_sigma(SCHED, t.double())
        a, sg = a.to(x_in.dtype).reshape(-1, 1, 1, 1), sg.to(x_in.dtype).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = edm_coefficients(sg / a, self.sd)
        xb = x_in / c_in
        return (exact_x0(a * xb, t) - c_skip * xb) / c_out


@pytest.mark.parametrize("name", sorted(GENERIC))  # the consistency sampler needs a cm model: test_consistency
def test_every_solver_runs_an_exact_edm_model_as_it_runs_the_eps_one(name):
    """Same x_T, same noise: an EDM-parameterized exact model gives the eps one's samples, and with
    many steps they have the data's mean and std."""
    x_T = torch.randn((2000, 1, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = torch.arange(999, -1, -5)  # 200 steps
    outs = []
    for d in (Denoiser(GaussEps(), SCHED, "eps"), Denoiser(GaussEDM(0.5), SCHED, "edm")):
        outs.append(get_solver(name)(d, x_T.clone(), ts, generator=torch.Generator().manual_seed(2)))
    assert torch.allclose(outs[0], outs[1], atol=1e-6), f"{name}: {(outs[0] - outs[1]).abs().max():.2e}"
    assert abs(outs[1].mean().item() - MU) < 0.03
    assert abs(outs[1].std().item() / S - 1) < 0.05


# ---------------------------------------------------------------- min-SNR-γ ------------------------

def test_min_snr_weights_match_the_closed_form():
    """Hang et al. 2023: min(SNR, γ) on x₀-MSE = min(SNR, γ)/SNR on ε-MSE = min(SNR, γ)/(SNR+1) on v-MSE."""
    snr = torch.tensor([1e-3, 0.5, 1.0, 4.9, 5.0, 20.0, 1e4])
    g = 5.0
    assert torch.allclose(loss_weight("min-snr", snr, "eps", g), torch.minimum(snr, torch.tensor(g)) / snr)
    assert torch.allclose(loss_weight("min-snr", snr, "v", g), torch.minimum(snr, torch.tensor(g)) / (snr + 1))
    assert torch.allclose(loss_weight("min-snr", snr, "x0", g), torch.minimum(snr, torch.tensor(g)))
    assert torch.allclose(loss_weight("plain", snr, "eps"), torch.ones_like(snr))


@pytest.mark.parametrize("param", ["eps", "v", "edm"])
@pytest.mark.parametrize("weighting", ["min-snr", "truncated-snr", "snr+1"])
def test_weighted_loss_equals_the_weight_times_the_x0_error(param, weighting):
    """Each weighting is defined on ‖x̂₀ − x₀‖²; computing it on the network's own target must agree."""
    d = Denoiser(RandomF(), SCHED, param)
    x0 = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    loss = DiffusionLoss(weighting, gamma=5.0)(d, x0, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = draw_timesteps(SCHED, 16, g)
    noise = torch.randn(x0.shape, generator=g)
    xt = q_sample(SCHED, x0, t, noise)
    _, x0_hat = d.predict(xt, t)
    snr = log_snr(SCHED, t).exp().float()
    w = {"min-snr": snr.clamp(max=5.0), "truncated-snr": snr.clamp(min=1.0), "snr+1": snr + 1}[weighting]
    direct = (w * (x0_hat.float() - x0).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=2e-3)


def test_edm_noise_levels_are_lognormal():
    g = torch.Generator().manual_seed(0)
    t = draw_timesteps(SCHED, 20000, g, "lognormal", -1.2, 1.2)
    a, s = alpha_sigma(SCHED, t.double())
    ln_sigma = (s / a).log()
    inside = ln_sigma[(ln_sigma > math.log(0.02)) & (ln_sigma < math.log(100))]  # away from the clamped ends
    assert inside.median().item() == pytest.approx(-1.2, abs=0.05)
    assert not float(t.min()) < 0 and not float(t.max()) > 999
    assert t.dtype.is_floating_point and (t != t.round()).float().mean() > 0.9  # fractional t


# ---------------------------------------------------------------- training, EMA, checkpoints -------

def _cfg(**kw):
    base = dict(dataset="test", steps=6, batch_size=8, lr=1e-3, warmup=0, sample_every=0, checkpoint_every=3,
                seed=0, lr_schedule="constant")  # constant: a run stopped at 3 of 6 steps is the first half of 6
    return TrainConfig(**{**base, **kw})


def _images():
    return torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _init(tiny_ckpt, param):
    ck = copy.deepcopy(tiny_ckpt)
    ck.parameterization = canonical_parameterization(param)
    return ck


def test_extra_ema_equals_a_plain_ema_with_that_decay(tiny_ckpt, tmp_path):
    """Profiles kept side by side are the same arithmetic as the main EMA: decay 0.1 kept beside 0.3 (short runs: the warm-up caps decays near 1)
    equals a run whose main EMA is 0.1, bit for bit; a resumed run ends the same."""
    a = train(_cfg(ema_decay=0.3, ema_decays=(0.1,)), tmp_path / "a", init=_init(tiny_ckpt, "eps"),
              images=_images(), progress=False)
    b = train(_cfg(ema_decay=0.1), tmp_path / "b", init=_init(tiny_ckpt, "eps"), images=_images(), progress=False)
    side = load_checkpoint(tmp_path / "a" / "ema" / "0.1")
    for (k, x), (_, y) in zip(side.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(x, y), k
    assert side.meta["ema"]["decay"] == 0.1 and a.meta["ema"]["decay"] == 0.3
    assert not torch.equal(next(iter(a.net.state_dict().values())), next(iter(side.net.state_dict().values())))
    # kill after step 3 (its state is saved), resume to 6: the side EMA ends where it ended uninterrupted
    train(_cfg(ema_decay=0.3, ema_decays=(0.1,), steps=3), tmp_path / "c", init=_init(tiny_ckpt, "eps"),
          images=_images(), progress=False)
    train(_cfg(ema_decay=0.3, ema_decays=(0.1,)), tmp_path / "c", init=_init(tiny_ckpt, "eps"), images=_images(),
          progress=False, resume=True)
    resumed = load_checkpoint(tmp_path / "c" / "ema" / "0.1")
    for (k, x), (_, y) in zip(resumed.net.state_dict().items(), side.net.state_dict().items()):
        assert torch.equal(x, y), k


def test_snapshots_are_kept(tiny_ckpt, tmp_path):
    train(_cfg(snapshot_every=2), tmp_path / "r", init=_init(tiny_ckpt, "v"), images=_images(), progress=False)
    snaps = sorted(p.name for p in (tmp_path / "r" / "snapshots").iterdir())
    assert snaps == ["step_0000002", "step_0000004", "step_0000006"]
    assert load_checkpoint(tmp_path / "r" / "snapshots" / "step_0000004").meta["train"]["completed_steps"] == 4


def test_an_edm_model_trains_saves_and_reloads_exactly(tiny_ckpt, tmp_path):
    ck = train(_cfg(parameterization="edm(sigma_data=0.6)"), tmp_path / "e", init=_init(tiny_ckpt, "edm(sigma_data=0.6)"),
               images=_images(), progress=False)
    back = load_checkpoint(tmp_path / "e")
    assert back.parameterization == "edm(sigma_data=0.6)"
    assert back.denoiser().settings == {"sigma_data": 0.6}
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5.0, 400.5, 990.0])
    with torch.no_grad():
        assert torch.equal(ck.denoiser().x0(x, t), back.denoiser().x0(x, t))


def test_bad_training_settings_are_one_line_errors():
    for kw in ({"parameterization": "edm(sigma_data=0)"}, {"weighting": "bogus"}, {"min_snr_gamma": 0},
               {"ema_decays": (1.5,)}, {"noise_levels": "gamma"}, {"p_std": -1}, {"snapshot_every": -1}):
        with pytest.raises(UserError):
            _cfg(**kw)


# ---------------------------------------------------------------- everything downstream ---------

# one small instance of every recipe step; the test below fails when a step is registered without one
STEP_CASES = {
    "quant": "quant(n=8)",
    "prune": "prune(method=magnitude,ratio=0.5,reconstruct=8)",
    "finetune": "finetune(steps=2,batch_size=4,bf16=false)",
    "kd": "kd(s=2,steps=2,batch_size=4,bf16=false)",
    "lowrank": "lowrank(r=2)",
    "lora": "lora(steps=2,batch_size=4,bf16=false)",
    "pd": "pd(from=4,to=2,steps_per_round=2,convert_steps=2,batch_size=4)",
    "oneshot": "oneshot(teacher_nfe=2,steps=2,pairs=8,convert_steps=2,batch_size=4)",
    "cache": "cache(interval=2)",
    "cd": "cd(steps=2,n=4,batch_size=4)",
    "dmd": "dmd(steps=2,batch_size=4,pairs=4,teacher_nfe=2)",
}


@pytest.fixture
def edm_ckpt(tiny_ckpt, tmp_path):
    ck = _init(tiny_ckpt, "edm")
    save_checkpoint(ck, tmp_path / "edm")
    return load_checkpoint(tmp_path / "edm")


def test_every_step_has_a_case():
    from leandiff.recipe import STEPS

    assert set(STEP_CASES) == set(STEPS)


@pytest.mark.parametrize("step", sorted(STEP_CASES))
def test_every_compression_step_runs_on_an_edm_model(step, edm_ckpt, image_folder, tmp_path):
    from leandiff.recipe import apply_recipe
    from leandiff.sample import SampleConfig, sample_all

    out = apply_recipe(edm_ckpt, STEP_CASES[step], tmp_path / step, dataset=f"folder:{image_folder}",
                       progress=False, log=lambda s: None)
    back = load_checkpoint(tmp_path / step)
    assert back.lineage[-1]["step"] == step
    assert back.parameterization == out.parameterization
    solver, nfe, runtime = back.sampling_defaults(nfe=2 if step not in ("pd", "oneshot", "cd", "dmd") else None)
    from leandiff.runtime import runtime_denoiser

    x = sample_all(runtime_denoiser(back, runtime), (1, 16, 16), SampleConfig(solver, nfe, n=2,
                   spacing=back.default_spacing()))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("runtime", ["eager", "bf16", "ort", "dynamic-int8", "cache:2", "cache-nu:2"])
def test_every_runtime_runs_an_edm_model_close_to_eager(runtime, edm_ckpt):
    from leandiff.runtime import runtime_denoiser
    from leandiff.sample import SampleConfig, sample_all

    cfg = SampleConfig("dpmpp-2m", 4, n=4, spacing="trailing")
    ref = sample_all(runtime_denoiser(edm_ckpt, "eager"), (1, 16, 16), cfg)
    x = sample_all(runtime_denoiser(edm_ckpt, runtime), (1, 16, 16), cfg)
    assert torch.isfinite(x).all()
    assert (x - ref).abs().mean().item() < 0.1


def test_ema_selection_scores_each_distinct_profile_once(tiny_ckpt, tmp_path, monkeypatch):
    import copy

    import leandiff.evaluate.harness as harness
    from leandiff.ema import select_ema

    run = tmp_path / "run"
    save_checkpoint(tiny_ckpt, run)  # the main EMA
    save_checkpoint(tiny_ckpt, run / "ema" / "0.9995")  # a profile the warm-up never let diverge from it
    other = copy.deepcopy(tiny_ckpt)
    with torch.no_grad():
        next(other.net.parameters()).add_(0.1)
    save_checkpoint(other, run / "ema" / "0.99")
    calls = []

    def fake_eval(ck, cfg, **kw):
        calls.append(ck.hash())
        return {"quality": {"fid_dom": 1.0 if ck.hash() == tiny_ckpt.hash() else 0.5}}

    monkeypatch.setattr(harness, "evaluate_checkpoint", fake_eval)
    lines = []
    best, scores = select_ema(run, log=lines.append)
    assert len(calls) == 2 and len(set(calls)) == 2  # the duplicate is not sampled again
    assert best == "0.99" and scores["0.9995"] == 1.0 and len(scores) == 3
    assert any("the same weights as EMA" in ln for ln in lines)
