import numpy as np
import pytest
import torch
from PIL import Image

from swinlab.data import ImageFolderDataModule, ImageNetDataModule

SMALL = {"image_size": 32, "batch_size": 2, "num_workers": 0}
WNIDS = ["n01440764", "n01443537", "n01484850"]


def test_folder_layout(image_folder):
    dm = ImageNetDataModule(data_dir=str(image_folder), **SMALL)
    assert dm.source == "folder"
    assert dm.num_classes == 3 and dm.class_names == WNIDS
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6
    batch = next(iter(dm.train_dataloader()))
    images, labels = batch["image"], batch["label"]
    assert images.shape == (2, 3, 32, 32) and labels.dtype == torch.int64
    dm.setup("test")  # ImageNet's test loop runs on val
    assert len(dm.test_set) == 6


def test_eval_transform_resizes_then_centre_crops(image_folder):
    dm = ImageNetDataModule(data_dir=str(image_folder), crop_pct=0.5, **SMALL)
    resize, crop = dm.eval_transform.transforms[:2]
    assert resize.size == 64 and tuple(crop.size) == (32, 32)
    with pytest.raises(ValueError, match="crop_pct"):
        ImageNetDataModule(data_dir=str(image_folder), crop_pct=1.5, **SMALL)


def test_train_transform_is_the_swin_recipe(image_folder):
    transforms = ImageNetDataModule(data_dir=str(image_folder), **SMALL).train_transform.transforms
    names = [type(t).__name__ for t in transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names and names[-1] == "RandomErasing"


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        ImageNetDataModule(data_dir=str(tmp_path), **SMALL)


def test_image_folder_with_own_split_names(image_folder):
    (image_folder / "train").rename(image_folder / "training")
    dm = ImageFolderDataModule(data_dir=str(image_folder), train_dir="training", test_dir="val", **SMALL)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and dm.num_classes == 3


def test_splits_with_different_classes_are_rejected(image_folder):
    (image_folder / "val" / WNIDS[0]).rename(image_folder / "val" / "n99999999")
    dm = ImageFolderDataModule(data_dir=str(image_folder), **SMALL)
    with pytest.raises(ValueError, match="same class folders"):
        dm.setup("fit")


def _hf_dataset_dict():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "fox"])})

    def split(count: int):
        images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(count)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(count)]}, features=features)

    return datasets.DatasetDict({"train": split(6), "validation": split(3)})


def test_hugging_face_saved_dataset(tmp_path):
    _hf_dataset_dict().save_to_disk(str(tmp_path / "hf"))
    dm = ImageNetDataModule(data_dir=str(tmp_path / "hf"), **SMALL)
    assert dm.source == "hf" and dm.class_names == ["cat", "dog", "fox"]
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3
    batch = next(iter(dm.val_dataloader()))
    images, labels = batch["image"], batch["label"]
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]


def test_hugging_face_parquet_files(tmp_path):
    root = tmp_path / "parquet" / "data"
    root.mkdir(parents=True)
    for name, split in _hf_dataset_dict().items():
        split.to_parquet(str(root / f"{name}-00000-of-00001.parquet"))
    dm = ImageNetDataModule(data_dir=str(tmp_path / "parquet"), hf_cache_dir=str(tmp_path / "cache"), **SMALL)
    assert dm.source == "hf" and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3
    sample = dm.train_set[1]
    image, label = sample["image"], sample["label"]
    assert image.shape == (3, 32, 32) and label == 1
    with pytest.raises(FileNotFoundError, match="no parquet files for split 'test'"):
        ImageNetDataModule(data_dir=str(tmp_path / "parquet"), test_split="test", **SMALL).setup("test")


def test_predict_dir(image_folder, predict_folder):
    dm = ImageNetDataModule(data_dir=str(image_folder), predict_dir=str(predict_folder), **SMALL)
    dm.setup("predict")
    assert len(dm.predict_set) == 3  # notes.txt is skipped
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["file"] == ["img_0.JPEG", "img_1.JPEG"]
    assert batch["error"] == ["", ""]
    with pytest.raises(ValueError, match="predict_dir"):
        ImageNetDataModule(data_dir=str(image_folder), **SMALL).setup("predict")


def test_rand_augment_at_full_magnitude_never_crashes():
    """The Swin recipe's RandAugment reaches magnitude 10, where posterize keeps 0 bits (Pillow 13 raises)."""
    import numpy as np
    from PIL import Image

    from swinlab.data.transforms import classification_train_transform

    transform = classification_train_transform(32, auto_augment="rand-m10-n8-inc1", re_prob=0.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    for _ in range(30):
        assert transform(image).shape == (3, 32, 32)
