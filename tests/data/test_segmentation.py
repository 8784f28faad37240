from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swinlab.data.ade20k import ADE20K_CLASSES, ADE20KDataModule
from swinlab.data.huggingface import parquet_files
from swinlab.data.segmentation import SegmentationDataModule, reduce_zero_label
from swinlab.data.segmentation_transforms import SegmentationTrainTransform, rescale_size

SIZES = {"training": [(40, 56), (48, 48), (36, 60)], "validation": [(44, 52), (40, 40)]}


def _label_map(height: int, width: int, seed: int) -> np.ndarray:
    """ADE20K numbering: 0 = other, 1..3 classes."""
    labels = np.random.default_rng(seed).integers(1, 4, size=(height, width), dtype=np.uint8)
    labels[:3] = 0
    return labels


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def ade_folder(tmp_path: Path) -> Path:
    """ADEChallengeData2016 layout: images/{split}/*.jpg, annotations/{split}/*.png."""
    for split, sizes in SIZES.items():
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            stem = f"ADE_{split}_{i:08d}"
            Image.fromarray(_image(h, w, i)).save(tmp_path / "images" / split / f"{stem}.jpg")
            Image.fromarray(_label_map(h, w, i)).save(tmp_path / "annotations" / split / f"{stem}.png")
    return tmp_path


def _module(root: Path, **kwargs) -> SegmentationDataModule:
    defaults = dict(
        class_names=["a", "b", "c"],
        reduce_zero_label=True,
        crop_size=32,
        scale=(128, 32),
        test_scale=(128, 32),
        num_workers=0,
    )
    return SegmentationDataModule(str(root), **{**defaults, **kwargs})


def test_ade20k_is_the_generic_module_with_its_150_classes_and_zero_reduced() -> None:
    module = ADE20KDataModule("unused")
    assert isinstance(module, SegmentationDataModule)
    assert module.num_classes == 150 == len(set(ADE20K_CLASSES))
    assert module.class_names[0] == "wall" and module.class_names[-1] == "flag"
    assert module.reduce_zero_label and not SegmentationDataModule("unused", class_names=["a"]).reduce_zero_label
    assert ADE20KDataModule("unused", class_names=["a", "b"], crop_size=64).train_transform.crop_size == (64, 64)


def test_generic_module_needs_class_names() -> None:
    with pytest.raises(ValueError, match="SegmentationDataModule needs class_names"):
        SegmentationDataModule("unused")


def test_reduce_zero_label() -> None:
    mask = torch.tensor([[0, 1, 2], [150, 255, 3]], dtype=torch.uint8)
    assert reduce_zero_label(mask).tolist() == [[255, 0, 1], [149, 255, 2]]


def test_folder_layout_train_and_eval_samples(ade_folder: Path) -> None:
    module = _module(ade_folder, batch_size=2)
    module.setup("fit")
    assert len(module.datasets["train"]) == 3 and len(module.datasets["val"]) == 2
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}

    val = next(iter(module.val_dataloader()))
    assert val["file"] == ["ADE_validation_00000000.jpg"]
    # Labels stay at the original size, reduced; the image is resized into test_scale (short side 32).
    expected = np.where(_label_map(44, 52, 0) == 0, 255, _label_map(44, 52, 0).astype(np.int64) - 1)
    assert torch.equal(val["mask"][0], torch.from_numpy(expected))
    assert val["image"][0].shape == (3, *rescale_size(44, 52, (128, 32))) == (3, 32, 38)


def test_train_fraction_keeps_a_fixed_choice_of_training_images(ade_folder: Path) -> None:
    """Low-label runs (docs/pretraining.md): 2 of the 3 training images, the same choice every epoch and run."""
    chosen = []
    for _ in range(2):
        module = _module(ade_folder, train_fraction=0.6, split_seed=1)
        module.setup("fit")
        assert len(module.datasets["train"]) == 2 and len(module.datasets["val"]) == 2
        chosen.append(module.train_set.indices)
    assert chosen[0] == chosen[1]
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\], got 0"):
        _module(ade_folder, train_fraction=0)


def test_without_reduce_zero_label_zero_is_a_class(ade_folder: Path) -> None:
    module = _module(ade_folder, class_names=["other", "a", "b", "c"], reduce_zero_label=False)
    module.setup("validate")
    assert torch.equal(module.datasets["val"][1]["mask"], torch.from_numpy(_label_map(40, 40, 1)).long())


def test_labels_beyond_class_names_are_reported(ade_folder: Path) -> None:
    module = _module(ade_folder, class_names=["a", "b"])
    module.setup("validate")
    with pytest.raises(ValueError, match=r"ADE_validation_00000000\.jpg: label 2 >= num_classes 2"):
        module.datasets["val"][0]


def test_missing_annotation_and_missing_folder_are_named(ade_folder: Path, tmp_path_factory, caplog) -> None:
    (ade_folder / "annotations" / "validation" / "ADE_validation_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_validation_00000001.png"):
        _module(ade_folder, on_bad_sample="raise").setup("validate")
    skipping = _module(ade_folder)
    skipping.setup("validate")
    assert len(skipping.datasets["val"]) == 1 and "ADE_validation_00000001.png" in caplog.text
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="neither images"):
        _module(empty).setup("fit")


def test_predict_dir_keeps_raw_images(ade_folder: Path) -> None:
    module = _module(ade_folder, predict_dir=str(ade_folder / "images" / "training"), eval_batch_size=3)
    module.setup("predict")
    batch = next(iter(module.predict_dataloader()))
    assert [tuple(img.shape[-2:]) for img in batch["raw_image"]] == SIZES["training"]
    assert all(img.dtype == torch.uint8 for img in batch["raw_image"])
    assert batch["file"] == [f"ADE_training_{i:08d}.jpg" for i in range(3)] and batch["error"] == ["", "", ""]


def test_parquet_source_matches_folder(ade_folder: Path, tmp_path_factory) -> None:
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    root = tmp_path_factory.mktemp("scene_parse_150")
    features = Features({"image": ImageFeature(), "annotation": ImageFeature(), "scene_category": Value("int64")})
    for split, folder in (("train", "training"), ("validation", "validation")):
        images = sorted((ade_folder / "images" / folder).iterdir())
        rows = {
            "image": [Image.open(p).convert("RGB") for p in images],
            "annotation": [Image.open(ade_folder / "annotations" / folder / f"{p.stem}.png") for p in images],
            "scene_category": [0] * len(images),
        }
        (root / "scene_parsing" / split).mkdir(parents=True)
        Dataset.from_dict(rows, features=features).to_parquet(str(root / "scene_parsing" / split / "0000.parquet"))
    assert [p.parent.name for p in parquet_files(root, "train")] == ["train"]

    parquet, folder = _module(root), _module(ade_folder, source="folder")
    parquet.setup("fit")
    folder.setup("validate")
    assert len(parquet.datasets["train"]) == 3
    assert torch.equal(parquet.datasets["val"][1]["mask"], folder.datasets["val"][1]["mask"])
    assert parquet.datasets["val"][1]["image"].shape == folder.datasets["val"][1]["image"].shape
    assert parquet.datasets["train"][0]["mask"].shape == (32, 32)


def test_parquet_without_annotation_column_is_reported(tmp_path: Path) -> None:
    from datasets import Dataset

    (tmp_path / "validation").mkdir()
    Dataset.from_dict({"pixels": [1]}).to_parquet(str(tmp_path / "validation" / "0000.parquet"))
    with pytest.raises(ValueError, match="missing \\['annotation', 'image'\\]"):
        _module(tmp_path).setup("validate")


def test_rescale_fits_long_and_short_edge() -> None:
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 4000, (2048, 512)) == (154, 2048)  # the long edge limits
    assert rescale_size(256, 256, (1024, 256)) == (256, 256)


def test_crop_avoids_one_category_dominating() -> None:
    torch.manual_seed(0)
    # Class 1 fills the right half of a 64x64 map: a random 32x32 crop has both classes below 75 % only
    # when its left edge falls in 9..23 (45 % of crops); the retries must find such a crop almost always.
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[:, 32:] = 1
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)

    def balanced_crops(cat_max_ratio: float) -> int:
        transform = SegmentationTrainTransform(
            crop_size=32, scale=(64, 64), ratio_range=(1.0, 1.0), flip_prob=0.0, cat_max_ratio=cat_max_ratio
        )
        shares = [transform(image, mask)[1].float().mean().item() for _ in range(20)]
        return sum(0.25 < share < 0.75 for share in shares)

    assert balanced_crops(0.75) >= 19
    assert balanced_crops(1.0) <= 15


def test_small_images_are_padded_with_ignore() -> None:
    transform = SegmentationTrainTransform(crop_size=48, scale=(32, 32), ratio_range=(1.0, 1.0), cat_max_ratio=1.0)
    image, mask = transform(torch.zeros(3, 20, 30, dtype=torch.uint8), torch.ones(20, 30, dtype=torch.uint8))
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert (mask == 1).sum() == 21 * 32 and (mask == 255).sum() == 48 * 48 - 21 * 32
