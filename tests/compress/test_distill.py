"""Distillation: the PD target, SVD / LoRA surgery, the KD mix, one PD round, the recipe steps."""
import copy

import pytest
import torch

from leandiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from leandiff.compress import ddim, kd, lowrank, progressive
from leandiff.compress.kd import KDLoss
from leandiff.compress.training import Training
from leandiff.cost import count_params, macs_per_image
from leandiff.denoiser import Denoiser
from leandiff.errors import UserError
from leandiff.models import build_network, image_shape
from leandiff.recipe import RecipeError, apply_recipe, parse_recipe
from leandiff.sample import SampleConfig, sample_all


class _Oracle(torch.nn.Module):
    """An x₀-predicting "student" whose output is exactly the PD target x̃ for its (x_t, t)."""

    def __init__(self, teacher, n, spacing, clip):
        super().__init__()
        self.teacher, self.clip = teacher, clip
        self.ts, self.tt = progressive.pd_timesteps(teacher.schedule, n, spacing)

    def forward(self, x, t):
        i = int((self.ts[:-1] == int(t[0])).nonzero()[0])
        full = lambda v: torch.full((x.shape[0],), int(v))  # noqa: E731
        return progressive.pd_target(self.teacher, x, full(self.ts[i]), full(self.tt[2 * i + 1]), full(self.ts[i + 1]),
                                 self.clip)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("clip", [False, True])
def test_student_outputting_pd_target_reproduces_teacher_ddim(tiny_ckpt, n, clip):
    """One student DDIM step with x̂ = x̃ lands exactly where two teacher DDIM steps land, and the
    timesteps PD trains on are those of leandiff's ddim solver at the student's NFE (spacing trailing):
    sampling the oracle student with the eval path's SampleConfig at NFE n equals the teacher at 2n."""
    teacher = tiny_ckpt.denoiser()
    student = Denoiser(_Oracle(teacher, n, "trailing", clip), tiny_ckpt.schedule, "x0")
    shape = image_shape(tiny_ckpt.arch)
    x_s = sample_all(student, shape, SampleConfig("ddim", n, spacing="trailing", n=6, seed=3, clip_x0=clip))
    # With clipping the teacher's steps are DDIM with consistent clipping, i.e. the euler solver.
    x_t = sample_all(teacher, shape, SampleConfig("euler" if clip else "ddim", 2 * n, spacing="trailing", n=6,
                                                  seed=3, clip_x0=clip))
    scale = x_t.abs().max().item()
    assert torch.allclose(x_s, x_t, atol=1e-4 * max(1.0, scale), rtol=1e-4), (x_s - x_t).abs().max()
    assert student.nfe == n


def test_clipped_pd_target_is_a_convex_combination_in_range(tiny_ckpt):
    """With clipping, x̃ lies in [-1, 1] even where the ε teacher's own x̂₀ is far outside it (t = T-1)."""
    teacher = tiny_ckpt.denoiser()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    ts, tt = progressive.pd_timesteps(tiny_ckpt.schedule, 4)
    full = lambda v: torch.full((8,), int(v))  # noqa: E731
    assert teacher.x0(x, full(ts[0])).abs().max() > 2  # the unclipped prediction is out of range here
    for i in range(4):
        tgt = progressive.pd_target(teacher, x, full(ts[i]), full(tt[2 * i + 1]), full(ts[i + 1]), clip_x0=True)
        assert tgt.abs().max() <= 1 + 1e-4


def test_pd_target_closed_form_single_step(tiny_ckpt):
    """x̃ inverts the DDIM step: α_{t''} x̃ + σ_{t''}(x_t − α_t x̃)/σ_t = the teacher's x_{t''}."""
    teacher = tiny_ckpt.denoiser()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 16, 16, generator=g)
    t, tm, tn = (torch.full((5,), v) for v in (749, 624, 499))
    target = progressive.pd_target(teacher, x, t, tm, tn, clip_x0=False)
    two = ddim.ddim_to(teacher, ddim.ddim_to(teacher, x, t, tm, False), tm, tn, False)
    a_t, s_t = ddim.coef(teacher.schedule, t, 4)
    a_n, s_n = ddim.coef(teacher.schedule, tn, 4)
    one = a_n * target + s_n * (x - a_t * target) / s_t
    assert torch.allclose(one, two, atol=1e-4)


def test_leading_spacing_is_not_nested_for_pd(tiny_ckpt):
    with pytest.raises(UserError, match="not nested"):
        progressive.pd_timesteps(tiny_ckpt.schedule, 4, "leading")
    ts, tt = progressive.pd_timesteps(tiny_ckpt.schedule, 8, "trailing")
    assert ts[0] == tiny_ckpt.schedule.T - 1 and ts[-1] == -1 and torch.equal(tt[::2], ts)


def _out(net, x, t):
    with torch.no_grad():
        return net(x, t).sample


def test_full_rank_svd_reproduces_network(tiny_ckpt):
    net = copy.deepcopy(tiny_ckpt.net)
    ranks = lowrank.lowrank_factorize(net, 1, only_if_smaller=False)
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in tiny_ckpt.net.modules())
    assert len(ranks) == n_layers  # every layer was replaced by a factor pair
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 400, 990])
    assert torch.allclose(_out(net, x, t), _out(tiny_ckpt.net, x, t), atol=1e-4)


def test_lowrank_shrinks_and_reloads_from_metadata(tiny_ckpt, tmp_path):
    ck = lowrank.lowrank_step(tiny_ckpt, lowrank.LowRankConfig(r=2.0, train=Training(steps=0, batch_size=8)), None)
    shape = image_shape(tiny_ckpt.arch)
    assert count_params(ck.net)["params"] < count_params(tiny_ckpt.net)["params"]
    assert macs_per_image(ck.net, shape) < macs_per_image(tiny_ckpt.net, shape)
    rec = ck.arch["surgery"][-1]
    assert rec["kind"] == "lowrank" and all(1 <= k for k in rec["layers"].values())
    save_checkpoint(ck, tmp_path / "lr")
    back = load_checkpoint(tmp_path / "lr")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    assert torch.equal(_out(back.net, x, t), _out(ck.net, x, t))
    assert tiny_ckpt.arch.get("surgery") is None  # the input checkpoint is untouched


def test_lora_starts_as_identity_merges_exactly_and_trains_only_adapters(tiny_ckpt):
    net = copy.deepcopy(tiny_ckpt.net)
    ranks = lowrank.add_lora(net, 2)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    assert torch.allclose(_out(net, x, t), _out(tiny_ckpt.net, x, t), atol=1e-6)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".down." in n or ".up." in n for n in trainable)
    with torch.no_grad():  # pretend training moved the adapters
        for m in net.modules():
            if isinstance(m, lowrank.LoRA):
                m.up.weight.normal_(0, 0.05)
    moved = _out(net, x, t)
    assert not torch.allclose(moved, _out(tiny_ckpt.net, x, t), atol=1e-4)
    arch = {**tiny_ckpt.arch, "surgery": [{"kind": "lora", "layers": ranks}]}
    rebuilt = build_network(arch)
    rebuilt.load_state_dict(net.state_dict())
    assert torch.allclose(_out(rebuilt, x, t), moved, atol=1e-6)
    merged = lowrank.merge_lora(net)
    assert count_params(merged)["params"] == count_params(tiny_ckpt.net)["params"]
    assert torch.allclose(_out(merged, x, t), moved, atol=1e-4)


@pytest.mark.parametrize("student_param", ["eps", "v"])
def test_kd_loss_mixes_its_two_terms(tiny_ckpt, student_param):
    torch.manual_seed(5)
    other = build_network(tiny_ckpt.arch).eval()
    student = Denoiser(other, tiny_ckpt.schedule, student_param)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1

    def loss(f):
        return KDLoss(tiny_ckpt.denoiser(), f)(student, x0, torch.Generator().manual_seed(9)).item()

    l_data, l_teacher = loss(0.0), loss(1.0)
    assert abs(l_data - l_teacher) > 1e-6  # the two terms differ, so the mix is visible
    for f in (0.3, 0.7):
        assert loss(f) == pytest.approx(f * l_teacher + (1 - f) * l_data, rel=1e-5)


def test_narrow_arch_divides_channels_and_fixes_groups():
    arch = {"type": "diffusers.UNet2DModel", "config": {"block_out_channels": [16, 32, 80], "norm_num_groups": 8}}
    assert kd.narrow_arch(arch, 2)["config"]["block_out_channels"] == [8, 16, 40]
    four = kd.narrow_arch(arch, 4)["config"]
    assert four["block_out_channels"] == [4, 8, 20] and four["norm_num_groups"] == 4
    with pytest.raises(UserError, match="does not divide"):
        kd.narrow_arch(arch, 3)


def test_lora_rank_factor_zero_is_a_user_error(tiny_ckpt):
    with pytest.raises(UserError, match="r must be >= 1"):
        lowrank.add_lora(copy.deepcopy(tiny_ckpt.net), 0.0)


def test_pd_round_lowers_the_distillation_loss_and_records_its_sampler(tiny_ckpt, image_folder, tmp_path):
    ds = f"folder:{image_folder}"
    cfg = progressive.PDConfig(n_from=4, to=2, convert_steps=5,
                               train=Training(steps=40, batch_size=16, lr=2e-3, ema_decay=0.0))
    out = progressive.progressive_distill(tiny_ckpt, tmp_path / "pd", cfg, dataset=ds, log=lambda s: None,
                                          progress=False)
    assert out.parameterization == "v"
    assert out.meta["sampler"] == {"solver": "ddim", "nfe": 2, "spacing": "trailing"}
    start = load_checkpoint(tmp_path / "pd" / "convert")
    loss = progressive.PDLoss(tiny_ckpt.denoiser(), 2)
    from leandiff.data import load_dataset

    x0 = load_dataset(ds, "train", shape=(1, 16, 16)).images[:32]

    def mean_loss(ck):
        with torch.no_grad():
            return sum(loss(ck.denoiser(), x0, torch.Generator().manual_seed(s)).item() for s in range(4)) / 4

    reloaded = load_checkpoint(tmp_path / "pd" / "round-0002")
    assert reloaded.meta["sampler"]["nfe"] == 2 and reloaded.sampling_defaults()[:2] == ("ddim", 2)
    rec = reloaded.lineage[-1]  # a round names the recipe that makes exactly it, and the teacher it came from
    assert rec["step"] == "pd" and rec["args"]["to"] == 2 and rec["parent"] == tiny_ckpt.hash()
    assert rec["recipe"].startswith("pd(") and "to=2" in rec["recipe"] and "from=4" in rec["recipe"]
    assert mean_loss(reloaded) < 0.9 * mean_loss(start)


def test_kd_recipe_builds_a_narrower_student_that_reloads(tiny_ckpt, image_folder, tmp_path):
    src = tmp_path / "teacher"
    save_checkpoint(tiny_ckpt, src)
    ck = apply_recipe(load_checkpoint(src), "kd(s=2,steps=3,batch_size=8,bf16=false)", tmp_path / "out",
                      dataset=f"folder:{image_folder}", progress=False, log=lambda s: None)
    assert ck.arch["config"]["block_out_channels"] == [4, 8]
    assert count_params(ck.net)["params"] < count_params(tiny_ckpt.net)["params"] / 2
    assert ck.lineage[-1]["step"] == "kd"


def test_oneshot_student_is_one_step(tiny_ckpt, image_folder, tmp_path):
    cfg = progressive.OneShotConfig(teacher_nfe=3, pairs=16, convert_steps=2, train=Training(steps=3, batch_size=8))
    out = progressive.oneshot_distill(tiny_ckpt, tmp_path / "os", cfg, dataset=f"folder:{image_folder}", progress=False)
    assert out.meta["sampler"]["nfe"] == 1 and out.parameterization == "v"
    x = sample_all(out.denoiser(), (1, 16, 16), SampleConfig("ddim", 1, spacing="trailing", n=4))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("recipe", ["kd(s=1,steps=3,batch_size=8,bf16=false)",
                                    "lowrank(r=2) > kd(steps=3,batch_size=8,bf16=false)",
                                    "finetune(kd=true,steps=3,batch_size=8,bf16=false)",
                                    "lora(r=2,steps=3,batch_size=8,bf16=false)"])
def test_kd_steps_train_the_student_and_leave_the_teacher_untouched(tiny_ckpt, image_folder, tmp_path, recipe):
    """Issue 19's reproductions: KD as a recipe's first step (the teacher is the student's own network)
    trains the student, not a frozen alias of it, and kd after a surgery distils into the checkpoint as
    it is (s defaults to 1). One teacher resolver serves every KD-using step."""
    src = tmp_path / "teacher"
    save_checkpoint(tiny_ckpt, src)
    before = {k: v.clone() for k, v in tiny_ckpt.net.state_dict().items()}
    start = load_checkpoint(src)
    ck = apply_recipe(start, recipe, tmp_path / "out", dataset=f"folder:{image_folder}", progress=False,
                      log=lambda s: None)
    assert ck.lineage[-1]["step"] == recipe.split(" > ")[-1].split("(")[0]
    if recipe.startswith("lowrank"):
        assert any(r.get("kind") == "lowrank" for r in ck.arch.get("surgery", []))
    else:
        changed = [k for k, v in ck.net.state_dict().items() if k in before and not torch.equal(v, before[k])]
        assert changed, "the student did not train"
    assert all(torch.equal(v, before[k]) for k, v in load_checkpoint(src).net.state_dict().items())


def test_kd_defaults_to_the_checkpoint_as_it_is():
    (st,) = parse_recipe("kd(steps=5)")
    assert st.args["s"] == 1


def test_lora_adapters_are_drawn_from_the_seed(tiny_ckpt):
    """The adapters' initial weights come from the step's seed, not the process's global RNG: the same
    recipe and seed give the same LoRA student (it once differed from run to run)."""
    def downs(seed, global_seed):
        net = copy.deepcopy(tiny_ckpt.net)
        torch.manual_seed(global_seed)  # must not matter
        lowrank.add_lora(net, 2.0, seed=seed)
        return [m.down.weight.clone() for m in net.modules() if isinstance(m, lowrank.LoRA)]

    a, b, c = downs(0, 1), downs(0, 2), downs(1, 1)
    assert a and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
