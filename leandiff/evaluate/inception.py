"""Standard Inception FID (Heusel et al. 2017) through torchmetrics + torch-fidelity — only when
torch-fidelity and its Inception weights are already on this machine. leandiff never downloads
them: without them the metric is skipped with a message saying why.
"""
from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception


def weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def availability() -> tuple[bool, str]:
    """(available, reason-if-not)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False, "Inception FID skipped: torch-fidelity is not installed (pip install leandiff[inception])"
    if not weights_path().is_file():
        return False, f"Inception FID skipped: Inception weights not found at {weights_path()} (nothing is downloaded)"
    return True, ""


class InceptionFID:
    """Streaming Inception FID: ``add_real`` / ``add_fake`` batches in [-1, 1], then ``compute()``."""

    def __init__(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path()))
        self.metric.set_dtype(torch.float64)

    @staticmethod
    def _rgb01(x: torch.Tensor) -> torch.Tensor:
        x = (x.clamp(-1, 1) + 1) / 2
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def add_real(self, x: torch.Tensor) -> None:
        self.metric.update(self._rgb01(x), real=True)

    def add_fake(self, x: torch.Tensor) -> None:
        self.metric.update(self._rgb01(x), real=False)

    def compute(self) -> float:
        return float(self.metric.compute())
