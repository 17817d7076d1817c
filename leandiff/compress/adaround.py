"""Weight rounding learned per weight (AdaRound, Nagel et al. 2020; the layer-wise core of the BRECQ
reconstruction that Q-Diffusion runs) and empirical bias correction (Nagel et al. 2019), both on a
:class:`~leandiff.surgery.quant.QuantLayer`'s full-precision calibration inputs."""
from __future__ import annotations

import torch
from torch import nn

from ..denoiser import call_network
from ..surgery.quant import QuantConfig, QuantLayer, fake_quant, int_range, layer_op


ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Nagel et al. 2020, eq. 23)


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1): a soft rounding offset in [0, 1] that can reach 0 and 1 exactly."""
    return (torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA).clamp(0, 1)


def adaround_layer(layer: "QuantLayer", inputs: torch.Tensor, iters: int = 400, batch: int = 16, lam: float = 0.01,
                   lr: float = 1e-2, seed: int = 0) -> dict:
    """Learn whether each weight rounds up or down (AdaRound, Nagel et al. 2020, eq. 21–25).

    ŵ = s·clip(⌊w/s⌋ + h(V), c_min, c_max) with V initialised so that h(V) = w/s − ⌊w/s⌋ (ŵ = w at the
    start), minimising ‖f(x; w) − f(x; ŵ)‖² over the layer's full-precision calibration inputs x plus
    λ·Σ(1 − |2h(V) − 1|^β), β annealed from 20 to 2 after a 20 % warm-up (no regulariser), which
    drives every h to 0 or 1. The result is written into the layer's weight as the rounded grid value
    s·clip(⌊w/s⌋ + 1[h ≥ ½]), which the layer's nearest rounding then reproduces exactly, so a
    checkpoint needs no extra tensors. Should the learned rounding come out worse than nearest on the
    check batch (too few iterations), nearest is kept. Returns both output MSEs and the fraction flipped."""
    inner = layer.inner
    w = inner.weight.detach()
    s = layer.w_scale.reshape((-1,) + (1,) * (w.ndim - 1))
    c_min, c_max = int_range(layer.w_bits, True)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
    v = torch.log((rest - ADAROUND_GAMMA) / (ADAROUND_ZETA - rest)).requires_grad_(True)  # h(V) = rest
    opt = torch.optim.Adam([v], lr=lr)

    g = torch.Generator().manual_seed(seed)
    warm = int(0.2 * iters)
    for it in range(iters):
        x = inputs[torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=g)]
        with torch.no_grad():
            target = layer_op(inner, x, w)
        h = _rect_sigmoid(v)
        loss = (layer_op(inner, x, s * (w_floor + h).clamp(c_min, c_max)) - target).pow(2).mean()
        if it >= warm:
            beta = 20 + (2 - 20) * (it - warm) / max(1, iters - warm)  # linear decay 20 -> 2
            loss = loss + lam * (1 - (2 * h - 1).abs().pow(beta)).sum() / w.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = s * (w_floor + (v >= 0).to(w.dtype)).clamp(c_min, c_max)  # h(V) ≥ ½ ⇔ V ≥ 0 (ζ + γ = 1)
        nearest = fake_quant(w, s, 0.0, c_min, c_max)
        x = inputs[:min(64, inputs.shape[0])]
        target = layer_op(inner, x, w)
        err = {"mse_nearest": (layer_op(inner, x, nearest) - target).pow(2).mean().item(),
               "mse_adaround": (layer_op(inner, x, hard) - target).pow(2).mean().item()}
        if err["mse_adaround"] > err["mse_nearest"]:  # too few iterations to converge: keep nearest rounding
            hard, err["mse_adaround"], err["kept_nearest"] = nearest, err["mse_nearest"], True
        err["flipped"] = float((hard != nearest).float().mean())
        inner.weight.copy_(hard)
    return err


@torch.no_grad()
def layer_inputs(net: nn.Module, layers: list, calib, batch_size: int = 64, keep: int = 256) -> dict:
    """Each QuantLayer's full-precision input on the first ``keep`` calibration samples."""
    store: dict = {m: [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: store[mod].append(args[0].detach().clone()))
             for m in layers]
    saved = [(m, m.record) for m in layers]
    try:
        for m in layers:
            m.record = []  # calibration mode: the layers run in full precision
        xs, ts = calib
        for b0 in range(0, min(keep, xs.shape[0]), batch_size):
            call_network(net, xs[b0:b0 + batch_size][:keep - b0], ts[b0:b0 + batch_size][:keep - b0])
    finally:
        for h in hooks:
            h.remove()
        for m, r in saved:
            m.record = r
    return {m: torch.cat(v) for m, v in store.items()}


@torch.no_grad()
def correct_bias(layers: dict, inputs: dict, fp_weights: dict) -> dict:
    """Empirical bias correction (Nagel et al. 2019, "Data-free quantization", §4.2, with the expectation
    taken over calibration data): quantization shifts a layer's mean output per channel,
    E[f̂(x)] − E[f(x)]; subtract that shift from the bias. f̂ is the quantized layer as it runs (weights
    and input activations quantized), f the full-precision one (``fp_weights``: its weights before any
    AdaRound), x the layer's full-precision inputs on the calibration set (``inputs``, from
    :func:`layer_inputs`); the mean is over samples and positions. Systematic shifts matter more than
    their size suggests in a sampler, which adds the same error at every step (a grey background).
    ``layers``: name -> QuantLayer. Layers without a bias are left as they are. Returns name -> the
    largest |shift| removed."""
    report = {}
    for name, m in layers.items():
        if m.inner.bias is None:
            continue
        x, w = inputs[m], fp_weights[m]
        saved, m.group = m.group, None  # one shift for every timestep group
        ch = 1 if isinstance(m.inner, nn.Conv2d) else -1  # the output-channel dimension
        total, count = torch.zeros_like(m.inner.bias), 0
        for b0 in range(0, x.shape[0], 64):
            xb = x[b0:b0 + 64]
            d = (m(xb) - layer_op(m.inner, xb, w)).movedim(ch, -1).reshape(-1, m.inner.bias.numel())
            total, count = total + d.sum(dim=0), count + d.shape[0]
        m.group = saved
        shift = total / count
        m.inner.bias.sub_(shift)
        report[name] = float(shift.abs().max())
    return report


def adaround(layers: dict, inputs: dict, cfg: QuantConfig, log=None) -> dict:
    """AdaRound every QuantLayer (``layers``: name -> layer), one at a time, on its full-precision
    calibration inputs (``inputs``, from :func:`layer_inputs`)."""
    report = {}
    with torch.enable_grad():
        for i, (name, m) in enumerate(layers.items()):
            report[name] = r = adaround_layer(m, inputs[m], iters=cfg.adaround_iters, seed=i)
            if log:
                log(f"adaround {name}: output MSE {r['mse_nearest']:.3e} -> {r['mse_adaround']:.3e}")
    return report
