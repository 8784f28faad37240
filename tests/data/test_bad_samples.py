"""Bad data: unusual images are converted; unreadable files, missing files, boxes outside the image and labels
beyond the classes are skipped with a warning naming the file (counted) or raise, as ``on_bad_sample`` says."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from swinlab.data import ADE20KDataModule, COCODataModule, FashionMNISTDataModule, ImageFolderDataModule
from swinlab.data.bad_samples import (
    PLACEHOLDER_SIZE,
    READ_ERROR_KEY,
    BadSampleError,
    BadSampleReport,
    open_image,
    placeholder_image,
)
from swinlab.data.fashion_mnist import _grey_image_to_tensor


def write_jpeg(path: Path, size: int = 40, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unusual_images_become_8_bit_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((4, 6), 90, dtype=np.uint8), "L").save(grey)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(deep)  # 16-bit greyscale PNG
    alpha = tmp_path / "alpha.png"
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(alpha)  # fully transparent

    assert Image.open(deep).mode.startswith("I")
    for path in (grey, cmyk, deep, alpha):
        assert open_image(path).mode == "RGB", path.name
    assert np.asarray(open_image(grey))[0, 0].tolist() == [90, 90, 90]
    red = np.asarray(open_image(cmyk))[0, 0]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    # Scaled to 8 bits, not clipped: mid-grey stays mid-grey.
    assert np.asarray(open_image(deep))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(open_image(alpha)).min() == 255, "transparent pixels are composited on white"


def test_truncated_corrupt_and_missing_files_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    write_jpeg(truncated)
    truncate(truncated)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    for path in (truncated, corrupt, tmp_path / "missing.jpg"):
        with pytest.raises(BadSampleError, match=path.name):
            open_image(path)


@pytest.fixture
def folder_with_bad_images(tmp_path) -> Path:
    """ImageFolder layout, 2 classes x 3 images; class a's second image is truncated, class b's a CMYK JPEG."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("a", "b"):
            for i in range(3):
                write_jpeg(root / split / label / f"{i}.jpg", seed=i)
    truncate(root / "train" / "a" / "1.jpg")
    Image.new("CMYK", (40, 40), (0, 0, 255, 0)).save(root / "train" / "b" / "0.jpg")
    return root


def image_folder_module(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        str(root), image_size=32, batch_size=2, pin_memory=False, auto_augment=None, **{"num_workers": 0, **kwargs}
    )


def test_image_folder_skips_a_truncated_file_and_keeps_training(folder_with_bad_images, caplog):
    module = image_folder_module(folder_with_bad_images)
    module.setup("fit")
    train = module.train_set
    samples = [train[i] for i in range(len(train))]
    images, labels = [sample["image"] for sample in samples], tuple(sample["label"] for sample in samples)
    assert all(image.shape == (3, 32, 32) for image in images)
    assert samples[1]["file"] == "a/2.jpg"
    # Sample 1 (the truncated a/1.jpg) is replaced by the next one, a/2.jpg; the CMYK b/0.jpg is converted.
    assert labels == (0, 0, 0, 1, 1, 1)
    assert list(train.guard.bad_samples) == [1]
    assert "1.jpg" in caplog.text and "truncated" in caplog.text
    batches = list(module.train_dataloader())
    assert len(batches) == 3 and all(batch["image"].shape == (2, 3, 32, 32) for batch in batches)


def test_image_folder_raises_on_request(folder_with_bad_images):
    module = image_folder_module(folder_with_bad_images, on_bad_sample="raise")
    module.setup("fit")
    with pytest.raises(BadSampleError, match=r"a/1\.jpg.*on_bad_sample=raise"):
        module.train_set[1]
    with pytest.raises(ValueError, match="on_bad_sample must be 'skip' or 'raise'"):
        image_folder_module(folder_with_bad_images, on_bad_sample="ignore")


@pytest.fixture
def coco_root(tmp_path) -> Path:
    """COCO layout: image 1 fine (one box inside, one wholly outside the 32x24 image), image 2 missing on disk,
    image 3 fine."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    images = []
    for image_id in (1, 2, 3):
        name = f"{image_id:012d}.jpg"
        if image_id != 2:
            (root / "val2017").mkdir(exist_ok=True)
            Image.new("RGB", (32, 24), (10 * image_id, 0, 0)).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 32, "height": 24})
    box = {"iscrowd": 0, "category_id": 1, "area": 16.0}
    annotations = [
        {**box, "id": 10, "image_id": 1, "bbox": [2.0, 2.0, 4.0, 4.0]},
        {**box, "id": 11, "image_id": 1, "bbox": [40.0, 5.0, 6.0, 6.0]},  # right of the image
        {**box, "id": 12, "image_id": 2, "bbox": [2.0, 2.0, 4.0, 4.0]},
        {**box, "id": 13, "image_id": 3, "bbox": [2.0, 2.0, 4.0, 4.0]},
    ]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    return root


def test_coco_drops_boxes_outside_the_image_and_skips_missing_images(coco_root, caplog):
    module = COCODataModule(str(coco_root), masks=False, num_workers=0)
    module.setup("validate")
    target = module.val_set[0]["target"]
    assert target["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0]] and module.val_set.dropped_boxes == 1
    assert "000000000001.jpg" in caplog.text and "[11]" in caplog.text
    target = module.val_set[1]["target"]  # the missing image 2 is replaced by image 3
    assert target["image_id"] == 3 and list(module.val_set.guard.bad_samples) == [1]
    assert "000000000002.jpg: image file not found" in caplog.text

    strict = COCODataModule(str(coco_root), masks=False, num_workers=0, on_bad_sample="raise")
    strict.setup("validate")
    with pytest.raises(BadSampleError, match="000000000002.jpg: image file not found"):
        strict.val_set[1]


def test_ade20k_skips_a_label_map_with_labels_beyond_the_classes(tmp_path, caplog):
    root = tmp_path / "ade"
    for split in ("training", "validation"):
        for i in range(3):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            write_jpeg(root / "images" / split / f"{i}.jpg", size=16, seed=i)
            label = np.full((16, 16), 9 if i == 0 else 1, dtype=np.uint8)  # 9 -> class 8, beyond 3 classes
            Image.fromarray(label, "L").save(root / "annotations" / split / f"{i}.png")
    kwargs = {"class_names": ["a", "b", "c"], "crop_size": 16, "scale": (32, 16), "test_scale": None, "num_workers": 0}
    module = ADE20KDataModule(str(root), **kwargs)
    module.setup("validate")
    assert module.datasets["val"][0]["file"] == "1.jpg" and "0.jpg: label 8 >= num_classes 3" in caplog.text
    strict = ADE20KDataModule(str(root), on_bad_sample="raise", **kwargs)
    strict.setup("validate")
    with pytest.raises(BadSampleError, match="0.jpg: label 8 >= num_classes 3"):
        strict.datasets["val"][0]


class MeanColourClassifier(LightningModule):
    """The smallest classifier of ``{"image", "label"}`` batches: a linear layer on the mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 2)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        return torch.nn.functional.cross_entropy(self.head(images.mean(dim=(2, 3))), labels)

    def training_step(self, batch, batch_idx):
        return self.step(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.step(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skipped_samples_are_summed_over_workers_and_reported_once_per_epoch(tmp_path, caplog):
    """12 training images of which 2 are truncated, 6 validation images of which 2 are truncated (sample 1 read by
    worker 0, sample 3 by worker 1), read by 2 workers for 2 epochs: each epoch reports the totals."""
    root = tmp_path / "data"
    for split, count in (("train", 6), ("val", 3)):
        for label in ("a", "b"):
            for i in range(count):
                write_jpeg(root / split / label / f"{i}.jpg", seed=i)
    for bad in ("train/a/4.jpg", "train/b/1.jpg", "val/a/1.jpg", "val/b/0.jpg"):
        truncate(root / bad)
    module = image_folder_module(root, num_workers=2)  # persistent workers: epoch 2 reuses them
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "logs", name="", version=""),
        callbacks=[BadSampleReport()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with caplog.at_level(logging.WARNING, logger="swinlab.data.bad_samples"):
        trainer.fit(MeanColourClassifier(), datamodule=module)

    reports = [r.getMessage() for r in caplog.records if "samples skipped" in r.getMessage()]
    assert len(reports) == 4, reports  # train and val, once per epoch (not for the sanity check)
    for epoch in (0, 1):
        train_report = next(r for r in reports if r.startswith(f"train epoch {epoch}:"))
        assert "2 of 12 samples skipped" in train_report
        assert "a/4.jpg" in train_report and "b/1.jpg" in train_report and "truncated" in train_report
        val_report = next(r for r in reports if r.startswith(f"val epoch {epoch}:"))
        assert "2 of 6 samples skipped" in val_report and "a/1.jpg" in val_report and "b/0.jpg" in val_report
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["train/bad_samples"]) for row in rows if row["train/bad_samples"]] == [2.0, 2.0]
    assert [float(row["val/bad_samples"]) for row in rows if row["val/bad_samples"]] == [2.0, 2.0]


def test_a_counting_loader_sums_the_skips_of_its_workers(folder_with_bad_images):
    """Validation order: a/0 a/1 a/2 b/0 b/1 b/2, truncated a/1 (batch 0, worker 0) and b/0 (batch 1, worker 1)."""
    truncate(folder_with_bad_images / "val" / "b" / "0.jpg")
    truncate(folder_with_bad_images / "val" / "a" / "1.jpg")
    module = image_folder_module(folder_with_bad_images, num_workers=2)
    module.setup("validate")
    loader = module.val_dataloader()
    for _ in range(2):  # the second pass counts afresh
        labels = torch.cat([batch["label"] for batch in loader])
        assert labels.tolist() == [0, 0, 0, 1, 1, 1]  # replaced by the next sample, batches keep their size
        assert loader.skipped.samples == 6 and sorted(loader.skipped.skipped) == [1, 3]
        assert "a/1.jpg" in loader.skipped.skipped[1] and "b/0.jpg" in loader.skipped.skipped[3]


@pytest.fixture
def folder_with_a_corrupt_image(tmp_path) -> Path:
    """Five images 0.jpg .. 4.jpg; 2.jpg (the middle one) is not an image."""
    root = tmp_path / "to_predict"
    for i in range(5):
        write_jpeg(root / f"{i}.jpg", seed=i)
    (root / "2.jpg").write_bytes(b"not an image at all")
    return root


def assert_only_the_middle_row_failed(files: list[str], errors: list[str]) -> None:
    assert files == [f"{i}.jpg" for i in range(5)], "every row is its own file"
    assert [bool(error) for error in errors] == [False, False, True, False, False]
    assert "2.jpg: unreadable image" in errors[2]


def test_classification_predict_marks_an_unreadable_file_failed_in_its_own_row(
    folder_with_a_corrupt_image, fashion_mnist_dir, caplog
):
    module = FashionMNISTDataModule(str(fashion_mnist_dir), predict_dir=str(folder_with_a_corrupt_image), batch_size=2)
    module.setup("predict")
    batches = list(module.predict_dataloader())
    files = [file for batch in batches for file in batch["file"]]
    errors = [error for batch in batches for error in batch[READ_ERROR_KEY]]
    assert_only_the_middle_row_failed(files, errors)
    assert "2.jpg: unreadable image" in caplog.text and "marked failed" in caplog.text
    # Each readable row carries its own file's image; the failed one the placeholder, which keeps the batch shape.
    images = torch.cat([batch["image"] for batch in batches])
    for i in (1, 3):
        expected = _grey_image_to_tensor(
            open_image(folder_with_a_corrupt_image / f"{i}.jpg").convert("L"), module.eval_transform
        )
        assert torch.equal(images[i], expected)
    assert torch.equal(images[2], _grey_image_to_tensor(placeholder_image("L"), module.eval_transform))

    strict = FashionMNISTDataModule(
        str(fashion_mnist_dir), predict_dir=str(folder_with_a_corrupt_image), on_bad_sample="raise"
    )
    strict.setup("predict")
    with pytest.raises(BadSampleError, match=r"2\.jpg: unreadable image.*on_bad_sample=raise"):
        strict.predict_set[2]


def test_segmentation_predict_marks_an_unreadable_file_failed_in_its_own_row(folder_with_a_corrupt_image, tmp_path):
    kwargs = {"class_names": ["a", "b"], "scale": (32, 16), "test_scale": (32, 16), "num_workers": 0}
    folder_predict = ADE20KDataModule(str(tmp_path), predict_dir=str(folder_with_a_corrupt_image), **kwargs)
    # Predict on the validation split (no predict_dir): same folder of images, each with a label map.
    (tmp_path / "images").mkdir()
    folder_with_a_corrupt_image.rename(tmp_path / "images" / "validation")
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.ones((40, 40), dtype=np.uint8)).save(tmp_path / "annotations" / "validation" / f"{i}.png")
    validation_predict = ADE20KDataModule(str(tmp_path), **kwargs)
    folder_predict.predict_dir = str(tmp_path / "images" / "validation")
    for module in (folder_predict, validation_predict):
        module.setup("predict")
        batches = list(module.predict_dataloader())
        names = [name for batch in batches for name in batch["file"]]
        errors = [error for batch in batches for error in batch[READ_ERROR_KEY]]
        assert_only_the_middle_row_failed(names, errors)
        raw = [image for batch in batches for image in batch["raw_image"]]
        assert raw[2].shape == (3, PLACEHOLDER_SIZE, PLACEHOLDER_SIZE) and raw[3].shape == (3, 40, 40)
