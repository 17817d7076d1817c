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

PARAMETERIZATIONS = ("eps", "v", "x0", "edm", "cm")
EDM_SIGMA_DATA = 0.5  # Karras et al. 2022, Table 1 (data in [-1, 1])
# the settings each preconditioned parameterization takes, with their defaults
SETTINGS = {"edm": {"sigma_data": EDM_SIGMA_DATA},
            # consistency models (Song et al. 2023, App. C): EDM's c_in with a boundary at sigma_min
            "cm": {"sigma_data": EDM_SIGMA_DATA, "sigma_min": 0.002}}
# a consistency model may wrap a network that keeps another parameterization (``cm(...,base=v)``):
# f = c_skip·x̄ + (1 − c_skip)·x̂₀ of that parameterization (see :func:`cm_base_skip`)
CM_BASES = ("eps", "v", "x0", "edm")


def parse_parameterization(p: str) -> tuple[str, dict]:
    """``eps`` | ``v`` | ``x0`` | ``edm`` | ``edm(sigma_data=S)`` | ``cm(sigma_data=S,sigma_min=M[,base=B])``
    -> (kind, settings with defaults filled; a cm's ``base`` only when given)."""
    if not isinstance(p, str):
        raise UserError(f"parameterization must be a string, got {p!r}")
    kind, _, rest = p.partition("(")
    kind = kind.strip()
    if kind not in PARAMETERIZATIONS:
        raise UserError(f"unknown parameterization {p!r}; expected one of {', '.join(PARAMETERIZATIONS)} "
                        f"(edm takes sigma_data: edm(sigma_data=0.5))")
    defaults = SETTINGS.get(kind, {})
    if rest and not defaults:
        raise UserError(f"parameterization {kind} takes no settings, got {p!r}")
    settings = dict(defaults)
    body = rest.strip()
    if body:
        if not body.endswith(")"):
            raise UserError(f"malformed parameterization {p!r}; expected {kind}(key=value,...)")
        for item in filter(None, (i.strip() for i in body[:-1].split(","))):
            key, eq, val = (x.strip() for x in item.partition("="))
            if kind == "cm" and key == "base" and eq:
                if val not in CM_BASES:
                    raise UserError(f"parameterization {p!r}: base must be one of {', '.join(CM_BASES)}")
                settings["base"] = val
                continue
            if key not in defaults or not eq:
                raise UserError(f"malformed parameterization {p!r}; {kind} takes {', '.join(defaults)}"
                                + (" and base" if kind == "cm" else ""))
            try:
                settings[key] = float(val)
            except ValueError:
                raise UserError(f"malformed parameterization {p!r}: {key}={val} is not a number") from None
            if not (0 < settings[key] < float("inf")):
                raise UserError(f"{kind} needs {key} > 0, got {val}")
    return kind, settings


def canonical_parameterization(p: str) -> str:
    """The form stored in checkpoints, with every constant: ``edm(sigma_data=0.5)``."""
    kind, settings = parse_parameterization(p)
    if not settings:
        return kind
    # repr: exact constants; the base is a bare name
    return f"{kind}(" + ",".join(f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in settings.items()) + ")"


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """EDM's preconditioning (Karras et al. 2022, Table 1, "Ours"), at EDM noise level σ:
    c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/sqrt(σ² + σ_d²), c_in = 1/sqrt(σ² + σ_d²).
    (c_noise: see :class:`Denoiser`.) The loss weight λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out²."""
    sd2 = sigma_data ** 2
    denom = sigma ** 2 + sd2
    return sd2 / denom, sigma * sigma_data / denom.sqrt(), 1 / denom.sqrt()


def cm_coefficients(sigma: torch.Tensor, sigma_data: float, sigma_min: float):
    """The consistency function's boundary-condition parameterization (Song et al. 2023, App. C):
    c_skip = σ_d²/((σ − σ_min)² + σ_d²), c_out = σ_d·(σ − σ_min)/sqrt(σ² + σ_d²), and EDM's c_in;
    at σ = σ_min, c_skip = 1 and c_out = 0, so f(x, σ_min) = x exactly."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma ** 2 + sd2).sqrt()
    return c_skip, c_out, 1 / (sigma ** 2 + sd2).sqrt()


def cm_base_skip(sigma: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """c_skip of a consistency model over a base parameterization: f = c_skip·x̄ + (1 − c_skip)·x̂₀_base
    with c_skip = σ_min²/((σ − σ_min)² + σ_min²) — App. C's form with σ_min as its width instead of σ_d, so
    that f = x̄ exactly at σ_min and, a few σ_min above it, f is the base network's own x̂₀. A teacher's
    weights (ε, v, x₀ or EDM) are then already the consistency function everywhere but at the boundary,
    where the teacher's x̂₀ is x̄ to within σ — the start CD needs (LCM wraps its ε-teacher the same way,
    with its own constants). App. C's c_out·F form would read a v-network's output with the wrong sign and
    scale (v-prediction is EDM's F with σ_d = 1 and F = −v)."""
    return sigma_min ** 2 / ((sigma - sigma_min) ** 2 + sigma_min ** 2)


def preconditioning(kind: str, settings: dict, sigma: torch.Tensor):
    """(c_skip, c_out, c_in) of a preconditioned parameterization at EDM noise level σ."""
    if kind == "edm":
        return edm_coefficients(sigma, settings["sigma_data"])
    return cm_coefficients(sigma, settings["sigma_data"], settings["sigma_min"])


def target_scale(parameterization: str, snr: torch.Tensor) -> torch.Tensor:
    """k(SNR) with ‖out − target‖² = k·‖x̂₀ − x₀‖² for a network predicting ``parameterization``:
    ε: SNR (x̂₀ − x₀ = −σ/α·(ε̂ − ε)); v: SNR + 1; x₀: 1; EDM's F: 1/c_out² = (1 + SNR·σ_d²)/σ_d² (σ² = 1/SNR)."""
    kind, settings = parse_parameterization(parameterization)
    if kind == "cm" and "base" in settings:  # trained as its base network (see Denoiser.target)
        return target_scale(_cm_base(settings), snr)
    if kind == "eps":
        return snr
    if kind == "v":
        return snr + 1
    if kind == "x0":
        return torch.ones_like(snr)
    _, c_out, _ = preconditioning(kind, settings, snr.rsqrt())
    return 1 / c_out.pow(2).clamp(min=1e-12)


def _cm_base(settings: dict) -> str:
    """The parameterization a ``cm(...,base=B)`` network itself predicts (an EDM base shares cm's σ_d)."""
    base = settings["base"]
    return f"edm(sigma_data={settings['sigma_data']!r})" if base == "edm" else base


def call_network(net, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Call ``net(x, t)`` and unwrap diffusers' ``UNet2DOutput``."""
    out = net(x, t)
    return out.sample if hasattr(out, "sample") else out


class Denoiser(nn.Module):
    """``D(x_t, t)`` with conversions between parameterizations (Salimans & Ho 2022, §4):

    with α = sqrt(ᾱ_t), σ = sqrt(1 - ᾱ_t) and x_t = α x₀ + σ ε,
    ε-prediction: x̂₀ = (x_t − σ ε̂)/α;  v = α ε − σ x₀, so x̂₀ = α x_t − σ v̂ and ε̂ = σ x_t + α v̂;
    x₀-prediction: ε̂ = (x_t − α x̂₀)/σ.

    EDM (Karras et al. 2022, §5) is presented in the same VP coordinates: with σ̄ = σ/α and
    x̄ = x_t/α (EDM's x = x₀ + σ̄·n), the network sees F(c_in(σ̄)·x̄; c_noise) and
    x̂₀ = D(x̄; σ̄) = c_skip(σ̄)·x̄ + c_out(σ̄)·F; ε̂ follows as for x₀-prediction. c_noise is the VP
    timestep t itself — EDM Table 1's choice for the VP column, (M − 1)·σ⁻¹(σ) — rather than ¼·ln σ̄:
    the UNet's time embedding stays the one it was built for, and every time-aware step (caching gaps,
    calibration by t) reads the t it already reads. Fractional t is allowed everywhere.

    ``nfe`` counts network evaluations (one per batch call), so solvers report what they spent.
    """

    def __init__(self, net, schedule: Schedule, parameterization: str = "eps"):
        super().__init__()
        self.kind, self.settings = parse_parameterization(parameterization)
        self.net = net
        self.schedule = schedule
        self.parameterization = canonical_parameterization(parameterization)
        self.nfe = 0
        # a consistency model over a base parameterization: the base's conversions (a network-free Denoiser,
        # not registered as a submodule: swapping ``net`` stays the one change compression makes), then the boundary
        base = Denoiser(None, schedule, _cm_base(self.settings)) if "base" in self.settings else None
        object.__setattr__(self, "base", base)

    def _coeffs(self, x: torch.Tensor, t: torch.Tensor):
        a, s = alpha_sigma(self.schedule, t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return a.to(x.device, x.dtype).reshape(shape), s.to(x.device, x.dtype).reshape(shape)

    def _t(self, x: torch.Tensor, t) -> torch.Tensor:
        """t as a float32 vector over the batch, on x's device (filled there from a Python number: no copy)."""
        if x.device.type != "cpu":
            if torch.is_tensor(t):
                t = t.to(x.device, torch.float32)
                return t.expand(x.shape[0]) if t.ndim == 0 else t
            return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        t = torch.as_tensor(t, dtype=torch.float32)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def _precond(self, x: torch.Tensor, t: torch.Tensor):
        """(α, σ, c_skip, c_out, c_in) at t, shaped to broadcast against x (preconditioned kinds only)."""
        a, s = self._coeffs(x, t)
        c_skip, c_out, c_in = preconditioning(self.kind, self.settings, s / a)
        return a, s, c_skip, c_out, c_in

    def net_input(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network itself is called with at (x_t, t): (x_t, t), or (c_in·x_t/α, t) for EDM.
        Calibration collectors and anything else that calls the bare network go through this."""
        if self.base is not None:
            return self.base.net_input(x, t)
        t = self._t(x, t)
        if self.kind in SETTINGS:
            a, _, _, _, c_in = self._precond(x, t)
            x = x * (c_in / a)
        return x, t

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """The raw network output in its own parameterization."""
        self.nfe += 1
        return call_network(self.net, *self.net_input(x, t))

    def predict(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂₀) from one network evaluation."""
        t = self._t(x, t)
        return self.convert(self(x, t), x, t)

    def convert(self, out: torch.Tensor, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂₀) from a raw network output ``out`` at (x_t, t)."""
        t = self._t(x, t)
        if self.base is not None:
            a, s = self._coeffs(x, t)
            c_skip = cm_base_skip(s / a, self.settings["sigma_min"])
            x0 = c_skip * (x / a) + (1 - c_skip) * self.base.convert(out, x, t)[1]
            return (x - a * x0) / s, x0
        if self.kind in SETTINGS:
            a, s, c_skip, c_out, _ = self._precond(x, t)
            x0 = c_skip * (x / a) + c_out * out
            return (x - a * x0) / s, x0
        a, s = self._coeffs(x, t)
        if self.kind == "eps":
            return out, (x - s * out) / a
        if self.kind == "v":
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
        """The training target in this denoiser's own parameterization for x_t = q_sample(x0, t, noise).
        A ``cm`` over a base is trained as its base network (the output that makes the base's x̂₀ = x₀),
        which f equals away from the boundary; a consistency model's own loss is CD's, not this one."""
        if self.base is not None:
            return self.base.target(x0, noise, t)
        if self.kind == "eps":
            return noise
        if self.kind == "x0":
            return x0
        t = self._t(x0, t)
        if self.kind in SETTINGS:
            # F's target (EDM eq. 8): (x₀ − c_skip·x̄)/c_out with x̄ = x_t/α = x₀ + (σ/α)·ε
            a, s, c_skip, c_out, _ = self._precond(x0, t)
            return (x0 - c_skip * (x0 + (s / a) * noise)) / c_out
        a, s = self._coeffs(x0, t)
        return a * noise - s * x0
