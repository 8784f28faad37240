"""UnlabeledImageDataModule: every image under a folder (any depth, any Pillow format), Fashion-MNIST and Hugging
Face data without their labels; unreadable files skipped and counted; samples a function of (seed, epoch, index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swinlab.data import UnlabeledImageDataModule
from swinlab.data.bad_samples import BadSampleError
from tests.data.test_huggingface import split

MASKS = dict(image_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)


def write_mixed_folder(root: Path) -> Path:
    """Eight images in four formats at three depths, one corrupt JPEG and a text file."""
    rng = np.random.default_rng(0)
    for i, (folder, suffix) in enumerate(
        [
            ("", "jpg"),
            ("", "PNG"),
            ("a", "webp"),
            ("a", "tif"),
            ("a/b", "bmp"),
            ("a/b", "jpeg"),
            ("c", "gif"),
            ("c", "png"),
        ]
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 40, 3), dtype=np.uint8)).save(root / folder / f"{i}.{suffix}")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_nested_folder_of_any_format_gives_masked_samples_and_counts_the_unreadable(tmp_path):
    root = write_mixed_folder(tmp_path / "images")
    data = UnlabeledImageDataModule(str(root), val_size=2, batch_size=3, **MASKS)
    assert data.num_classes is None
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 9  # the eight images and the broken one, not the text file
    epoch = list(data.train_dataloader())
    assert [len(batch["image"]) for batch in epoch] == [3, 3]  # 7 training samples, last partial batch dropped
    batch = epoch[0]
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 8, 8) and batch["mask"].sum(dim=(1, 2)).tolist() == [40] * 3  # ceil(9.6) x 4
    # One sample per batch: every file is read once per pass; the broken one is counted where it lies.
    counting = UnlabeledImageDataModule(str(root), val_size=2, batch_size=1, **MASKS)
    counting.setup("fit")
    loaders = [counting.train_dataloader(), counting.val_dataloader()]
    assert sum(len(list(loader)) for loader in loaders) == 9
    reasons = [reason for loader in loaders for reason in loader.skipped.skipped.values()]
    assert len(reasons) == 1 and "broken.jpg: unreadable image" in reasons[0]

    strict = UnlabeledImageDataModule(str(root), val_size=2, on_bad_sample="raise", **MASKS)
    strict.setup("fit")
    with pytest.raises(BadSampleError, match="broken.jpg"):
        [strict.train_set[(0, i)] for i in range(len(strict.train_set))] + [strict.val_set[i] for i in range(2)]


def test_samples_are_a_function_of_seed_epoch_and_index(tmp_path):
    root = write_mixed_folder(tmp_path / "images")
    (root / "a" / "broken.jpg").unlink()
    data = UnlabeledImageDataModule(str(root), val_size=2, seed=3, **MASKS)
    data.setup("fit")
    first = data.train_set[(0, 1)]
    torch.manual_seed(123)  # whatever the global generators hold (a resumed run, a worker)
    again, later = data.train_set[(0, 1)], data.train_set[(1, 1)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["image"], later["image"]) or not torch.equal(first["mask"], later["mask"])
    assert torch.equal(data.val_set[0]["mask"], data.val_set[0]["mask"])  # validation masks never change
    other_seed = UnlabeledImageDataModule(str(root), val_size=2, seed=4, **MASKS)
    other_seed.setup("fit")
    assert not torch.equal(first["mask"], other_seed.train_set[(0, 1)]["mask"])
    # The sampler hands the epoch to the data set with each index.
    loader = data.train_dataloader()
    loader.sampler.set_epoch(5)
    assert {epoch for epoch, _ in loader.sampler} == {5}


def test_fashion_mnist_images_without_labels(fashion_mnist_dir):
    data = UnlabeledImageDataModule(str(fashion_mnist_dir), channels=1, val_size=8, **MASKS)
    data.setup("fit")
    assert len(data.train_set) == 32 and data.mean == (0.2860,)
    sample = data.val_set[0]
    assert set(sample) == {"image", "mask"} and sample["image"].shape == (1, 32, 32)


def test_hugging_face_data_without_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": split(6), "validation": split(2)}).save_to_disk(str(tmp_path / "hf"))
    data = UnlabeledImageDataModule(str(tmp_path / "hf"), val_dir=str(tmp_path / "hf"), **MASKS)
    data.setup("fit")
    assert len(data.train_set) == 6 and set(data.train_set[(0, 0)]) == {"image", "mask"}


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(mask_patch_size=6), ValueError, r"mask_patch_size=6 is not a multiple of the model's patch_size=4"),
        (dict(image_size=36), ValueError, r"input size 36x36 is not a multiple of mask_patch_size=8"),
        (dict(channels=2), ValueError, r"channels must be 1 \(greyscale\) or 3 \(RGB\), got 2"),
    ],
)
def test_bad_settings_fail_with_one_line(kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        UnlabeledImageDataModule(str(tmp_path), **{**MASKS, **kwargs})


def test_a_folder_without_images_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    data = UnlabeledImageDataModule(str(tmp_path), **MASKS)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} holds no image files"):
        data.setup("fit")
