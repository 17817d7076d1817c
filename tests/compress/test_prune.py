"""Pruning: structured shapes/params/MACs and exact reload, Diff-Pruning's truncation, unstructured
masks and sparse sizes, the real configs (mnist-tiny, cifar10-ddpm), the recipe step."""
import math

import pytest
import torch

from leandiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from leandiff.compress import prune
from leandiff.compress.prune import PruneConfig, accumulate_gradients, prune_checkpoint, sparse_bytes
from leandiff.cost import count_params, macs_per_image
from leandiff.errors import UserError
from leandiff.models import architecture, build_network, image_shape
from leandiff.recipe import apply_recipe, parse_recipe
from leandiff.schedule import Schedule

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
T = torch.tensor([3, 700])


def _images(n=16):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1


def _out(net, x=X, t=T):
    with torch.no_grad():
        return net(x, t).sample


@pytest.mark.parametrize("method", sorted(prune.IMPORTANCE))
def test_structured_prune_keeps_output_shape_and_shrinks(tiny_ckpt, method):
    cfg = PruneConfig(method, 0.5, t_stride=100, batch_size=4, min_group_channels=0)  # every layer halves
    out = prune_checkpoint(tiny_ckpt, cfg, _images())
    shape = image_shape(tiny_ckpt.arch)
    assert _out(out.net).shape == _out(tiny_ckpt.net).shape
    p0, p1 = count_params(tiny_ckpt.net)["params"], count_params(out.net)["params"]
    m0, m1 = macs_per_image(tiny_ckpt.net, shape), macs_per_image(out.net, shape)
    # halving both sides of most convs keeps about a quarter; kept layers (conv_out, time MLP) and
    # the input conv's 1 channel keep a little more
    assert 0.15 < p1 / p0 < 0.45 and 0.15 < m1 / m0 < 0.45
    # the output conv is never pruned (its outputs are the image channels; its inputs follow the last block)
    assert out.net.conv_out.out_channels == tiny_ckpt.net.conv_out.out_channels
    for n, p in tiny_ckpt.net.time_embedding.named_parameters():  # time-embedding MLP kept by default
        assert out.net.time_embedding.get_parameter(n).shape == p.shape
    assert out.meta["prune"]["method"] == method
    assert out.arch["surgery"][-1]["kind"] == "prune"
    assert tiny_ckpt.net.conv_in.weight.shape[0] == 8  # the input checkpoint is untouched


def _group_widths(net) -> list[tuple[int, int]]:
    return [(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]


def test_group_norm_floor_keeps_two_channels_a_group(tiny_ckpt, tmp_path):
    """GroupNorm(4) on 8 channels has 2 a group: without the floor p = 0.5 leaves 1 (an instance norm);
    with the default floor those norms keep 2 a group, the others are pruned as asked, and it reloads."""
    bare = prune_checkpoint(tiny_ckpt, PruneConfig("magnitude", 0.5, min_group_channels=0))
    assert min(c // g for c, g in _group_widths(bare.net)) == 1
    assert bare.meta["prune"]["protected_norms"] == {}
    out = prune_checkpoint(tiny_ckpt, PruneConfig("magnitude", 0.5))
    before = dict(zip([n for n, m in tiny_ckpt.net.named_modules() if isinstance(m, torch.nn.GroupNorm)],
                      _group_widths(tiny_ckpt.net)))
    after = dict(zip([n for n, m in out.net.named_modules() if isinstance(m, torch.nn.GroupNorm)],
                     _group_widths(out.net)))
    for name, (c, g) in after.items():
        assert c // g >= min(2, before[name][0] // g), (name, c, g)
    protected = out.meta["prune"]["protected_norms"]
    assert protected and all(before[n][0] // before[n][1] == 2 for n in protected)
    assert "down_blocks.0.resnets.0.norm1" in protected
    # the 16-channel level is still pruned (4 a group -> 2), so the network did shrink
    assert count_params(out.net)["params"] < count_params(tiny_ckpt.net)["params"]
    assert out.net.down_blocks[1].resnets[0].norm2.num_channels == 8
    save_checkpoint(out, tmp_path / "p")
    assert torch.equal(_out(load_checkpoint(tmp_path / "p").net), _out(out.net))
    with pytest.raises(UserError, match="min_group_channels"):
        PruneConfig("magnitude", 0.5, min_group_channels=-1)
    assert parse_recipe("prune(method=magnitude,ratio=0.3,min_group_channels=0)")[0].args["min_group_channels"] == 0


def test_include_time_prunes_the_time_embedding(tiny_ckpt):
    out = prune_checkpoint(tiny_ckpt, PruneConfig("magnitude", 0.5, include_time=True))
    before = tiny_ckpt.net.time_embedding.linear_1.out_features
    assert out.net.time_embedding.linear_1.out_features < before
    assert _out(out.net).shape == X.shape


@pytest.mark.parametrize("method", ["magnitude", "diff"])
def test_pruned_checkpoint_reloads_exactly_from_its_own_metadata(tiny_ckpt, tmp_path, method):
    out = prune_checkpoint(tiny_ckpt, PruneConfig(method, 0.5, t_stride=100, batch_size=4), _images())
    save_checkpoint(out, tmp_path / "p")
    back = load_checkpoint(tmp_path / "p")
    assert back.hash() == out.hash()
    assert torch.equal(_out(back.net), _out(out.net))
    # the architecture record alone rebuilds the same shapes (no original config, no weights)
    fresh = build_network(back.arch)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in out.net.state_dict().items()}
    # pruning twice stacks two records that replay in order
    twice = prune_checkpoint(back, PruneConfig("magnitude", 0.3))
    save_checkpoint(twice, tmp_path / "q")
    assert len(twice.arch["surgery"]) == 2
    assert torch.equal(_out(load_checkpoint(tmp_path / "q").net), _out(twice.net))


def test_structured_prune_is_seeded(tiny_ckpt):
    a = prune_checkpoint(tiny_ckpt, PruneConfig("random", 0.5, seed=3))
    b = prune_checkpoint(tiny_ckpt, PruneConfig("random", 0.5, seed=3))
    c = prune_checkpoint(tiny_ckpt, PruneConfig("random", 0.5, seed=4))
    assert a.hash() == b.hash() and a.hash() != c.hash()


def test_magnitude_importance_keeps_the_larger_channels(tiny_ckpt):
    # conv_in's 8 channels feed GroupNorms of 4 groups of 2 channels; Torch-Pruning removes the same
    # in-group positions from every group (scores averaged over the groups), so every group stays
    # whole. Make position 0 of each group dominant: exactly those channels must survive.
    net = tiny_ckpt.net
    big = [0, 2, 4, 6]
    with torch.no_grad():
        net.conv_in.weight[big] *= 100
    out = prune_checkpoint(tiny_ckpt, PruneConfig("magnitude", 0.5, norm=1, min_group_channels=0))
    assert out.net.conv_in.weight.shape[0] == 4
    assert torch.equal(out.net.conv_in.weight, net.conv_in.weight[big])


def test_attention_heads_stay_consistent():
    cfg = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=[16, 32],
               norm_num_groups=8, attention_head_dim=8, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
               up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    arch = {"type": "diffusers.UNet2DModel", "config": cfg}
    torch.manual_seed(0)
    ck = Checkpoint(net=build_network(arch).eval(), arch=arch, schedule=Schedule("linear"))
    out = prune_checkpoint(ck, PruneConfig("magnitude", 0.5))
    from diffusers.models.attention_processor import Attention

    attns = [m for m in out.net.modules() if isinstance(m, Attention)]
    assert attns
    for m in attns:
        assert m.heads == 4 and m.inner_dim == m.to_q.out_features < 32 and m.inner_dim % m.heads == 0
    assert _out(out.net).shape == X.shape
    fresh = build_network(out.arch).eval()
    fresh.load_state_dict(out.net.state_dict())  # strict: heads/inner_dim come back from the record
    assert torch.equal(_out(fresh), _out(out.net))


# --- Diff-Pruning truncation (MiniDiff Alg. 3) -----------------------------------------------------------------------

def _toy(losses):
    w = torch.nn.Parameter(torch.tensor(1.0))
    return w, (lambda t: losses[t] * w)  # L_t(w) = c_t · w: its gradient is c_t, its value c_t at w = 1


def test_diff_pruning_truncation_honours_the_threshold():
    losses = [0.5, 1.0, 0.75, 0.25, 0.0625, 0.5, 0.875]  # exact in binary: ratios compare exactly
    w, loss_at = _toy(losses)
    used, seen = accumulate_gradients(loss_at, range(len(losses)), threshold=0.1)
    assert used == [0, 1, 2, 3]  # L_4 / L_max = 0.0625 <= 0.1: stop before back-propagating it
    assert seen == losses[:4]
    assert w.grad.item() == sum(losses[:4])
    w, loss_at = _toy(losses)  # the boundary counts as reached (<=)
    assert accumulate_gradients(loss_at, range(len(losses)), threshold=0.25)[0] == [0, 1, 2]
    w, loss_at = _toy(losses)  # Taylor: no threshold, every timestep
    used, _ = accumulate_gradients(loss_at, range(len(losses)), threshold=None)
    assert used == list(range(len(losses))) and w.grad.item() == sum(losses)
    w, loss_at = _toy([1.0, 0.5, 0.875])  # L_max includes L_t itself: the first step always passes
    assert accumulate_gradients(loss_at, range(3), threshold=0.9)[0] == [0]


def test_diff_pruning_step_passes_its_threshold(tiny_ckpt, monkeypatch):
    # replace L_t by known values (times a factor that is exactly 1 and carries a gradient)
    losses = [1.0, 0.75, 0.5, 0.25, 0.125] + [0.0625] * 15

    def known(denoiser, x0, noise):
        def loss_at(t):
            s = sum(p.sum() for p in denoiser.net.parameters())
            return losses[t // 50] * (s / s.detach())
        return loss_at

    monkeypatch.setattr(prune, "_diffusion_loss_at", known)
    cfg = dict(t_stride=50, batch_size=4)
    for thr, n in [(0.3, 3), (0.25, 3), (0.1, 5), (0.05, 20)]:
        out = prune_checkpoint(tiny_ckpt, PruneConfig("diff", 0.5, threshold=thr, **cfg), _images())
        assert out.meta["prune"]["timesteps_used"] == n, thr
        assert out.meta["prune"]["t_last"] == 50 * (n - 1)
    taylor = prune_checkpoint(tiny_ckpt, PruneConfig("taylor", 0.5, **cfg), _images())
    assert taylor.meta["prune"]["timesteps_used"] == 20 and taylor.meta["prune"]["t_last"] == 950
    with pytest.raises(UserError, match="threshold"):
        PruneConfig("diff", 0.5, threshold=1.0)


# --- unstructured --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", prune.UNSTRUCTURED_METHODS)
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_unstructured_zeroes_the_fraction_and_keeps_the_network(tiny_ckpt, method, ratio):
    out = prune_checkpoint(tiny_ckpt, PruneConfig(method, ratio, structured=False))
    targets = prune.prunable_weights(out.net)
    orig = prune.prunable_weights(tiny_ckpt.net)
    zeros = {n: int((w == 0).sum()) for n, w in targets.items()}
    if method == "global":
        total = sum(w.numel() for w in targets.values())
        assert sum(zeros.values()) == math.floor(ratio * total)
        kept = torch.cat([w[w != 0].abs() for w in targets.values()])
        gone = torch.cat([orig[n][targets[n] == 0].abs() for n in targets])
        assert gone.max() <= kept.min()
    else:
        for n, w in targets.items():
            assert zeros[n] == math.floor(ratio * w.numel())
            if method == "l1" and 0 < zeros[n] < w.numel():
                assert orig[n][w == 0].abs().max() <= w[w != 0].abs().min()
    # the shapes, parameter count and MACs do not change; the output conv is untouched
    assert {k: v.shape for k, v in out.net.state_dict().items()} == {k: v.shape for k, v in tiny_ckpt.net.state_dict().items()}
    shape = image_shape(tiny_ckpt.arch)
    assert macs_per_image(out.net, shape) == macs_per_image(tiny_ckpt.net, shape)
    assert torch.equal(out.net.conv_out.weight, tiny_ckpt.net.conv_out.weight)
    rep = out.meta["prune"]
    assert rep["sparsity_prunable"] == pytest.approx(ratio, abs=0.01)
    assert rep["params_nonzero"] == count_params(out.net)["params_nonzero"]
    assert rep["bytes_bitmask"] < rep["bytes_dense"]


def test_sparse_bytes_of_a_known_matrix():
    w = torch.zeros(4, 300)  # 300 columns: column indices need 2 bytes
    w[0, 0] = w[1, 5] = w[3, 299] = 1.0
    b = sparse_bytes(w)
    assert b["nnz"] == 3 and b["dense"] == 4 * 1200
    assert b["csr"] == 3 * (4 + 2) + 4 * 5
    assert b["bitmask"] == 1200 // 8 + 3 * 4
    assert sparse_bytes(torch.ones(2, 3, 3, 3))["csr"] == 54 * 5 + 12  # 27 columns: 1-byte indices


# --- the real configurations (random weights, forward at batch 1) ----------------------------------------------------

@pytest.mark.parametrize("name,ratio", [("mnist-tiny", 0.5), ("cifar10-ddpm", 0.3)])
def test_prune_real_configs(name, ratio):
    arch = architecture(name)
    torch.manual_seed(0)
    ck = Checkpoint(net=build_network(arch).eval(), arch=arch, schedule=Schedule("linear"))
    shape = image_shape(arch)
    p0 = count_params(ck.net)["params"]
    out = prune_checkpoint(ck, PruneConfig("magnitude", ratio))
    x, t = torch.randn(1, *shape), torch.tensor([10])
    assert _out(out.net, x, t).shape == (1, *shape)
    p1 = count_params(out.net)["params"]
    assert p1 < (1 - ratio) ** 2 * p0 * 1.3  # about (1-p)² of the parameters remain
    fresh = build_network(out.arch).eval()
    fresh.load_state_dict(out.net.state_dict())  # strict: the record rebuilds every shape
    assert torch.equal(_out(fresh, x, t), _out(out.net, x, t))


# --- the recipe step ---------------------------------------------------------------------------------------------

def test_issue_recipes_parse_and_bad_ones_fail():
    steps = parse_recipe("prune(method=diff,ratio=0.5,threshold=0.05) > finetune(steps=20)")
    assert steps[0].args["ratio"] == 0.5 and steps[0].args["structured"] is True
    parse_recipe("prune(method=l1,ratio=0.3,structured=false) > finetune(steps=20,kd=true)")
    with pytest.raises(UserError, match="unknown structured method"):
        PruneConfig("l1", 0.3)
    with pytest.raises(UserError, match="unstructured"):
        PruneConfig("taylor", 0.3, structured=False)
    with pytest.raises(UserError, match=r"ratio must be in \(0, 1\)"):
        PruneConfig("magnitude", 1.0)
    with pytest.raises(UserError):
        parse_recipe("prune(ratio=0.5)")  # method is required
    # bad values fail when the recipe is parsed, before an earlier step has spent its time
    with pytest.raises(UserError, match=r"step prune \(position 22\): prune: unknown structured method 'foo'"):
        parse_recipe("finetune(steps=10) > prune(method=foo,ratio=0.3)")
    with pytest.raises(UserError, match="ratio must be in"):
        parse_recipe("prune(method=magnitude,ratio=1.5)")


def test_prune_then_finetune_recipe(tiny_ckpt, image_folder, tmp_path):
    src = tmp_path / "base"
    save_checkpoint(tiny_ckpt, src)
    ck = apply_recipe(load_checkpoint(src),
                      "prune(method=taylor,ratio=0.5,t_stride=200,batch_size=4) > finetune(steps=2,batch_size=4,kd=true,bf16=false)",
                      tmp_path / "out", dataset=f"folder:{image_folder}", progress=False, log=lambda s: None)
    assert [s["step"] for s in ck.lineage][-2:] == ["prune", "finetune"]
    assert count_params(ck.net)["params"] < count_params(tiny_ckpt.net)["params"] / 2
    assert _out(ck.net).shape == X.shape
    bare = load_checkpoint(src)
    bare.meta.pop("dataset", None)
    with pytest.raises(UserError, match="needs the training dataset"):
        apply_recipe(bare, "prune(method=diff,ratio=0.5)", tmp_path / "o2", progress=False, log=lambda s: None)


def test_kd_finetune_as_first_step_freezes_a_copy_not_the_student(tiny_ckpt, image_folder, tmp_path):
    # the recipe's origin is the student itself here: freezing it in place broke backward
    start = tiny_ckpt.hash()
    ck = apply_recipe(tiny_ckpt, "finetune(steps=1,batch_size=4,kd=true,bf16=false,ema_decay=0)", tmp_path / "o",
                      dataset=f"folder:{image_folder}", progress=False, log=lambda s: None)
    assert ck.hash() != start


def test_finetune_weighting_changes_the_loss_and_bad_combinations_fail_at_parse_time(tiny_ckpt, image_folder, tmp_path):
    runs = {}
    for w in ("plain", "snr+1"):
        ck = apply_recipe(tiny_ckpt, f"finetune(steps=2,batch_size=4,bf16=false,ema_decay=0,weighting={w})",
                          tmp_path / w, dataset=f"folder:{image_folder}", progress=False, log=lambda s: None)
        assert ck.lineage[-1]["args"]["weighting"] == w
        runs[w] = ck.hash()
    assert runs["plain"] != runs["snr+1"]  # same data, seed and steps: only the loss differs
    with pytest.raises(UserError, match="weighting must be one of"):
        parse_recipe("finetune(steps=2,weighting=snr)")
    with pytest.raises(UserError, match="KD mixes plain MSEs"):
        parse_recipe("prune(method=magnitude,ratio=0.3) > finetune(steps=2,kd=true,weighting=snr+1)")
    with pytest.raises(UserError, match="KD mixes plain MSEs"):
        parse_recipe("finetune(steps=2,kd=true,x0_weight=0.01)")
    with pytest.raises(UserError, match="x0_weight must be >= 0"):
        parse_recipe("finetune(steps=2,x0_weight=-1)")
    parse_recipe("finetune(steps=2,x0_weight=0.01)")


def test_kept_rows_finds_the_selected_channels():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 7, 3, 3, generator=g)
    rows, cols = torch.tensor([10, 2, 5, 7]), torch.tensor([6, 0, 3])
    assert prune.kept_rows(w, w[rows][:, cols]).tolist() == rows.tolist()
    with pytest.raises(RuntimeError, match="matches 0 rows"):
        prune.kept_rows(w, torch.randn(2, 3, 3, 3, generator=g))


def test_reconstruction_recovers_a_removed_channel_that_others_span():
    # a linear two-layer net whose hidden unit 3 is h0 + h1: removing it loses nothing the next layer
    # cannot get back from units 0 and 1, so the refit second layer reproduces the teacher exactly
    g = torch.Generator().manual_seed(4)
    teacher = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        teacher[0].weight[3] = teacher[0].weight[0] + teacher[0].weight[1]
        teacher[0].bias[3] = teacher[0].bias[0] + teacher[0].bias[1]
    student = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 3))
    with torch.no_grad():
        student[0].weight.copy_(teacher[0].weight[:3]), student[0].bias.copy_(teacher[0].bias[:3])
        student[1].weight.copy_(teacher[1].weight[:, :3]), student[1].bias.copy_(teacher[1].bias)
    batches = [(torch.randn(64, 5, generator=g),) for _ in range(3)]
    x = torch.randn(16, 5, generator=g)
    assert (student(x) - teacher(x)).abs().max() > 0.1  # plain channel removal is off
    errors = prune.reconstruct_layers(teacher, student, batches, ridge=1e-9)
    assert list(errors) == ["0", "1"]
    assert errors["0"][1] < 1e-12 and errors["1"][0] > 0.01 and errors["1"][1] < 1e-9
    torch.testing.assert_close(student(x), teacher(x), atol=1e-4, rtol=1e-4)


def test_prune_with_reconstruction_moves_the_pruned_net_towards_the_unpruned(tiny_ckpt):
    imgs = _images(32)
    cfg = dict(method="magnitude", ratio=0.5, min_group_channels=0)
    plain = prune_checkpoint(tiny_ckpt, PruneConfig(**cfg), imgs)
    refit = prune_checkpoint(tiny_ckpt, PruneConfig(**cfg, reconstruct=32), imgs)
    x, t = prune.calibration_batches(tiny_ckpt, imgs, PruneConfig(**cfg, reconstruct=32, seed=5))[0]  # other noise, t
    ref = _out(tiny_ckpt.net, x, t)
    err = lambda ck: float(((_out(ck.net, x, t) - ref) ** 2).mean())  # noqa: E731
    assert err(refit) < 0.5 * err(plain)
    rec = refit.meta["prune"]["reconstruct"]
    assert rec["samples"] == 32 and rec["rel_error_after"] < rec["rel_error_before"]
    assert [p.shape for p in refit.net.parameters()] == [p.shape for p in plain.net.parameters()]
    with pytest.raises(UserError, match="undo structured=false"):
        PruneConfig("l1", 0.3, structured=False, reconstruct=64)
    with pytest.raises(UserError, match="reconstruct must be"):
        parse_recipe("prune(method=magnitude,ratio=0.3,reconstruct=-1)")


def test_kept_channel_map_points_into_the_original_network_after_two_prunes(tiny_ckpt):
    once = prune_checkpoint(tiny_ckpt, PruneConfig("magnitude", 0.3, min_group_channels=0))
    twice = prune_checkpoint(once, PruneConfig("magnitude", 0.3, min_group_channels=0))
    kept, first = twice.meta["prune"]["kept"], once.meta["prune"]["kept"]
    full = dict(tiny_ckpt.net.named_modules())
    for name, m in twice.net.named_modules():  # a kept channel's bias is the original channel's, bit for bit
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
            torch.testing.assert_close(m.bias, full[name].bias[kept[name]], rtol=0, atol=0)
    assert any(len(kept[n]) < len(first[n]) < full[n].weight.shape[0] for n in kept)  # some layer shrank twice


def test_a_frozen_network_is_still_pruned(tiny_ckpt):
    tiny_ckpt.net.requires_grad_(False)  # as a KD teacher is left; Torch-Pruning traced nothing through it
    out = prune_checkpoint(tiny_ckpt, PruneConfig("magnitude", 0.5, min_group_channels=0))
    assert count_params(out.net)["params"] < count_params(tiny_ckpt.net)["params"] / 2


def test_feature_kd_finetune(tiny_ckpt, image_folder, tmp_path):
    from leandiff.compress.kd import feature_loss

    s = {"a": torch.ones(2, 2, 3, 3)}
    t = {"a": torch.cat([torch.ones(2, 1, 3, 3), 3 * torch.ones(2, 1, 3, 3), torch.ones(2, 1, 3, 3)], 1)}
    # kept channels 1 and 2 of the teacher: errors 2² and 0, teacher mean square (9 + 1) / 2
    assert float(feature_loss(s, t, {"a": [1, 2]})) == pytest.approx(2.0 / 5.0)
    ck = apply_recipe(tiny_ckpt, "prune(method=magnitude,ratio=0.5) > finetune(steps=2,batch_size=4,kd=true,"
                      "kd_frac=0,feat_weight=1,bf16=false)", tmp_path / "o", dataset=f"folder:{image_folder}",
                      progress=False, log=lambda s: None)
    assert ck.lineage[-1]["args"]["feat_weight"] == 1
    # the feature term: zero for the teacher against itself, positive for a pruned student
    from leandiff.compress.kd import KDLoss

    pruned = prune_checkpoint(tiny_ckpt, PruneConfig("magnitude", 0.5, min_group_channels=0))
    x0 = _images(4)

    def loss(student, feat_weight, kept):
        return float(KDLoss(tiny_ckpt.denoiser(), 0.0, feat_weight, kept)(student.denoiser(), x0, torch.Generator().manual_seed(0)).detach())

    same = prune.kept_channels(tiny_ckpt.net, tiny_ckpt.net)
    assert loss(tiny_ckpt, 1.0, same) == pytest.approx(loss(tiny_ckpt, 0.0, None), abs=1e-7)
    assert loss(pruned, 1.0, pruned.meta["prune"]["kept"]) > loss(pruned, 0.0, None) + 0.1
    with pytest.raises(UserError, match="needs kd=true"):
        parse_recipe("finetune(steps=2,feat_weight=1)")
    with pytest.raises(UserError, match="feat_weight must be >= 0"):
        parse_recipe("finetune(steps=2,kd=true,feat_weight=-1)")
    with pytest.raises(UserError, match="records none"):  # an unpruned student has no channel map
        apply_recipe(tiny_ckpt, "finetune(steps=2,batch_size=4,kd=true,feat_weight=1)", tmp_path / "o2",
                     dataset=f"folder:{image_folder}", progress=False, log=lambda s: None)


def test_reconstruction_after_unstructured_zeros_skips_tied_layers(tiny_ckpt):
    # zeros from unstructured pruning make rows tie: such layers drop out of the map instead of failing
    sparse = prune_checkpoint(tiny_ckpt, PruneConfig("global", 0.7, structured=False))
    out = prune_checkpoint(sparse, PruneConfig("magnitude", 0.5, min_group_channels=0, reconstruct=16), _images(16))
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in out.net.modules())
    assert 1 <= out.meta["prune"]["reconstruct"]["layers"] == len(out.meta["prune"]["kept"]) < layers
    assert _out(out.net).shape == X.shape and torch.isfinite(_out(out.net)).all()
