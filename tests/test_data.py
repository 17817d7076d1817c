import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from leandiff.data import load_dataset
from leandiff.errors import UserError


def _write_idx(root, prefix, n=12):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + imgs.tobytes())
    (root / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, n) + labels.tobytes())
    return imgs, labels


def test_idx_directory_for_mnist_and_fashion(tmp_path):
    imgs, labels = _write_idx(tmp_path, "train")
    _write_idx(tmp_path, "t10k", 5)
    for name in ("mnist", "fashion-mnist"):
        d = load_dataset(name, "train", data_dir=str(tmp_path))
        assert d.images.shape == (12, 1, 28, 28) and d.images.dtype == torch.float32
        assert torch.equal(d.labels, torch.from_numpy(labels.astype(np.int64)))
        assert torch.allclose((d.images[:, 0] + 1) * 127.5, torch.from_numpy(imgs).float())
        assert len(load_dataset(name, "test", data_dir=str(tmp_path))) == 5


def test_bundled_mnist_is_offline_and_split():
    tr, te = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert (len(tr), len(te)) == (4000, 1000)
    assert tr.images.min() == -1 and tr.images.max() == 1
    assert te.labels.bincount().tolist() == [100] * 10


def test_cifar_python_batches_read_without_running_code(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    d = load_dataset("cifar10", "train", data_dir=str(tmp_path))
    assert d.images.shape == (20, 3, 32, 32)
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (evil / name).write_bytes(pickle.dumps(batch))
    (evil / "test_batch").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(UserError, match="not a CIFAR-10"):
        load_dataset("cifar10", "test", data_dir=str(evil))
    assert not (tmp_path / "pwned").exists()


def test_folder_is_resized_and_converted(image_folder):
    d = load_dataset(f"folder:{image_folder}", "train", shape=(1, 16, 16))
    assert d.images.shape == (36, 1, 16, 16) and d.labels is None
    assert len(load_dataset(f"folder:{image_folder}", "test", shape=(3, 8, 8))) == 4


@pytest.mark.parametrize("name,kwargs,match", [
    ("mnist", {"data_dir": "/nonexistent"}, "expected train-images-idx3-ubyte"),
    ("fashion-mnist", {"data_dir": "/nonexistent/x"}, "fashion-mnist: expected"),
    ("cifar10", {}, "give --data-dir"),
    ("imagenet", {}, "unknown dataset"),
    ("folder:/nonexistent", {"shape": (1, 8, 8)}, "not a directory"),
    ("mnist", {"shape": (3, 32, 32)}, "model expects"),
])
def test_missing_or_wrong_sources_name_what_was_expected(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        load_dataset(name, "train", **kwargs)


def test_corrupt_idx_file(tmp_path):
    _write_idx(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(UserError, match="not a valid IDX"):
        load_dataset("mnist", "train", data_dir=str(tmp_path))
