"""Image data sets: generated shapes and digits, folders, npz, and the batch protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kubearch_trainer.config import load_config
from kubearch_trainer.data import DataError, Dataset, build_datasets
from kubearch_trainer.data.images import SHAPES_FACTOR_SIZES, build_image_datasets, render_shapes


def _cfg(**data: object):
    return load_config({"model": {"architecture": "vae", "imageSize": 16}, "data": data})


def test_defaults_per_task() -> None:
    assert "shapes" in build_image_datasets(_cfg(), "image_recon").describe()
    assert "digits" in build_image_datasets(_cfg(), "image_cls").describe()
    assert "digits" in build_image_datasets(_cfg(), "image_gen").describe()
    assert isinstance(build_datasets(_cfg(), "image_recon"), Dataset)


def test_shapes_batches_carry_factors_and_are_deterministic() -> None:
    ds = build_image_datasets(_cfg(), "image_recon")
    a = ds.get_batch(3, 0, 0, 1, 8, "cpu")
    b = ds.get_batch(3, 0, 0, 1, 8, "cpu")
    c = ds.get_batch(4, 0, 0, 1, 8, "cpu")
    assert a["images"].shape == (8, 1, 16, 16) and a["images"].dtype == torch.float32
    assert float(a["images"].min()) >= 0 and float(a["images"].max()) <= 1
    assert a["factors"].shape == (8, 5)
    assert bool((a["factors"] < torch.tensor(SHAPES_FACTOR_SIZES)).all())
    assert torch.equal(a["images"], b["images"]) and not torch.equal(a["images"], c["images"])
    # ranks split one global batch: 2 ranks x 4 == 1 rank x 8
    r0, r1 = ds.get_batch(3, 0, 0, 2, 4, "cpu"), ds.get_batch(3, 0, 1, 2, 4, "cpu")
    assert torch.equal(torch.cat([r0["images"], r1["images"]]), a["images"])
    e1, e2 = ds.eval_batches(2, 4, "cpu"), ds.eval_batches(2, 4, "cpu")
    assert len(e1) == 2 and all(torch.equal(x["factors"], y["factors"]) for x, y in zip(e1, e2, strict=True))


def test_render_shapes_follows_the_factors() -> None:
    base = np.array([[0, 5, 0, 16, 16]])
    bigger, smaller = render_shapes(base, 32), render_shapes(base - [0, 5, 0, 0, 0], 32)
    assert bigger.sum() > smaller.sum() > 0  # scale factor grows the sprite
    left = render_shapes(np.array([[1, 3, 0, 0, 16]]), 32)[0]
    right = render_shapes(np.array([[1, 3, 0, 31, 16]]), 32)[0]
    cols = np.arange(32)
    assert (left.sum(0) * cols).sum() / left.sum() < (right.sum(0) * cols).sum() / right.sum()
    shapes = render_shapes(np.array([[0, 3, 5, 16, 16], [1, 3, 5, 16, 16], [2, 3, 5, 16, 16]]), 32)
    assert not np.array_equal(shapes[0], shapes[1]) and not np.array_equal(shapes[1], shapes[2])


def test_digits_are_upsampled_with_labels() -> None:
    ds = build_image_datasets(_cfg(), "image_cls")
    batch = ds.get_batch(0, 0, 0, 1, 16, "cpu")
    assert batch["images"].shape == (16, 1, 16, 16)
    assert batch["labels"].dtype == torch.long and int(batch["labels"].max()) <= 9
    assert len(ds.train) + len(ds.val) == 1797


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, images=images, labels=np.arange(40) % 3, factors=rng.integers(0, 4, size=(40, 2)))
    cfg = load_config(
        {"model": {"architecture": "cnn", "imageSize": 16, "imageChannels": 3}, "data": {"path": str(path)}}
    )
    ds = build_image_datasets(cfg, "image_cls")
    batch = ds.eval_batches(1, 4, "cpu")[0]
    assert batch["images"].shape == (4, 3, 16, 16) and float(batch["images"].max()) <= 1.0
    assert {"labels", "factors"} <= set(batch)
    np.savez(tmp_path / "bad.npz", pixels=images)
    with pytest.raises(DataError, match="no 'images' array"):
        build_image_datasets(_cfg(path=str(tmp_path / "bad.npz")), "image_recon")


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    from PIL import Image

    for cls, value in (("cats", 30), ("dogs", 220)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((10, 12), value, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = build_image_datasets(_cfg(path=str(tmp_path)), "image_cls")
    batches = [*ds.eval_batches(1, len(ds.val), "cpu"), ds.get_batch(0, 0, 0, 1, 8, "cpu")]
    for b in batches:
        bright = b["images"].mean(dim=(1, 2, 3)) > 0.5
        assert torch.equal(bright, b["labels"] == 1)  # dogs (class 1) are the bright images


def test_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.dataset"):
        build_image_datasets(_cfg(dataset="cifar"), "image_recon")
    with pytest.raises(DataError, match=r"data\.path"):
        build_image_datasets(_cfg(path=str(tmp_path / "missing")), "image_recon")
    with pytest.raises(DataError, match=r"data\.path: no images"):
        build_image_datasets(_cfg(path=str(tmp_path)), "image_recon")
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(flat / "a.png")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(flat / "b.png")
    with pytest.raises(DataError, match="needs labels"):
        build_image_datasets(_cfg(path=str(flat)), "image_cls")
