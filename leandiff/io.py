"""Small file helpers: atomic writes and image grids."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's directory; rename it over ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException as e:
        _unlink(tmp)
        if _foreign_io_error(e):  # a full disk seen by a non-Python writer is still a full disk
            raise UserError(f"cannot write {path}: {_foreign_io_error(e)}") from None
        raise


def _foreign_io_error(e: BaseException) -> str | None:
    """The OS error inside an exception that a native writer raised instead of OSError
    (safetensors: ``SafetensorError("Error while serializing: I/O error: No space left on
    device (os error 28)")``), else None."""
    msg = str(e)
    if type(e).__name__ == "SafetensorError" and "I/O error" in msg:
        return (msg.split("I/O error:", 1)[1].strip().splitlines() or ["I/O error"])[0]
    return None


def _unlink(p):
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float N×C×H×W -> uint8 N×H×W×C."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x: torch.Tensor, path, nrow: int | None = None, pad: int = 2) -> None:
    """Write images in [-1, 1] as one PNG grid."""
    from PIL import Image

    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_npz(path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr that stays silent when stderr is not a terminal
    (logs, CI, captured output), so error output stays one line."""
    from tqdm import tqdm

    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def ensure_writable_dir(path) -> Path:
    """Create ``path`` if needed and prove it is writable, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


@contextmanager
def heartbeat(what: str, log, every: float = 30.0, enabled: bool | None = None):
    """While the body runs, ``log`` a line saying it still runs every ``every`` seconds. For output that
    goes to a log file: there the progress bars (on a terminal only) are silent. ``enabled`` None: only
    when stdout is not a terminal."""
    if enabled is None:
        enabled = not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty())
    if not enabled:
        yield
        return
    done = threading.Event()
    t0 = time.monotonic()

    def beat():
        while not done.wait(every):
            log(f"  ... {what}: {time.monotonic() - t0:.0f} s so far")

    thread = threading.Thread(target=beat, name="leandiff-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
