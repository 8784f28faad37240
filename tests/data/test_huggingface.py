"""The one Hugging Face reader of ImageNet, COCO and ADE20K: split discovery, features, row decoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swinlab.data.bad_samples import BadSampleError
from swinlab.data.huggingface import holds_hf_data, load_split, parquet_files, read_row, split_features

datasets = pytest.importorskip("datasets")
FEATURES = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}


def jpeg_bytes(seed: int, truncated: bool = False) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2] if truncated else data


def split(count: int) -> datasets.Dataset:
    images = [{"bytes": jpeg_bytes(i), "path": None} for i in range(count)]
    rows = {"image": images, "label": [i % 2 for i in range(count)]}
    return datasets.Dataset.from_dict(rows, features=datasets.Features(FEATURES))


def test_parquet_files_belong_to_the_split_their_folder_or_file_name_starts_with(tmp_path: Path) -> None:
    for name in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "validation/0.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        split(2).to_parquet(str(tmp_path / name))

    def names(split: str) -> list[str]:
        return [path.relative_to(tmp_path).as_posix() for path in parquet_files(tmp_path, split)]

    assert names("train") == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert names("validation") == names("val") == ["validation/0.parquet"]
    assert names("test") == []
    assert len(load_split(tmp_path, "train")) == 4 and len(load_split(tmp_path, "validation")) == 2
    with pytest.raises(FileNotFoundError, match=r"no parquet files for split 'test'.*data/train-00000-of-00002"):
        load_split(tmp_path, "test")
    assert holds_hf_data(tmp_path) and not holds_hf_data(tmp_path, levels=1)


def test_saved_dataset_splits_and_features(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": split(3), "validation": split(1)}).save_to_disk(str(tmp_path))
    assert holds_hf_data(tmp_path, levels=1)
    assert len(load_split(tmp_path, "validation")) == 1
    with pytest.raises(ValueError, match=r"has no split 'val' \(has \['train', 'validation'\]\)"):
        load_split(tmp_path, "val")
    features, where = split_features(tmp_path, ["test", "validation", "train"])
    assert features["label"].names == ["cat", "dog"] and where == str(tmp_path / "validation")


def test_parquet_features_come_from_the_schema(tmp_path: Path) -> None:
    split(2).to_parquet(str(tmp_path / "validation.parquet"))
    features, where = split_features(tmp_path, ["train", "validation"])
    assert features == datasets.Features(FEATURES) and where == str(tmp_path / "validation.parquet")
    with pytest.raises(FileNotFoundError, match=r"parquet files for the splits \['test'\]"):
        split_features(tmp_path, ["test"])


def test_read_row_gives_rgb_and_names_an_unreadable_row() -> None:
    images = [{"bytes": jpeg_bytes(0), "path": None}, {"bytes": jpeg_bytes(1, truncated=True), "path": None}]
    table = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    row = read_row(table, 0, "set row 0")
    assert row["image"].mode == "RGB" and row["image"].size == (12, 8)
    with pytest.raises(BadSampleError, match=r"set row 1: unreadable image \(OSError: Truncated File Read"):
        read_row(table, 1, "set row 1")

    columns = {"image": images[:1], "annotation": [{"bytes": b"not a png", "path": None}]}
    labelled = datasets.Dataset.from_dict(columns, features=datasets.Features({k: datasets.Image() for k in columns}))
    with pytest.raises(BadSampleError, match=r"row 0: unreadable image or annotation \(UnidentifiedImageError"):
        read_row(labelled, 0, "row 0", label_images=["annotation"])
