"""The one interface every sampler, metric and compression step sees.

A :class:`Denoiser` wraps a *network* — any callable ``(x, t) -> output`` (a diffusers
``UNet2DModel``, a plain ``nn.Module``, an ONNX Runtime session wrapper, a quantized or
pruned copy) — with the schedule and the network's parameterization, and converts the raw
output into ε, x̂₀ or v. Compression swaps ``denoiser.net``; nothing downstream changes.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .schedule import Schedule, alpha_sigma

PARAMETERIZATIONS = ("eps", "v", "x0")


def call_network(net, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Call ``net(x, t)`` and unwrap diffusers' ``UNet2DOutput``."""
    out = net(x, t)
    return out.sample if hasattr(out, "sample") else out


class Denoiser(nn.Module):
    """``D(x_t, t)`` with conversions between parameterizations (Salimans & Ho 2022, §4):

    with α = sqrt(ᾱ_t), σ = sqrt(1 - ᾱ_t) and x_t = α x₀ + σ ε,
    ε-prediction: x̂₀ = (x_t − σ ε̂)/α;  v = α ε − σ x₀, so x̂₀ = α x_t − σ v̂ and ε̂ = σ x_t + α v̂;
    x₀-prediction: ε̂ = (x_t − α x̂₀)/σ.

    ``nfe`` counts network evaluations (one per batch call), so solvers report what they spent.
    """

    def __init__(self, net, schedule: Schedule, parameterization: str = "eps"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise UserError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
        self.net = net
        self.schedule = schedule
        self.parameterization = parameterization
        self.nfe = 0

    def _coeffs(self, x: torch.Tensor, t: torch.Tensor):
        a, s = alpha_sigma(self.schedule, t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return a.to(x.dtype).reshape(shape), s.to(x.dtype).reshape(shape)

    def _t(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """The raw network output in its own parameterization."""
        self.nfe += 1
        return call_network(self.net, x, self._t(x, t).to(x.device))

    def predict(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂₀) from one network evaluation."""
        t = self._t(x, t)
        return self.convert(self(x, t), x, t)

    def convert(self, out: torch.Tensor, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂₀) from a raw network output ``out`` at (x_t, t)."""
        a, s = self._coeffs(x, self._t(x, t))
        if self.parameterization == "eps":
            return out, (x - s * out) / a
        if self.parameterization == "v":
            return s * x + a * out, a * x - s * out
        return (x - a * out) / s, out

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.predict(x, t)[0]

    def x0(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.predict(x, t)[1]

    def v(self, x: torch.Tensor, t) -> torch.Tensor:
        eps, x0 = self.predict(x, t)
        a, s = self._coeffs(x, self._t(x, t))
        return a * eps - s * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The training target in this denoiser's own parameterization for x_t = q_sample(x0, t, noise)."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x0
        a, s = self._coeffs(x0, self._t(x0, t))
        return a * noise - s * x0
