"""Any diffusers scheduler as a leandiff solver: ``get_solver("diffusers:DPMSolverMultistepScheduler")``.

The adapter builds the scheduler from the Denoiser's schedule (``num_train_timesteps``, the exact β as
``trained_betas``, ``beta_schedule``; parameterization eps → ``epsilon``, v → ``v_prediction``,
x0 → ``sample``), calls ``set_timesteps(len(timesteps))`` and then runs the scheduler's own
``set_timesteps``/``step`` loop. It honours the scheduler's conventions: its own timestep spacing
(only the *number* of steps comes from ``timesteps``), its own final step and its own order, so a
scheduler that spends 2 evaluations per step (``order = 2``: Heun, KDPM2) spends them, and the
Denoiser's counter reports what was actually spent.

Options: ``clip_x0`` maps to ``clip_sample`` (range 1) where the scheduler has it, otherwise to
``thresholding`` with ``sample_max_value = 1`` (which clamps x̂₀ to [-1, 1] exactly), otherwise it
cannot be honoured and a warning says so; ``config`` overrides any constructor argument (e.g.
``{"timestep_spacing": "trailing"}``); ``step_kwargs`` go to every ``step`` call (e.g. ``{"eta": 1.0}``).
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable

import torch

from ..denoiser import Denoiser
from ..errors import UserError
from ..schedule import betas

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UserError(f"diffusers has no scheduler class {name!r} (e.g. DDIMScheduler, DPMSolverMultistepScheduler)")
    return cls


def build_scheduler(cls, denoiser: Denoiser, *, clip_x0: bool = False, config: dict | None = None):
    """A ``cls`` instance whose forward process and parameterization are the Denoiser's."""
    params = inspect.signature(cls.__init__).parameters
    sched = denoiser.schedule
    kw: dict = {}
    if "num_train_timesteps" in params:
        kw["num_train_timesteps"] = sched.T
    if "beta_schedule" in params:
        kw["beta_schedule"] = "linear" if sched.kind == "linear" else "squaredcos_cap_v2"
    if sched.kind == "linear" and "beta_start" in params:
        kw.update(beta_start=sched.beta_start, beta_end=sched.beta_end)
    if "trained_betas" in params:
        kw["trained_betas"] = betas(sched).tolist()  # exact β, whatever the named schedule
    prediction = PREDICTION_TYPES.get(denoiser.kind, "epsilon")  # others (EDM): fed ε̂, see raw_output
    if "prediction_type" in params:
        kw["prediction_type"] = prediction
    elif prediction != "epsilon":
        raise UserError(f"diffusers:{cls.__name__} has no prediction_type; it cannot run a "
                        f"{denoiser.parameterization}-parameterized model")
    if "set_alpha_to_one" in params:
        kw["set_alpha_to_one"] = True  # end at clean data (ᾱ = 1), as every leandiff solver does
    if "clip_sample" in params:
        kw["clip_sample"] = bool(clip_x0)
        if "clip_sample_range" in params:
            kw["clip_sample_range"] = 1.0
    elif clip_x0 and "thresholding" in params:
        # Thresholding with s clamped to [1, sample_max_value] = [1, 1] is x̂₀.clamp(-1, 1).
        kw.update(thresholding=True, sample_max_value=1.0)
    elif clip_x0:
        warnings.warn(f"diffusers:{cls.__name__} cannot clip x̂₀; sampling without clipping", stacklevel=3)
    kw.update(config or {})
    try:
        return cls(**kw)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise UserError(f"cannot build diffusers:{cls.__name__} with {kw}: {e}") from None


def raw_output(denoiser: Denoiser, x: torch.Tensor, t) -> torch.Tensor:
    """The network's output in a prediction type diffusers knows: its own, or ε̂ for one it does not
    know (EDM's preconditioned F), converted by the Denoiser."""
    return denoiser(x, t) if denoiser.kind in PREDICTION_TYPES else denoiser.eps(x, t)


@functools.lru_cache(maxsize=None)
def diffusers_solver(name: str) -> Callable:
    """The solver for diffusers scheduler class ``name`` (cached: the same name gives the same function)."""
    cls = _scheduler_class(name)

    @torch.no_grad()
    def sample_diffusers(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                         clip_x0: bool = False, config: dict | None = None,
                         step_kwargs: dict | None = None) -> torch.Tensor:
        steps = len(torch.as_tensor(timesteps).flatten())
        scheduler = build_scheduler(cls, denoiser, clip_x0=clip_x0, config=config)
        try:
            scheduler.set_timesteps(steps)
        except ValueError as e:
            raise UserError(f"diffusers:{name} cannot take {steps} steps: {e}") from None
        kwargs = dict(step_kwargs or {})
        if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
            kwargs["generator"] = generator
        x = x * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            # The scheduler's own input scaling, one raw network evaluation, one scheduler step.
            out = raw_output(denoiser, scheduler.scale_model_input(x, t), t)
            res = scheduler.step(out, t, x, **kwargs)
            x = res.prev_sample
            if callback is not None:
                callback({"i": i, "t": float(t), "x": x, "x0": getattr(res, "pred_original_sample", None)})
        return x

    sample_diffusers.__name__ = sample_diffusers.__qualname__ = f"sample_diffusers_{name}"
    sample_diffusers.nfe_per_step = int(getattr(cls, "order", 1))
    return sample_diffusers
