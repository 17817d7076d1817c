"""Distribution matching distillation (DMD / DMD2): the gradient, the fake-score update, the state and the student."""
from __future__ import annotations

import copy

import pytest
import torch

from leandiff.checkpoint import load_checkpoint, save_checkpoint
from leandiff.compress.dmd import BottleneckHead, DMDConfig, DMDLoss, bottleneck, dm_gradient, dmd_distill
from leandiff.compress.training import Training
from leandiff.denoiser import Denoiser
from leandiff.errors import UserError
from leandiff.schedule import Schedule, alpha_sigma, q_sample
from leandiff.spec import bind

SCHED = Schedule("linear")
pytestmark = pytest.mark.usefixtures("one_thread")


def gauss_x0(xt, t, s):
    """E[x₀ | x_t] for x₀ ~ N(0, s²)."""
    a, sg = alpha_sigma(SCHED, t.double())
    a, sg = a.reshape(-1, 1), sg.reshape(-1, 1)
    return (a * s ** 2 / (a ** 2 * s ** 2 + sg ** 2) * xt).to(xt.dtype)


@pytest.mark.parametrize("s_gen", [0.3, 1.5])
def test_the_dm_gradient_moves_samples_toward_the_teacher_distribution(s_gen):
    """Real data N(0, 1), generator N(0, s_gen²), both scores exact: descending along the DM gradient
    shrinks a too-wide generator and widens a too-narrow one, at every noise level."""
    g = torch.Generator().manual_seed(0)
    x = s_gen * torch.randn(4096, 8, generator=g, dtype=torch.float64)
    for t_val in (20.0, 300.0, 900.0):
        t = torch.full((4096,), t_val)
        xt = q_sample(SCHED, x, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
        grad = dm_gradient(x, gauss_x0(xt, t, 1.0), gauss_x0(xt, t, s_gen))
        step = x - 0.05 * grad
        assert (step.std() - 1).abs() < (x.std() - 1).abs(), t_val
    # the same score on both sides: no gradient
    assert dm_gradient(x, gauss_x0(xt, t, 1.0), gauss_x0(xt, t, 1.0)).abs().max() == 0


def _loss(tiny_ckpt, **kw):
    cfg = DMDConfig(**{"pairs": 8, "teacher_nfe": 2, **kw})
    teacher = Denoiser(copy.deepcopy(tiny_ckpt.net).eval().requires_grad_(False), SCHED, tiny_ckpt.parameterization)
    pairs = torch.randn(8, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    return DMDLoss(teacher, copy.deepcopy(tiny_ckpt.net), pairs, cfg, 1e-3)


def test_the_generator_gradient_is_the_dm_gradient_and_the_fake_network_learns(tiny_ckpt):
    torch.manual_seed(0)
    loss = _loss(tiny_ckpt, reg=0.0)
    student = Denoiser(copy.deepcopy(tiny_ckpt.net).train(), SCHED, tiny_ckpt.parameterization)
    x0 = torch.zeros(4, 1, 16, 16)
    before = {k: v.clone() for k, v in loss.fake.net.state_dict().items()}
    value = loss(student, x0, torch.Generator().manual_seed(1))
    value.backward()
    assert any(not torch.equal(v, before[k]) for k, v in loss.fake.net.state_dict().items())  # the fake score moved
    assert all(p.grad is not None for p in student.net.parameters() if p.requires_grad)
    # ∂L/∂x of ½·mean(x − sg(x − grad))² is grad/numel
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    grad = torch.randn(3, 1, 4, 4)
    (0.5 * torch.nn.functional.mse_loss(x, x.detach() - grad)).backward()
    assert torch.allclose(x.grad, grad / x.numel())


def test_the_loss_state_round_trips(tiny_ckpt):
    loss = _loss(tiny_ckpt, fake_steps=2)
    student = Denoiser(copy.deepcopy(tiny_ckpt.net).train(), SCHED, tiny_ckpt.parameterization)
    loss(student, torch.zeros(4, 1, 16, 16), torch.Generator().manual_seed(1))
    fresh = _loss(tiny_ckpt, fake_steps=2)
    fresh.load_state_dict(loss.state_dict())
    for (k, a), b in zip(loss.fake.net.state_dict().items(), fresh.fake.net.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = loss.opt.state_dict()["state"], fresh.opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_a_dmd_student_is_a_one_step_generator_that_reloads(tiny_ckpt, image_folder, tmp_path):
    from leandiff.sample import SampleConfig, sample_all

    src = tmp_path / "teacher"
    save_checkpoint(tiny_ckpt, src)
    out = dmd_distill(load_checkpoint(src), tmp_path / "dmd", DMDConfig(pairs=4, teacher_nfe=2,
                      train=Training(steps=2, batch_size=4)), dataset=f"folder:{image_folder}", progress=False)
    assert (tmp_path / "dmd" / "pairs.safetensors").is_file()
    save_checkpoint(out, tmp_path / "student")
    back = load_checkpoint(tmp_path / "student")
    assert back.parameterization == tiny_ckpt.parameterization and back.meta["distill"]["method"] == "dmd"
    solver, nfe, _ = back.sampling_defaults()
    assert (solver, nfe, back.default_spacing()) == ("ddim", 1, "trailing")
    # one trailing DDIM step is G(z) = x̂₀(z, T−1)
    z = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    d = back.denoiser()
    with torch.no_grad():
        from leandiff.solvers import get_solver
        from leandiff.schedule import timesteps
        x = get_solver("ddim")(d, z, timesteps(SCHED, 1, "trailing"), clip_x0=False)
        assert torch.allclose(x, d.x0(z, torch.full((3,), SCHED.T - 1.0)))
    x = sample_all(back.denoiser(), (1, 16, 16), SampleConfig(solver, nfe, n=3, spacing=back.default_spacing()))
    assert torch.isfinite(x).all()


def test_bad_dmd_settings_are_user_errors():
    for kw in ({"fake_steps": 0}, {"dm": -1.0}, {"dm": 0.0, "reg": 0.0}, {"reg": -1.0}, {"pairs": 0}, {"teacher_solver": "ddpm"}, {"teacher_nfe": 0},
               {"t_min": 0.5, "t_max": 0.4}, {"t_max": 1.5}, {"steps": -1}, {"lr": 0.0}, {"fake_lr": -1.0}, {"nfe": 0}):
        with pytest.raises(UserError):
            bind(DMDConfig, kw, "dmd")


def test_dm_zero_is_regression_only(tiny_ckpt):
    """dm=0: no fake-score update, and the loss is reg × ½·MSE to the teacher's pair samples."""
    loss = _loss(tiny_ckpt, dm=0.0, reg=2.0)
    student = Denoiser(copy.deepcopy(tiny_ckpt.net).train(), SCHED, tiny_ckpt.parameterization)
    before = {k: v.clone() for k, v in loss.fake.net.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    value = loss(student, torch.zeros(8, 1, 16, 16), g)
    assert all(torch.equal(v, before[k]) for k, v in loss.fake.net.state_dict().items())
    # the same draws by hand: z for the batch, then the pair indices (2 = 8 // 4)
    g = torch.Generator().manual_seed(3)
    torch.randn(8, 1, 16, 16, generator=g)
    idx = torch.randint(0, 8, (2,), generator=g)
    pair = loss.pairs[idx]
    t = torch.full((2,), SCHED.T - 1.0)
    with torch.no_grad():
        x = student.convert(student(pair[:, :1], t).float(), pair[:, :1], t)[1]
    assert value.item() == pytest.approx(2.0 * 0.5 * torch.nn.functional.mse_loss(x, pair[:, 1:]).item(), rel=1e-5)


def test_teacher_path_distils_that_teacher_into_a_generator_that_starts_from_the_input(tiny_ckpt, image_folder, tmp_path):
    """dmd(teacher=PATH): the pairs are the teacher's, the generator starts from the step's input (an earlier
    student), and a teacher on another noise schedule is a user error."""
    from leandiff.compress.progressive import teacher_pairs

    gen = copy.deepcopy(tiny_ckpt)
    with torch.no_grad():
        for p in gen.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = DMDConfig(pairs=4, teacher_nfe=2, train=Training(steps=1, batch_size=4, lr=1e-6))
    out = dmd_distill(gen, tmp_path / "dmd", cfg, dataset=f"folder:{image_folder}", progress=False, teacher=tiny_ckpt)
    want = teacher_pairs(tiny_ckpt, tmp_path / "own" / "pairs.safetensors", 4, "dpmpp-2m", 2, "trailing", True, 0)
    got = teacher_pairs(tiny_ckpt, tmp_path / "dmd" / "pairs.safetensors", 4, "dpmpp-2m", 2, "trailing", True, 0)
    assert torch.equal(got, want)

    def dist(a, b):
        return sum((x - y).pow(2).sum() for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))

    assert dist(out, gen) < 1e-3 * dist(out, tiny_ckpt)
    other = copy.deepcopy(tiny_ckpt)
    other.schedule = Schedule("cosine")
    with pytest.raises(UserError, match="noise schedules"):
        dmd_distill(gen, tmp_path / "bad", cfg, dataset=f"folder:{image_folder}", progress=False, teacher=other)


class ConstX0(torch.nn.Module):
    """An x₀-predicting network that always answers ``c`` (outside [−1, 1] to see the clip)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.full_like(x, self.c) + 0 * self.w


def test_backward_simulation_feeds_each_step_the_generators_own_earlier_steps(tiny_ckpt):
    """nfe=4: each sample's step is one of the 4 trailing timesteps, step 0 takes the noise z itself (the
    regression pairs' samples always), and a later step's input is the clipped x̂₀ of the step before
    re-noised to its level: here x̂₀ = clip(3) = 1, so the input is α_t·1 + σ_t·ε."""
    teacher = Denoiser(ConstX0(3.0), SCHED, "x0")
    loss = DMDLoss(teacher, ConstX0(3.0), torch.zeros(8, 2, 4, 4), DMDConfig(nfe=4, pairs=8), 1e-3)
    assert loss.steps == [999.0, 749.0, 499.0, 249.0]
    z = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    xin, tin = loss._simulate(teacher, z, 1024, torch.Generator().manual_seed(1))
    assert set(tin.tolist()) == set(loss.steps) and (tin[-1024:] == 999).all()
    assert torch.equal(xin[tin == 999], z[tin == 999])
    for t in loss.steps[1:]:
        a, sg = (float(v) for v in alpha_sigma(SCHED, torch.tensor(t)))
        x = xin[tin == t]
        assert x.mean().item() == pytest.approx(a, abs=0.03) and x.std().item() == pytest.approx(sg, rel=0.05)
    # one step: nothing simulated, nothing drawn
    one = DMDLoss(teacher, ConstX0(3.0), torch.zeros(8, 2, 4, 4), DMDConfig(pairs=8), 1e-3)
    g = torch.Generator().manual_seed(1)
    xin, tin = one._simulate(teacher, z, 1024, g)
    assert torch.equal(xin, z) and (tin == 999).all()
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())


def test_a_multistep_dmd_student_samples_by_consistency_sampling(tiny_ckpt, image_folder, tmp_path):
    from leandiff.sample import SampleConfig, sample_all

    out = dmd_distill(tiny_ckpt, tmp_path / "dmd", DMDConfig(nfe=2, pairs=4, teacher_nfe=2,
                      train=Training(steps=2, batch_size=4)), dataset=f"folder:{image_folder}", progress=False)
    save_checkpoint(out, tmp_path / "student")
    back = load_checkpoint(tmp_path / "student")
    solver, nfe, _ = back.sampling_defaults()
    assert (solver, nfe, back.default_spacing()) == ("consistency", 2, "trailing")
    assert back.meta["distill"]["nfe"] == 2
    x = sample_all(back.denoiser(), (1, 16, 16), SampleConfig(solver, nfe, n=3, spacing=back.default_spacing()))
    assert torch.isfinite(x).all()


def test_the_gan_discriminator_learns_to_tell_real_images_from_generated_ones(tiny_ckpt):
    """DMD2's GAN term: fake-network updates with gan_d > 0 train the bottleneck head to give real
    images (here all +0.8) higher logits than the generator's samples (here N(0, 0.3²)) at the same t."""
    loss = _loss(tiny_ckpt, reg=0.0, gan=1e-3, gan_d=1.0, fake_lr=1e-3)
    g = torch.Generator().manual_seed(0)
    real = torch.full((8, 1, 16, 16), 0.8)
    gen = 0.3 * torch.randn(8, 1, 16, 16, generator=g)

    def margin():
        t = torch.full((8,), 50.0)
        with torch.no_grad():
            gt = torch.Generator().manual_seed(9)
            r = loss.logits(q_sample(SCHED, real, t, torch.randn(real.shape, generator=gt)), t)
            f = loss.logits(q_sample(SCHED, gen, t, torch.randn(gen.shape, generator=gt)), t)
        return (r - f).mean().item()

    before = margin()
    for _ in range(30):
        loss._fake_update(gen, real, g)
    assert margin() > before + 1.0


def test_the_gan_term_trains_the_generator_only_through_the_frozen_discriminator(tiny_ckpt):
    """The generator's GAN loss reaches every generator weight, leaves no gradient on the fake network or
    the head, and adds gan·softplus(−D) on top of the DM term (gan_d = 0: the fake update is unchanged)."""
    student = Denoiser(copy.deepcopy(tiny_ckpt.net).train(), SCHED, tiny_ckpt.parameterization)
    x0 = torch.zeros(4, 1, 16, 16)
    values = {}
    for w in (1e-3, 1.0, 2.0):
        loss = _loss(tiny_ckpt, reg=0.0, gan=w, gan_d=0.0)
        torch.manual_seed(0)
        loss.head.load_state_dict(BottleneckHead(loss.head.body[0].in_channels).state_dict())
        student.net.zero_grad(set_to_none=True)
        value = loss(student, x0, torch.Generator().manual_seed(1))
        for p in [*loss.fake.net.parameters(), *loss.head.parameters()]:
            p.grad = None
        value.backward()
        assert all(p.grad is None for p in [*loss.fake.net.parameters(), *loss.head.parameters()])
        assert all(p.requires_grad for p in [*loss.fake.net.parameters(), *loss.head.parameters()])
        assert all(p.grad is not None for p in student.net.parameters() if p.requires_grad)
        values[w] = value.item()
    # the same draws for every weight, the GAN's own last: the loss is DM + gan·softplus(−D), linear in gan
    per_unit = values[2.0] - values[1.0]
    assert per_unit > 0
    assert values[1.0] - values[1e-3] == pytest.approx((1 - 1e-3) * per_unit, rel=1e-4)


def test_the_gan_state_round_trips_and_bad_gan_settings_are_user_errors(tiny_ckpt):
    loss = _loss(tiny_ckpt, gan=1e-3, fake_steps=2)
    student = Denoiser(copy.deepcopy(tiny_ckpt.net).train(), SCHED, tiny_ckpt.parameterization)
    loss(student, torch.full((4, 1, 16, 16), 0.5), torch.Generator().manual_seed(1))
    fresh = _loss(tiny_ckpt, gan=1e-3, fake_steps=2)
    fresh.load_state_dict(loss.state_dict())
    for (k, a), b in zip(loss.head.state_dict().items(), fresh.head.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(k.startswith("head.") for k in loss.state_dict())
    assert not any(k.startswith("head.") for k in _loss(tiny_ckpt).state_dict())  # gan = 0: no head at all
    for kw in ({"gan": -1.0}, {"gan_d": -1.0}, {"gan": 1e-3, "dm": 0.0}):
        with pytest.raises(UserError):
            bind(DMDConfig, kw, "dmd")
    with pytest.raises(UserError, match="mid_block"):
        bottleneck(torch.nn.Conv2d(1, 1, 1))
