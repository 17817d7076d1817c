"""Solvers: pure functions with one signature,
``solver(denoiser, x_T, timesteps, *, generator=None, callback=None, **opts) -> x_0``,
registered by name. ``timesteps`` is a strictly decreasing sequence; every solver ends at clean
data (t = -1). The number of network evaluations spent is ``denoiser.nfe``.
"""
from __future__ import annotations

from typing import Callable

from ..errors import UserError
from .ddim import sample_ddim
from .ddpm import sample_ddpm

# name -> solver. A solver that spends k > 1 network evaluations per step says so with a
# ``nfe_per_step = k`` attribute on the function (see nfe_per_step).
SOLVERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
}


def get_solver(name: str) -> Callable:
    try:
        return SOLVERS[name]
    except KeyError:
        raise UserError(f"unknown solver {name!r}; known: {', '.join(sorted(SOLVERS))}") from None


def nfe_per_step(name: str) -> int:
    """Network evaluations one step of solver ``name`` spends (1 unless the solver says otherwise)."""
    return int(getattr(get_solver(name), "nfe_per_step", 1))
