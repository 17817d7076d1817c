"""Where the exported models of the ONNX Runtime and OpenVINO runtimes live, and how an int8 one is calibrated.

Both backends look for a model in the same two places: a side file beside the checkpoint (written by
``quant(runtime=...)``), else a cache directory keyed by the weights hash (and the calibration collector for
an int8 model calibrated on the fly). An int8 model with neither a side file nor a named collector is an
error, never a silent default calibration.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..denoiser import Denoiser
from ..errors import UserError
from ..models import image_shape
from .calibration import CalibConfig, collect

CACHE = Path(os.environ.get("LEANDIFF_CACHE", Path(tempfile.gettempdir()) / "leandiff-onnx"))


def side_file(ckpt, name: str) -> Path | None:
    """``name`` beside the checkpoint (in its directory, or next to its file), if it is there."""
    if ckpt.path is None:
        return None
    p = Path(ckpt.path)
    p = p / name if p.is_dir() else p.parent / name
    return p if p.is_file() else None


def cache_dir(ckpt, runtime: str, calib: str | None) -> Path:
    """The cache directory of ``ckpt``'s exported models: fp32 when ``calib`` is None, else int8 calibrated by
    collector ``calib`` ("" = the checkpoint's own int8 model only, which has no cache: a UserError)."""
    if calib == "":
        raise UserError(f"runtime {runtime}: this checkpoint has no int8 model (make one with "
                        f"quant(runtime={runtime}), or calibrate on the fly with --runtime \"{runtime}(calib=qdiff)\")")
    return CACHE / (ckpt.hash() + (f"-{calib}" if calib is not None else ""))


ON_THE_FLY = dict(n=128, steps=20)  # the calibration set of an int8 model made on the fly by ``calib=C``


def calibration_inputs(ckpt, ccfg: CalibConfig | str, images=None):
    """The calibration set (network inputs, t) of ``ckpt`` by config ``ccfg``, or by collector name ``ccfg``
    with the on-the-fly set's size."""
    if isinstance(ccfg, str):
        ccfg = CalibConfig(collector=ccfg, **ON_THE_FLY)
    return collect(Denoiser(ckpt.net.float().eval(), ckpt.schedule, ckpt.parameterization), image_shape(ckpt.arch),
                   ccfg, images)
