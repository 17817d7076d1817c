"""Solvers: pure functions with one signature,
``solver(denoiser, x_T, timesteps, *, generator=None, callback=None, **opts) -> x_0``,
registered by name. ``timesteps`` is a strictly decreasing sequence; every solver ends at clean
data (t = -1). The number of network evaluations spent is ``denoiser.nfe``.

``get_solver("diffusers:<SchedulerClass>")`` wraps any diffusers scheduler in the same signature
(see :mod:`leandiff.solvers.diffusers_peer`), so diffusers' schedulers are peers in every table.
"""
from __future__ import annotations

import inspect
from typing import Callable

from ..errors import UserError
from .ams import sample_ams_ddim, sample_ams_ddpm
from .consistency import sample_consistency
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m, sample_dpmpp_3m_sde
from .euler_maruyama import sample_euler_maruyama
from .karras import sample_euler, sample_heun
from .truncated import truncated_start  # noqa: F401  (start any solver from a noised reference)

# The sampler for a checkpoint that records none (Checkpoint.sampling_defaults): the best measured at a
# modest NFE on the shipped bases. On zoo:mnist-tiny (N=2048, benchmarks/results/solvers_n2048.md)
# dpmpp-3m-sde 10 NFE reads FID-dom 0.389, 1.03x its DDPM-1000 (0.379), where DDIM-50, the earlier
# default, reads 6.735.
# Its spacing is trailing on every schedule: at 10 NFE a grid uniform in log-SNR is far worse for it even
# on linear β (mnist-tiny, N=512: benchmarks/results/default_sampler.md).
DEFAULT_SOLVER, DEFAULT_NFE, DEFAULT_SOLVER_SPACING = "dpmpp-3m-sde", 10, "trailing"

# name -> solver. A solver that spends k > 1 network evaluations per step says so with a
# ``nfe_per_step = k`` attribute on the function (see nfe_per_step).
SOLVERS: dict[str, Callable] = {
    # DDPM / DDIM family (Ho et al. 2020; Song et al. 2021)
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    # adaptive momentum (Wang et al. 2023)
    "ams-ddim": sample_ams_ddim,
    "ams-ddpm": sample_ams_ddpm,
    # probability-flow ODE
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "dpmpp-3m": sample_dpmpp_3m,
    # reverse SDE
    "euler-maruyama": sample_euler_maruyama,
    "dpmpp-2m-sde": sample_dpmpp_2m_sde,
    "dpmpp-3m-sde": sample_dpmpp_3m_sde,
    # consistency models (Song et al. 2023, Alg. 1): one or a few steps of a cm student
    "consistency": sample_consistency,
}

# Solvers meant for one kind of model: the consistency sampler needs a consistency function (a ``cm``
# student), so the contract tests against generic exact denoisers skip it and its own test runs it
# on an exact consistency function (tests/compress/test_consistency.py).
MODEL_SPECIFIC = {"consistency": "cm"}
GENERIC = tuple(n for n in SOLVERS if n not in MODEL_SPECIFIC)

# Solvers whose output depends only on x_T (no fresh noise): their error must fall with the steps.
DETERMINISTIC = ("ddim", "ams-ddim", "euler", "heun", "dpmpp-2m", "dpmpp-3m")

DIFFUSERS_PREFIX = "diffusers:"


def get_solver(name: str) -> Callable:
    if name.startswith(DIFFUSERS_PREFIX):
        from .diffusers_peer import diffusers_solver

        return diffusers_solver(name[len(DIFFUSERS_PREFIX):])
    try:
        return SOLVERS[name]
    except KeyError:
        raise UserError(f"unknown solver {name!r}; known: {', '.join(sorted(SOLVERS))}, "
                        f"or {DIFFUSERS_PREFIX}<SchedulerClass>") from None


def nfe_per_step(name: str) -> int:
    """Network evaluations one step of solver ``name`` spends (1 unless the solver says otherwise)."""
    return int(getattr(get_solver(name), "nfe_per_step", 1))


def check_options(name: str, opts: dict) -> None:
    """Fail loudly, naming the solver's options, on an option solver ``name`` does not take
    (instead of a TypeError from deep inside a sampling loop)."""
    params = inspect.signature(get_solver(name)).parameters.values()
    known = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("generator", "callback")]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise UserError(f"solver {name} has no option {', '.join(unknown)}; its options: {', '.join(known)}")
