"""leandiff: make image diffusion models lean and measure what each choice cost.

The flow, one module each: data → schedule/denoiser/models → train → checkpoint → solvers
(sample) → evaluate → report.
"""
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .denoiser import Denoiser
from .schedule import Schedule, q_sample, timesteps
from .solvers import SOLVERS, get_solver

__version__ = "0.1.0"
__all__ = ["Checkpoint", "Denoiser", "Schedule", "SOLVERS", "get_solver", "load_checkpoint",
           "q_sample", "save_checkpoint", "timesteps"]
