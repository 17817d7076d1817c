"""Cost measurements and the runtime registry (no timing asserts: only structure and exact counts)."""
import pytest
import torch
from torch import nn

from leandiff.cost import (LatencyConfig, PeakMemory, checkpoint_bytes, count_macs, count_params, machine_info,
                           macs_per_image, measure_latency)
from leandiff.errors import UserError


class HandNet(nn.Module):
    """conv 1→4 (3×3, pad 1) on 8×8, ReLU, conv 4→2 (1×1), flatten, linear 128→10; takes (x, t)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(2 * 8 * 8, 10)

    def forward(self, x, t):
        return self.fc(self.c2(torch.relu(self.c1(x))).flatten(1))


def test_macs_of_hand_countable_net_equal_hand_count():
    # c1: 8·8 outputs × 4 channels × (1·3·3) = 2304; c2: 8·8 × 2 × 4 = 512; fc: 128 × 10 = 1280.
    hand = 8 * 8 * 4 * 9 + 8 * 8 * 2 * 4 + 128 * 10
    assert macs_per_image(HandNet(), (1, 8, 8)) == hand == 4096
    net = HandNet()
    assert count_macs(net, torch.zeros(3, 1, 8, 8), None) == 3 * hand  # MACs scale with the batch


def test_count_params_total_and_nonzero():
    net = HandNet()
    total = (4 * 9 + 4) + (2 * 4 + 2) + (128 * 10 + 10)
    with torch.no_grad():
        net.fc.weight[:, :64] = 0
    assert count_params(net) == {"params": total, "params_nonzero": total - 10 * 64}


def test_latency_structure_for_alternating_rounds():
    nets = {"a": HandNet(), "b": HandNet()}
    res = measure_latency(nets, (1, 8, 8), LatencyConfig(batch_sizes=(1, 4), warmup=1, rounds=3, min_round_s=0.0))
    assert set(res) == {"a", "b"}
    for per in res.values():
        assert set(per) == {1, 4}
        for b, v in per.items():
            assert v["rounds"] == 3
            assert 0 < v["min_ms"] <= v["median_ms"] <= v["max_ms"]
            assert v["ms_per_image"] == pytest.approx(v["median_ms"] / b)
            assert v["images_per_s"] == pytest.approx(1e3 / v["ms_per_image"])


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(interval=0.001) as mem:
        x = torch.ones(40_000_000)  # 160 MB
        x += 1
        del x
    d = mem.as_dict()
    if mem.start_bytes is not None:  # Linux /proc
        assert d["rss_increase_mb"] >= 100
        assert d["peak_rss_mb"] >= d["rss_increase_mb"]
    assert d["process_peak_rss_mb"] > 0


def test_machine_info_fields():
    m = machine_info()
    assert {"platform", "cpu", "cpu_count", "torch", "torch_threads"} <= set(m)


def _tiny_checkpoint():
    from leandiff.checkpoint import Checkpoint
    from leandiff.models import UNET, build_network
    from leandiff.schedule import Schedule

    arch = {"type": UNET, "config": dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                         block_out_channels=[8, 16], norm_num_groups=4,
                                         down_block_types=["DownBlock2D", "DownBlock2D"],
                                         up_block_types=["UpBlock2D", "UpBlock2D"])}
    torch.manual_seed(0)
    return Checkpoint(net=build_network(arch), arch=arch, schedule=Schedule("linear", 100), meta={"dataset": "mnist"})


def test_checkpoint_bytes_is_the_weights_file_size(tmp_path):
    from leandiff.checkpoint import save_checkpoint

    ck = _tiny_checkpoint()
    in_memory = checkpoint_bytes(ck)
    save_checkpoint(ck, tmp_path / "ck")
    on_disk = (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert checkpoint_bytes(ck) == on_disk
    assert in_memory > 0.9 * on_disk  # the on-disk header also holds the JSON record


def test_runtime_registry():
    from leandiff.runtime import RUNTIMES, get_runtime, register_runtime, runtime_denoiser, runtime_network

    assert {"eager", "bf16"} <= set(RUNTIMES)
    with pytest.raises(UserError, match="unknown runtime 'nope'; known: bf16, cache, .*eager"):
        get_runtime("nope")
    ck = _tiny_checkpoint()
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 50)
    with torch.no_grad():
        ref = runtime_network(ck, "eager")(x, t).sample
        low = runtime_network(ck, "bf16")(x, t)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 has ~3 significant digits
    d = runtime_denoiser(ck, "bf16")
    assert d.schedule == ck.schedule and d.parameterization == "eps"

    def half(ck):
        return ck.net
    register_runtime("test-half", half, "a test runtime")
    try:
        assert get_runtime("test-half").description == "a test runtime"
        with pytest.raises(ValueError):
            register_runtime("test-half", lambda ck: ck.net)
    finally:
        RUNTIMES.pop("test-half")


def test_nonzero_macs_count_what_unstructured_pruning_removes():
    """Zeroing half of one conv's weights removes half of that conv's MACs and nothing else."""
    from torch import nn

    from leandiff.cost import macs_per_image, macs_per_image_nonzero

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

        def forward(self, x, t):
            return self.b(self.a(x))

    net = Net()
    assert macs_per_image_nonzero(net, (1, 8, 8)) == macs_per_image(net, (1, 8, 8))
    with torch.no_grad():
        net.a.weight.view(-1)[:18] = 0  # 18 of 36 weights
    dense = macs_per_image(net, (1, 8, 8))
    assert dense == 8 * 8 * (36 + 8)
    assert macs_per_image_nonzero(net, (1, 8, 8)) == dense - 8 * 8 * 18
