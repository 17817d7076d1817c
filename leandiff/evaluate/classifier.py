"""The feature network: a small CNN per dataset, trained by leandiff itself.

Its penultimate activations are the feature space of FID-dom / KID / precision-recall; its
softmax gives the Inception-Score-style score and the label histograms of generated images.
Standard FID uses Inception-v3 (Heusel et al. 2017), whose weights cannot be fetched offline and
which is a poor feature space for 28×28 grey digits; a domain classifier is the usual substitute
(e.g. the LeNet-feature FID used for MNIST GANs). Comparisons should be made as ratios to the
same model's reference sampler measured in the same run.

A classifier is data: ``classifier.safetensors`` (weights, with the JSON record in the header)
and ``classifier.json`` beside it (architecture, training protocol, accuracies, weight hash).
The shipped ones live in ``leandiff/zoo/classifiers/<dataset>/``.

Which images the classifier sees: it trains on the dataset's train split *minus a stratified
held-back part* (``HELD_BACK``). The held-back images are never seen by the classifier, so they
can stand in for a perfect generator when measuring the real-vs-real floor of the metrics.
Accuracy is reported on the held-out (test) split, which is also the reference split.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ZOO_DIR, weights_hash
from ..device import device_of
from ..errors import UserError
from ..io import atomic_path, read_json, write_json

CLASSIFIER_DIR = ZOO_DIR / "classifiers"
WEIGHTS_NAME = "classifier.safetensors"
META_NAME = "classifier.json"
FORMAT = "leandiff-classifier"
ARCH_TYPE = "leandiff.FeatureCNN"

# Stratified part of the train split that the classifier never trains on (the "unseen" pool).
HELD_BACK = {"mnist": 1000, "fashion-mnist": 10_000, "cifar10": 10_000}


class FeatureCNN(nn.Module):
    """conv-BN-ReLU ×3 (max-pool after the first two), global average pool, a hidden linear layer
    whose ReLU output is the feature vector, then the class logits.

    Input: images in [-1, 1], N×C×H×W (any H, W divisible by 4)."""

    def __init__(self, in_channels: int = 1, widths=(32, 64, 128), features: int = 64, classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        c1, c2, c3 = widths
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
        self.body = nn.Sequential(*block(in_channels, c1), nn.MaxPool2d(2), *block(c1, c2), nn.MaxPool2d(2),
                                  *block(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Linear(c3, features)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(features, classes)
        self.num_features = features  # what torchmetrics' FID/KID ask a custom feature module for
        self.num_classes = classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations (the FID-dom feature space)."""
        return F.relu(self.hidden(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.drop(self.features(x)))


@dataclass(frozen=True)
class ClassifierConfig:
    dataset: str = "mnist"  # a name from leandiff.data
    data_dir: str | None = None  # where the dataset's files are, when not the default
    widths: tuple = (32, 64, 128)  # conv channels
    features: int = 64  # feature dimension (penultimate layer)
    epochs: int = 30  # passes over the classifier's training images
    batch_size: int = 128
    lr: float = 2e-3  # peak AdamW learning rate, cosine-decayed to 0
    weight_decay: float = 5e-4
    shift: int = 2  # augmentation: random translation by up to ±shift pixels
    hflip: bool = False  # augmentation: random horizontal flips (CIFAR-10)
    held_back: int | None = None  # stratified train images kept unseen; None: HELD_BACK[dataset]
    seed: int = 0

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise UserError("classifier: epochs, batch size and learning rate must be positive")
        if self.shift < 0:
            raise UserError(f"classifier: shift must be >= 0, got {self.shift}")


# Per-dataset defaults (the shipped classifiers were trained with exactly these).
DEFAULTS = {
    "mnist": ClassifierConfig("mnist", epochs=30),
    "fashion-mnist": ClassifierConfig("fashion-mnist", epochs=15, shift=1),
    "cifar10": ClassifierConfig("cifar10", widths=(64, 128, 256), features=128, epochs=20, hflip=True),
}


@dataclass
class Classifier:
    """A trained feature network with its record."""

    net: FeatureCNN
    record: dict  # architecture, dataset, training protocol, accuracies, hash
    path: Path | None = None

    @property
    def hash(self) -> str:
        return self.record["weights_sha"]

    @property
    def dataset(self) -> str:
        return self.record["dataset"]

    def describe(self) -> dict:
        """What a metric row records about its feature network."""
        return {"name": f"leandiff-classifier/{self.dataset}", "hash": self.hash,
                "features": self.net.num_features, "test_accuracy": self.record.get("test_accuracy")}


def build_classifier(arch: dict) -> FeatureCNN:
    if not isinstance(arch, dict) or arch.get("type") != ARCH_TYPE:
        raise UserError(f"unsupported classifier architecture {str(arch)[:120]}")
    try:
        return FeatureCNN(int(arch["in_channels"]), tuple(arch["widths"]), int(arch["features"]),
                          int(arch["classes"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"malformed classifier architecture {arch!r} ({e})") from None


def quantize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and round to the 256 uint8 levels, as if the images were saved as PNG.
    Real images already lie on that grid; generated ones are put on it so both are judged alike."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def embed(clf: Classifier | FeatureCNN, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 N×F, class probabilities float32 N×K) of images in [-1, 1], computed on the
    classifier's device (images elsewhere are moved there batch by batch)."""
    net = clf.net if isinstance(clf, Classifier) else clf
    net.eval()
    dev = device_of(net)
    feats, probs = [], []
    for i in range(0, x.shape[0], batch_size):
        f = net.features(quantize_pixels(x[i:i + batch_size].to(dev).float()))
        feats.append(f)
        probs.append(torch.softmax(net.head(f), dim=1))
    return torch.cat(feats), torch.cat(probs)


# --- train / held-back split ----------------------------------------------------------------

def held_back_mask(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of ``count`` images held back from classifier training: the last
    ``count / K`` of each class in file order (stratified, deterministic)."""
    classes = torch.unique(labels)
    per = count // len(classes)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        if per >= len(idx):
            raise UserError(f"cannot hold back {per} images of class {int(c)}: it has only {len(idx)}")
        mask[idx[len(idx) - per:]] = True
    return mask


def classifier_splits(dataset: str, data_dir: str | None = None, held_back: int | None = None):
    """(fit, unseen, test) ImageSets: what the classifier trains on, the held-back train images it
    never sees, and the held-out split (accuracy + reference statistics)."""
    from ..data import ImageSet, load_dataset

    train = load_dataset(dataset, "train", data_dir)
    test = load_dataset(dataset, "test", data_dir)
    if train.labels is None:
        raise UserError(f"{dataset}: a classifier needs class labels")
    count = HELD_BACK.get(dataset, len(train) // 6) if held_back is None else held_back
    mask = held_back_mask(train.labels, count) if count else torch.zeros(len(train), dtype=torch.bool)
    part = lambda m, split: ImageSet(train.images[m], train.labels[m], dataset, split, train.source)  # noqa: E731
    return part(~mask, "train-fit"), part(mask, "train-unseen"), test


# --- training -------------------------------------------------------------------------------

def _augment(x: torch.Tensor, shift: int, hflip: bool, g: torch.Generator) -> torch.Tensor:
    """Random translations (pad with the background value -1, crop) and optional flips."""
    n, _, h, w = x.shape
    if shift:
        padded = F.pad(x, (shift,) * 4, value=-1.0)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def normalise_feature_scale(net: FeatureCNN, images: torch.Tensor) -> float:
    """Rescale the feature space so that the features of ``images`` have RMS 1, without changing
    the logits: the hidden layer is divided by s (ReLU is positively homogeneous) and the head
    multiplied by s. KID's kernel (xᵀy/d + 1)³ assumes features of order 1, as Inception's are;
    FID scales by 1/s². Returns s."""
    feats, _ = embed(net, images)
    s = float(feats.double().pow(2).mean().sqrt())
    if not s > 0:
        raise UserError("classifier: all features are zero; training failed")
    net.hidden.weight.div_(s)
    net.hidden.bias.div_(s)
    net.head.weight.mul_(s)
    return s


@torch.no_grad()
def accuracy(net: FeatureCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    _, probs = embed(net, images)
    return round(float((probs.argmax(1) == labels).double().mean()), 5)


def train_classifier(cfg: ClassifierConfig, progress: bool = True) -> Classifier:
    """Train the feature CNN on ``cfg.dataset`` (AdamW, cosine LR, shift augmentation, seeded)."""
    fit, unseen, test = classifier_splits(cfg.dataset, cfg.data_dir, cfg.held_back)
    classes = int(max(fit.labels.max(), test.labels.max())) + 1
    torch.manual_seed(cfg.seed)
    arch = {"type": ARCH_TYPE, "in_channels": fit.shape[0], "widths": list(cfg.widths),
            "features": cfg.features, "classes": classes}
    net = build_classifier(arch)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(fit)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(cfg.seed)
    bar = None
    if progress:
        from ..io import progress as tqdm
        bar = tqdm(total=total, desc=f"classifier {cfg.dataset}", unit="step", leave=False)
    t0 = time.perf_counter()
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        net.train()
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = _augment(fit.images[idx], cfg.shift, cfg.hflip, g)
            for group in opt.param_groups:  # cosine decay to 0
                group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(net(x), fit.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    net.eval()
    scale = normalise_feature_scale(net, fit.images)
    record = {
        "format": FORMAT, "architecture": arch, "dataset": cfg.dataset, "config": asdict(cfg),
        "data_source": fit.source, "classes": classes,
        "train_images": len(fit), "unseen_images": len(unseen), "test_images": len(test),
        "test_accuracy": accuracy(net, test.images, test.labels),
        "unseen_accuracy": accuracy(net, unseen.images, unseen.labels) if len(unseen) else None,
        "train_accuracy": accuracy(net, fit.images, fit.labels),
        "train_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
        "feature_scale_folded": scale,
    }
    record["weights_sha"] = weights_hash(net.state_dict())
    return Classifier(net, record)


# --- files ----------------------------------------------------------------------------------

def save_classifier(clf: Classifier, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in clf.net.state_dict().items()}
    record = dict(clf.record, weights_sha=weights_hash(state))
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"leandiff": json.dumps(record, sort_keys=True)})
    write_json(out_dir / META_NAME, record)
    clf.record, clf.path = record, out_dir
    return out_dir


def classifier_dir(dataset: str) -> Path:
    return CLASSIFIER_DIR / dataset


def load_classifier(where: str | Path) -> Classifier:
    """Load a classifier from a directory, or the shipped one for a dataset name (``mnist``,
    ``fashion-mnist``, ...)."""
    from safetensors.torch import load_file

    p = Path(where)
    if not (p / META_NAME).is_file():
        shipped = classifier_dir(str(where))
        if not (shipped / META_NAME).is_file():
            known = sorted(d.name for d in CLASSIFIER_DIR.iterdir() if (d / META_NAME).is_file()) \
                if CLASSIFIER_DIR.is_dir() else []
            raise UserError(f"no classifier at {where!r} and none shipped for it (shipped: {', '.join(known) or 'none'}); "
                            f"train one with: leandiff classifier train --dataset {where}")
        p = shipped
    record = read_json(p / META_NAME)
    if record.get("format") != FORMAT:
        raise UserError(f"{p}: not a leandiff classifier (format={record.get('format')!r})")
    net = build_classifier(record.get("architecture"))
    try:
        state = load_file(str(p / WEIGHTS_NAME))
        net.load_state_dict(state, strict=True)
    except (OSError, RuntimeError) as e:
        raise UserError(f"{p}: classifier weights unreadable or do not fit ({str(e).splitlines()[0][:160]})") from None
    if weights_hash(state) != record.get("weights_sha"):
        raise UserError(f"{p}: weights hash {weights_hash(state)} differs from the record's {record.get('weights_sha')}")
    net.eval()
    return Classifier(net, copy.deepcopy(record), p)


def default_config(dataset: str, **overrides) -> ClassifierConfig:
    base = DEFAULTS.get(dataset, ClassifierConfig(dataset))
    return ClassifierConfig(**{**asdict(base), "dataset": dataset, **{k: v for k, v in overrides.items() if v is not None}})
