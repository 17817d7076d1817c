"""EMA chosen after training: a run with ``ema_decays`` keeps several exponential moving averages side
by side (``DIR`` holds ``ema_decay``'s, ``DIR/ema/<decay>/`` each other one); :func:`select_ema` scores
each by a cheap FID-dom proxy and names the best. Which one wins depends on the run's length and
learning rate (EDM2, Karras et al. 2024, §3: the best EMA length is not known before training ends),
so it is measured, not guessed. Every checkpoint records its profile in ``meta["ema"]``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class ProxyConfig:
    """The cheap quality proxy: FID-dom of ``n`` samples from one solver (no latency, no Inception)."""

    solver: str = "dpmpp-3m-sde"
    nfe: int = 10
    spacing: str = "trailing"
    n: int = 512
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"  # leandiff.device spec


def ema_candidates(run_dir: str | Path) -> dict[str, Path]:
    """{decay as written: checkpoint directory} for the run's main checkpoint and every DIR/ema/<decay>/."""
    from .checkpoint import META_NAME
    from .io import read_json

    run_dir = Path(run_dir)
    if not (run_dir / META_NAME).is_file():
        raise UserError(f"{run_dir}: not a leandiff training directory (no {META_NAME})")
    main = read_json(run_dir / META_NAME).get("ema") or {}
    out = {repr(float(main.get("decay", (read_json(run_dir / META_NAME).get("train") or {}).get("ema_decay", 0.999)))):
           run_dir}
    for d in sorted((run_dir / "ema").glob("*")) if (run_dir / "ema").is_dir() else []:
        if (d / META_NAME).is_file():
            out[d.name] = d
    return out


def select_ema(run_dir: str | Path, cfg: ProxyConfig = ProxyConfig(), *, progress: bool = False,
               log=print) -> tuple[str, dict[str, float]]:
    """(best decay, {decay: proxy FID-dom}) over the run's EMA profiles, every one with the same seed."""
    from .checkpoint import load_checkpoint
    from .evaluate.harness import EvalConfig, evaluate_checkpoint

    cands = ema_candidates(run_dir)
    ecfg = EvalConfig(solver=cfg.solver, nfe=cfg.nfe, spacing=cfg.spacing, n=cfg.n, seed=cfg.seed,
                      batch_size=cfg.batch_size, latency=None, inception=False, device=cfg.device)
    scores, seen = {}, {}
    for decay, path in cands.items():
        ck = load_checkpoint(path)
        same = seen.setdefault(ck.hash(), decay)
        if same != decay:  # e.g. 0.999 and 0.9995 in a run shorter than ~9,000 steps: the warm-up
            # min(decay, (1 + step)/(10 + step)) stays below both decays, so both are the warm-up average
            scores[decay] = scores[same]
            log(f"EMA {decay}: the same weights as EMA {same} (the warm-up (1 + step)/(10 + step) never reached "
                f"either decay in this run); not scored again")
            continue
        row = evaluate_checkpoint(ck, ecfg, progress=progress, log=lambda *a, **k: None)
        scores[decay] = float(row["quality"]["fid_dom"])
        log(f"EMA {decay}: FID-dom {scores[decay]:.4f} ({cfg.solver}, {cfg.nfe} NFE, {cfg.spacing}, N = {cfg.n})")
    return min(scores, key=scores.get), scores


def write_selected(run_dir: str | Path, decay: str, scores: dict[str, float], cfg: ProxyConfig,
                   out_dir: str | Path) -> Path:
    """Copy the chosen EMA's checkpoint to ``out_dir``, its ``meta["ema"]`` recording the selection."""
    from .checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(ema_candidates(run_dir)[decay])
    ck.meta["ema"] = {**copy.deepcopy(ck.meta.get("ema") or {}), "selected_by": {
        "proxy": f"FID-dom, {cfg.solver} {cfg.nfe} NFE {cfg.spacing}, N = {cfg.n}, seed {cfg.seed}",
        "scores": scores}}
    return save_checkpoint(ck, out_dir)
