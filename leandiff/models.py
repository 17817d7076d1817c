"""Named network configurations built on diffusers' ``UNet2DModel``, and the builder that turns
an architecture description (plain JSON data) back into a network.

Measured here (2 cores, fp32 eager, batch 64; ``leandiff info`` prints the first two):

| name | params | MAC/image | use |
|---|---|---|---|
| ``mnist-tiny`` | 0.96 M | 0.089 G | 1000-step reference runs on 2,048 images in well under an hour |
| ``mnist-small`` | 2.7 M | 0.29 G | the DESIGN's 28×28 model |
| ``cifar10-ddpm`` | 35.7 M | 6.05 G | the DDPM CIFAR-10 network (Ho et al. 2020), as in ``google/ddpm-cifar10-32`` |
"""
from __future__ import annotations

import copy

from torch import nn

from .errors import UserError
from .surgery import SURGERY

_MNIST_BLOCKS = dict(
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),  # attention at 7×7 only
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)

# Each entry is the keyword set of ``UNet2DModel``; nothing else is needed to rebuild it.
MODEL_CONFIGS: dict[str, dict] = {
    "mnist-tiny": dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32, 80), norm_num_groups=8, attention_head_dim=None,
                       **_MNIST_BLOCKS),
    "mnist-small": dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(32, 64, 128), norm_num_groups=8, attention_head_dim=None,
                        **_MNIST_BLOCKS),
    # DDPM CIFAR-10 (Ho et al. 2020, App. B): ch 128, multipliers (1, 2, 2, 2), 2 res blocks,
    # attention at 16×16, dropout 0.1 in training; the layout of google/ddpm-cifar10-32.
    "cifar10-ddpm": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                         block_out_channels=(128, 256, 256, 256), norm_num_groups=32, norm_eps=1e-6,
                         attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                         dropout=0.1,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}

UNET = "diffusers.UNet2DModel"


def architecture(name: str) -> dict:
    """The architecture record of a named config, or of a JSON file holding ``UNet2DModel``
    keyword arguments (a diffusers ``config.json`` works), as stored in checkpoints."""
    if name.endswith(".json"):
        from .io import read_json

        cfg = {k: v for k, v in read_json(name).items() if not k.startswith("_")}
        build_network({"type": UNET, "config": cfg})  # fail now, with a clear line, if it cannot build
        return {"type": UNET, "config": cfg}
    if name not in MODEL_CONFIGS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_CONFIGS[name].items()}
    return {"type": UNET, "config": cfg}


def build_network(arch: dict) -> nn.Module:
    """Rebuild a network from its architecture record (data only, never code)."""
    if not isinstance(arch, dict) or arch.get("type") != UNET or not isinstance(arch.get("config"), dict):
        raise UserError(f"unsupported architecture record: expected type {UNET!r} with a config, got {str(arch)[:120]}")
    from diffusers import UNet2DModel

    cfg = copy.deepcopy(arch["config"])
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # diffusers' bookkeeping keys
    try:
        net = UNet2DModel(**cfg)
    except Exception as e:  # a stored config is data: whatever diffusers trips over, the config is at fault
        raise UserError(f"cannot build UNet2DModel from the stored config: {type(e).__name__}: {e}") from None
    surgery = arch.get("surgery", [])
    if not isinstance(surgery, list):
        raise UserError("architecture record: 'surgery' must be a list of {kind: ...} records")
    for rec in surgery:  # pruned widths, low-rank factors, ...: applied in the order they were made
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind not in SURGERY:
            raise UserError(f"architecture record: unknown surgery kind {kind!r}; known: {', '.join(sorted(SURGERY))}")
        try:
            net = SURGERY[kind](net, rec)
        except UserError:
            raise
        except Exception as e:  # a malformed record (wrong shapes, missing keys) is bad data, not a bug
            raise UserError(f"architecture record: cannot replay {kind} surgery: {type(e).__name__}: {e}") from None
    return net


def image_shape(arch: dict) -> tuple[int, int, int]:
    """(C, H, W) the network expects."""
    cfg = arch["config"]
    size = cfg.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.get("in_channels", 3)), int(h), int(w)
