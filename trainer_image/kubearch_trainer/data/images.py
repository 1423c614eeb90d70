"""Image data sets for the image families (tasks ``image_recon``, ``image_gen``, ``image_cls``).

Sources, all usable offline:

- ``data.path`` = a folder of images (png/jpg/jpeg/bmp/gif/webp, searched recursively; when every
  image sits in a first-level sub-folder the sub-folder names, sorted, are the class labels);
- ``data.path`` = an ``.npz`` file with an ``images`` array ([N,H,W], [N,H,W,C] or [N,C,H,W],
  uint8 0–255 or float 0–1) and optional ``labels`` [N] and ``factors`` [N,K];
- ``data.dataset`` = ``shapes``: dSprites-style binary sprites generated on the fly (3 shapes ×
  6 scales × 40 rotations × 32 x-positions × 32 y-positions = 737,280 combinations), with the
  generative factors returned as ``factors`` for disentanglement scores and the shape as ``labels``;
- ``data.dataset`` = ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, shipped with
  the package), bilinearly upsampled to ``model.image_size``, with labels.

Defaults without ``--data``: shapes for ``image_recon`` (VAEs: it has known factors), digits for
``image_cls`` and ``image_gen``. Images are resized to ``model.image_size`` and converted to
``model.image_channels``; pixel values are floats in [0, 1].

Splits are fixed (seed 0), independent of ``training.seed``, so every run validates on the same
images; training batches follow the package protocol (:mod:`kubearch_trainer.data`): a pure
function of ``(seed, step, micro)`` drawing ``world × batch_size`` samples, of which rank ``r``
keeps its slice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kubearch_trainer.config import TrainConfig
from kubearch_trainer.data import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GENERATED_DATASETS = ("shapes", "digits")
DEFAULT_DATASET = {"image_recon": "shapes", "image_gen": "digits", "image_cls": "digits"}
SPLIT_SEED = 0

#: dSprites factor sizes: shape, scale, orientation, position x, position y.
SHAPES_FACTORS = ("shape", "scale", "orientation", "pos_x", "pos_y")
SHAPES_FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPES_NAMES = ("square", "ellipse", "heart")


# ------------------------------------------------------------------------------------------ sources
class ArraySource:
    """Images held in memory as float32 [N, C, H, W] in [0, 1], with optional labels/factors."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, factors: torch.Tensor | None = None
    ) -> None:
        self.images, self.labels, self.factors = images, labels, factors

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        out = {"images": self.images[index]}
        if self.labels is not None:
            out["labels"] = self.labels[index]
        if self.factors is not None:
            out["factors"] = self.factors[index]
        return out


def render_shapes(factors: np.ndarray, image_size: int) -> np.ndarray:
    """Binary sprites [N, S, S] (float32) for integer factor rows (shape, scale, rot, x, y).

    Geometry follows dSprites: scale in [0.5, 1], orientation in [0, 2π), positions in [0, 1]
    (mapped to the central 70 % of the canvas so sprites stay mostly inside).
    """
    f = np.asarray(factors, dtype=np.float64)
    n = f.shape[0]
    coords = (np.arange(image_size) + 0.5) / image_size
    u = coords[None, None, :]  # x varies along the last axis
    v = coords[None, :, None]
    scale = 0.5 + 0.5 * f[:, 1] / (SHAPES_FACTOR_SIZES[1] - 1)
    theta = 2 * math.pi * f[:, 2] / SHAPES_FACTOR_SIZES[2]
    cx = 0.15 + 0.7 * f[:, 3] / (SHAPES_FACTOR_SIZES[3] - 1)
    cy = 0.15 + 0.7 * f[:, 4] / (SHAPES_FACTOR_SIZES[4] - 1)
    r = (0.2 * scale)[:, None, None]
    dx, dy = u - cx[:, None, None], v - cy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    p = (c * dx + s * dy) / r
    q = (-s * dx + c * dy) / r
    shape = f[:, 0].astype(np.int64)[:, None, None]
    square = np.maximum(np.abs(p), np.abs(q)) <= 0.8
    ellipse = p**2 + (q / 0.5) ** 2 <= 1.0
    hx, hy = 1.2 * p, -1.2 * q + 0.2
    heart = (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
    img = np.where(shape == 0, square, np.where(shape == 1, ellipse, heart))
    assert img.shape == (n, image_size, image_size)
    return img.astype(np.float32)


class ShapesSource:
    """dSprites-style sprites rendered on demand from a list of combination indices."""

    def __init__(self, combos: np.ndarray, image_size: int, channels: int) -> None:
        self.combos, self.image_size, self.channels = combos, image_size, channels

    def __len__(self) -> int:
        return int(self.combos.shape[0])

    def take(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        factors = np.stack(np.unravel_index(self.combos[np.asarray(idx)], SHAPES_FACTOR_SIZES), axis=1)
        images = torch.from_numpy(render_shapes(factors, self.image_size))[:, None]
        if self.channels > 1:
            images = images.expand(-1, self.channels, -1, -1).contiguous()
        fac = torch.from_numpy(factors.astype(np.int64))
        return {"images": images, "labels": fac[:, 0].clone(), "factors": fac}


# ------------------------------------------------------------------------------------------ dataset
class ImageDataset:
    """The data-set protocol of :mod:`kubearch_trainer.data` over a train and a validation source."""

    tokens_per_sample = 1

    def __init__(self, task: str, train: Any, val: Any, seed: int, source: str) -> None:
        if len(train) == 0 or len(val) == 0:
            raise DataError(f"{source}: needs at least one training and one validation image")
        self.task, self.train, self.val, self.seed, self.source = task, train, val, seed, source

    def describe(self) -> str:
        return f"{self.source}: {len(self.train)} train / {len(self.val)} val images"

    @staticmethod
    def _to(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def get_batch(
        self, step: int, micro: int, rank: int, world: int, batch_size: int, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro])
        rows = rng.integers(0, len(self.train), size=world * batch_size)
        return self._to(self.train.take(rows[rank * batch_size : (rank + 1) * batch_size]), device)

    def eval_batches(
        self, n: int, batch_size: int, device: torch.device | str
    ) -> list[dict[str, torch.Tensor]]:
        # Consecutive validation images (wrapping around): deterministic and seed-free.
        rows = np.arange(n * batch_size) % len(self.val)
        return [
            self._to(self.val.take(rows[i * batch_size : (i + 1) * batch_size]), device) for i in range(n)
        ]


# ------------------------------------------------------------------------------------------ loaders
def _split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return perm[n_val:], perm[:n_val]


def _fit(images: torch.Tensor, size: int, channels: int, where: str) -> torch.Tensor:
    """[N, C, H, W] float in [0, 1] -> ``size``² pixels and ``channels`` channels."""
    c = images.shape[1]
    if c != channels:
        if c == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images[:, :3].mean(1, keepdim=True)
        elif c == 4 and channels == 3:
            images = images[:, :3]
        else:
            raise DataError(
                f"{where}: images have {c} channels; model.image_channels={channels} cannot use them"
            )
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(
            images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return images.float().clamp(0, 1).contiguous()


def _arrays_to_sources(
    images: torch.Tensor, labels: torch.Tensor | None, factors: torch.Tensor | None, val_fraction: float
) -> tuple[ArraySource, ArraySource]:
    train_idx, val_idx = _split(images.shape[0], val_fraction)

    def pick(t: torch.Tensor | None, idx: np.ndarray) -> torch.Tensor | None:
        return None if t is None else t[torch.from_numpy(idx)]

    return (
        ArraySource(images[torch.from_numpy(train_idx)], pick(labels, train_idx), pick(factors, train_idx)),
        ArraySource(images[torch.from_numpy(val_idx)], pick(labels, val_idx), pick(factors, val_idx)),
    )


def load_digits_arrays(size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as [1797, C, size, size] floats in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    return _fit(images, size, channels, "digits"), torch.from_numpy(digits.target.astype(np.int64))


def _to_nchw(arr: np.ndarray, where: str) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[-1] in (1, 2, 3, 4) and arr.shape[1] not in (1, 2, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: 'images' must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype == torch.uint8 or float(t.float().max()) > 1.0:
        return t.float() / 255.0
    return t.float()


def load_npz(
    path: Path, size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"data.path: cannot read {path}: {err}") from None
    if "images" not in data.files:
        raise DataError(
            f"data.path: {path} has no 'images' array (arrays: {', '.join(data.files) or 'none'})"
        )
    images = _fit(_to_nchw(data["images"], str(path)), size, channels, str(path))
    labels = torch.from_numpy(data["labels"].astype(np.int64).reshape(-1)) if "labels" in data.files else None
    factors = None
    if "factors" in data.files:
        raw = np.asarray(data["factors"])
        raw = raw[:, None] if raw.ndim == 1 else raw
        # Integer codes per column (MIG needs discrete factors); float factors map to their ranks.
        cols = [np.unique(raw[:, k], return_inverse=True)[1] for k in range(raw.shape[1])]
        factors = torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))
    for name, t in (("labels", labels), ("factors", factors)):
        if t is not None and t.shape[0] != images.shape[0]:
            raise DataError(
                f"data.path: {path}: '{name}' has {t.shape[0]} rows but 'images' has {images.shape[0]}"
            )
    return images, labels, factors


def load_image_folder(path: Path, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode).resize((size, size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8).reshape(size, size, channels))
        except OSError as err:
            raise DataError(f"data.path: cannot read image {f}: {err}") from None
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    rel = [f.relative_to(path).parts for f in files]
    labels = None
    if all(len(parts) >= 2 for parts in rel):
        classes = sorted({parts[0] for parts in rel})
        labels = torch.tensor([classes.index(parts[0]) for parts in rel], dtype=torch.long)
    return images.contiguous(), labels


def build_image_datasets(cfg: TrainConfig, task: str) -> ImageDataset:
    """The image data set for ``task`` as configured by ``cfg.data`` (see the module docstring)."""
    size, channels = cfg.model.image_size, cfg.model.image_channels
    data, seed = cfg.data, cfg.training.seed
    if data.path:
        path = Path(data.path)
        if not path.exists():
            raise DataError(f"data.path: {path} does not exist")
        fmt = data.format
        if fmt == "auto":
            fmt = "npz" if path.suffix.lower() == ".npz" else "images" if path.is_dir() else "unknown"
        if fmt == "npz":
            images, labels, factors = load_npz(path, size, channels)
        elif fmt in ("images", "folder") and path.is_dir():
            images, labels = load_image_folder(path, size, channels)
            factors = None
        else:
            raise DataError(
                f"data.format: image tasks read 'images' (a folder) or 'npz', not {fmt!r} ({path})"
            )
        train, val = _arrays_to_sources(images, labels, factors, data.val_fraction)
        source = str(path)
    else:
        name = data.dataset or DEFAULT_DATASET.get(task, "shapes")
        if name == "shapes":
            combos_total = int(np.prod(SHAPES_FACTOR_SIZES))
            train_idx, val_idx = _split(combos_total, data.val_fraction)
            train = ShapesSource(train_idx, size, channels)
            val = ShapesSource(val_idx, size, channels)
        elif name == "digits":
            images, labels = load_digits_arrays(size, channels)
            train, val = _arrays_to_sources(images, labels, None, data.val_fraction)
        else:
            raise DataError(
                f"data.dataset: {name!r} is not one of {', '.join(GENERATED_DATASETS)} for image tasks"
            )
        source = f"generated:{name}"
    if task == "image_cls":
        if getattr(train, "labels", True) is None:
            raise DataError(
                f"{source}: task image_cls needs labels (sub-folders per class or an npz 'labels')"
            )
        if isinstance(train, ArraySource) and train.labels is not None:
            top = int(train.labels.max())
            if top >= cfg.model.num_classes:
                raise DataError(f"model.num_classes: {cfg.model.num_classes} but the labels go up to {top}")
    return ImageDataset(task, train, val, seed, source)
