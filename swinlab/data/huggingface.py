"""Hugging Face ``datasets`` on local disk, read one way by every family: find a split, read its features, decode a row.

A data folder is either a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json`` and one folder per split) or
holds parquet files anywhere below it; a parquet file belongs to split ``S`` when a folder or file name in its path
below the data folder starts with ``S`` (``train-00000-of-00257.parquet``, ``validation/0000.parquet``,
``train.parquet``; case-insensitive).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swinlab.data.bad_samples import BadSampleError, to_rgb

SAVED_DATASET_FILE = "dataset_dict.json"


def is_saved_dataset(root: Path) -> bool:
    """Whether ``root`` is a ``DatasetDict.save_to_disk`` folder."""
    return (root / SAVED_DATASET_FILE).is_file()


def holds_hf_data(root: Path, levels: int = 2) -> bool:
    """A saved dataset, or parquet files in the top ``levels`` folder levels of ``root`` (1: ``root`` itself);
    the search stays shallow because an image-folder tree may hold millions of files."""
    if is_saved_dataset(root):
        return True
    return any(next(root.glob("*/" * depth + "*.parquet"), None) for depth in range(levels))


def parquet_files(root: Path, split: str) -> list[Path]:
    """The parquet files of ``split`` under ``root``, sorted: a folder or file name in the path starts with it."""
    prefix = split.lower()
    return sorted(
        path
        for path in root.rglob("*.parquet")
        if any(part.lower().startswith(prefix) for part in path.relative_to(root).parts)
    )


def _saved_splits(root: Path) -> list[str]:
    return json.loads((root / SAVED_DATASET_FILE).read_text())["splits"]


def load_split(root: Path, split: str, cache_dir: str | None = None) -> Any:
    """Split ``split`` of the data under ``root`` as a ``datasets.Dataset`` (memory-mapped; parquet files are
    converted once into the ``datasets`` cache, ``cache_dir`` or ``HF_DATASETS_CACHE``)."""
    import datasets

    if is_saved_dataset(root):
        splits = _saved_splits(root)
        if split not in splits:
            raise ValueError(f"{root} has no split {split!r} (has {splits}); set the data module's split name")
        return datasets.load_from_disk(str(root / split))
    files = parquet_files(root, split)
    if not files:
        found = [path.relative_to(root).as_posix() for path in sorted(root.rglob("*.parquet"))[:5]]
        raise FileNotFoundError(
            f"no parquet files for split {split!r} under {root}: neither a save_to_disk folder ({SAVED_DATASET_FILE}) "
            f"nor parquet files with a folder or file name starting with {split!r} (found: {found})"
        )
    return datasets.Dataset.from_parquet([str(path) for path in files], cache_dir=cache_dir)


def split_features(root: Path, splits: Iterable[str]) -> tuple[Any, str]:
    """``(features, where)`` of the first of ``splits`` found under ``root``, read without loading its data."""
    import datasets
    import pyarrow.parquet as pq

    splits = list(dict.fromkeys(splits))
    if is_saved_dataset(root):
        split = next((s for s in splits if s in _saved_splits(root)), None)
        if split is None:
            raise ValueError(f"{root} has splits {_saved_splits(root)}; none of {splits}")
        return datasets.load_from_disk(str(root / split)).features, str(root / split)
    for split in splits:
        files = parquet_files(root, split)
        if files:
            return datasets.Features.from_arrow_schema(pq.read_schema(files[0])), str(files[0])
    raise FileNotFoundError(
        f"{root} holds neither {SAVED_DATASET_FILE} nor parquet files for the splits {splits} (a folder or file "
        "name in their path must start with the split name)"
    )


def read_row(dataset: Any, index: int, name: str, label_images: Iterable[str] = ()) -> dict[str, Any]:
    """Row ``index`` of a ``datasets.Dataset`` with its ``image`` column decoded to 8-bit RGB and the
    ``label_images`` columns (label maps) decoded as they are; an unreadable one raises ``BadSampleError``
    naming ``name``."""
    columns = ("image", *label_images)
    try:
        row = dataset[index]  # datasets decodes the images here
        for column in columns:
            row[column].load()  # a truncated image fails here, not later inside a transform
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSampleError(f"{name}: unreadable {' or '.join(columns)} ({type(err).__name__}: {err})") from err
    row["image"] = to_rgb(row["image"], name)
    return row
