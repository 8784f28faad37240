"""ImageNet-1K as the ILSVRC2012 folders or as a Hugging Face dataset (saved with ``datasets`` or parquet files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from swinlab.data.bad_samples import BadSampleGuard, OnBadSample
from swinlab.data.classification import ImageFolderDataModule
from swinlab.data.huggingface import holds_hf_data, load_split, read_row, split_features


class HFImageDataset(Dataset):
    """A Hugging Face ``datasets.Dataset`` with ``image`` and ``label`` columns -> ``{"image": transform(image),
    "label": label}``.

    A row whose image bytes cannot be decoded is handled as ``on_bad_sample`` says.
    """

    def __init__(
        self, dataset: Any, transform: Callable, on_bad_sample: OnBadSample = "skip", source: str = ""
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.guard = BadSampleGuard(on_bad_sample)
        self.source = source

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> dict[str, Any]:
        row = read_row(self.dataset, index, f"{self.source} row {index}")
        return {"image": self.transform(row["image"]), "label": int(row["label"])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.guard(self._read, index, len(self))


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1K from the ILSVRC2012 folders or from the same data saved with Hugging Face ``datasets``.

    ``source``:
      - ``folder``: ``<data_dir>/train/<wnid>/*.JPEG`` and ``<data_dir>/val/<wnid>/*.JPEG``;
      - ``hf``: ``<data_dir>`` is a ``DatasetDict.save_to_disk`` folder, or holds parquet files named or foldered
        by split (``train-00000-of-00257.parquet``, ``validation/0000.parquet``), with an ``image`` column and a
        ``ClassLabel`` ``label`` column (the Hub's ``imagenet-1k`` layout);
      - ``auto``: ``hf`` when ``data_dir`` holds ``dataset_dict.json`` or parquet files, else ``folder``.
    ``val_split``/``test_split`` name the Hugging Face splits (ImageNet's own test split has no labels, so the
    test loop runs on ``validation``); for folders, ``val_dir``/``test_dir`` do the same. Parquet files are
    converted once into the ``datasets`` cache (``hf_cache_dir``, default ``HF_DATASETS_CACHE``).
    """

    def __init__(
        self,
        data_dir: str,
        source: Literal["auto", "folder", "hf"] = "auto",
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "validation",
        hf_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`ImageFolderDataModule`'s arguments (transforms, loaders, ``*_dir`` for folders)."""
        if source == "auto":
            source = "hf" if holds_hf_data(Path(data_dir)) else "folder"
        if source not in ("folder", "hf"):
            raise ValueError(f"ImageNetDataModule source must be auto, folder or hf, got {source!r}")
        self.source = source
        self.hf_splits = {"train": train_split, "val": val_split, "test": test_split}
        self.hf_cache_dir = hf_cache_dir
        super().__init__(data_dir, **kwargs)

    def _read_class_names(self) -> list[str]:
        if self.source == "folder":
            return super()._read_class_names()
        import datasets

        features, where = split_features(self.data_dir, self.hf_splits.values())
        label = features.get("label")
        if not isinstance(label, datasets.ClassLabel) or "image" not in features:
            raise ValueError(
                f"{where} needs an 'image' column and a ClassLabel 'label' column (for the class names), "
                f"found features {dict(features)}"
            )
        return list(label.names)

    def _build_split(self, split: str, transform: Callable) -> Dataset:
        if self.source == "folder":
            return self._folder_split(split, transform)
        name = self.hf_splits[split]
        dataset = load_split(self.data_dir, name, self.hf_cache_dir)
        return HFImageDataset(dataset, transform, self.on_bad_sample, source=f"{self.data_dir} [{name}]")
