"""Image classification data: any ImageFolder tree, ImageNet-1K as folders or as a Hugging Face dataset.

Also the pieces every classification DataModule shares: loaders, and ``predict_dir`` (a folder of image files to
classify; batches are ``(images, relative_paths)``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from swinlab.data.bad_samples import (
    BadSampleError,
    BadSampleGuard,
    OnBadSample,
    check_on_bad_sample,
    open_image,
    to_rgb,
)
from swinlab.data.resumable import ResumableDataLoader
from swinlab.data.transforms import classification_eval_transform, classification_train_transform


class ImageFilesDataset(Dataset):
    """Every image file under ``root`` (recursively, sorted) -> ``(transform(image), path relative to root)``.

    A file that cannot be decoded is handled as ``on_bad_sample`` says (``skip``: the next file's prediction
    takes its place, with a warning naming it).
    """

    def __init__(
        self, root: str | Path, transform: Callable, mode: str = "RGB", on_bad_sample: OnBadSample = "skip"
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"predict_dir {self.root} is not a folder; pass a folder of image files")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(
                f"predict_dir {self.root} holds no image files (looked for {', '.join(IMG_EXTENSIONS)})"
            )
        self.transform = transform
        self.mode = mode
        self.guard = BadSampleGuard(on_bad_sample)

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.files[index]
        return self.transform(open_image(path).convert(self.mode)), path.relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.guard(self._read, index, len(self))


class SafeImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that decodes with ``open_image`` (any mode -> RGB) and applies ``on_bad_sample``."""

    def __init__(self, root: str, transform: Callable, on_bad_sample: OnBadSample = "skip") -> None:
        super().__init__(root, transform=transform, loader=open_image)
        self.guard = BadSampleGuard(on_bad_sample)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.guard(super().__getitem__, index, len(self))


class ClassificationDataModule(LightningDataModule):
    """Loaders shared by the classification DataModules; subclasses set ``class_names`` and build the datasets.

    Training batches drop the last incomplete batch (Mixup/CutMix pairs samples, and the official recipe does it).
    ``on_bad_sample`` (``skip`` or ``raise``) says what happens to an image that cannot be read (see
    ``swinlab.data.bad_samples``).
    """

    class_names: list[str]

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_dir: str | None = None,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        super().__init__()
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)  # now, before any data is read
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.predict_dir = predict_dir
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict_dataset(self) -> Dataset:
        """The ``predict_dir`` images with the eval transform; subclasses say how files become tensors."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.predict_dir is None:
                raise ValueError("predict needs a folder of images: pass --data.init_args.predict_dir DIR")
            self.predict_set = self.predict_dataset()

    def _loader(self, dataset: Dataset | None, split: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} set; setup() did not build one")
        kwargs = {
            "drop_last": train,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }
        if train:
            return ResumableDataLoader(dataset, self.batch_size, **kwargs)
        return DataLoader(dataset, batch_size=self.batch_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, "predict")


class ImageFolderDataModule(ClassificationDataModule):
    """Any ``<data_dir>/<split>/<class>/<image>`` tree (torchvision ImageFolder) with the Swin transforms.

    Class names are the sorted class folder names of the first split folder that exists (train, val, test), so
    ``num_classes`` is known right after construction. ``test_dir`` defaults to ``val_dir``.
    """

    def __init__(
        self,
        data_dir: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        image_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        color_jitter: float = 0.4,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_dir: str | None = None,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, predict_dir, on_bad_sample)
        self.data_dir = Path(data_dir)
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self.train_transform = classification_train_transform(
            image_size, auto_augment, re_prob, color_jitter, interpolation, mean, std
        )
        self.eval_transform = classification_eval_transform(image_size, crop_pct, interpolation, mean, std)
        self.class_names = self._read_class_names()

    def _read_class_names(self) -> list[str]:
        for name in dict.fromkeys(self.split_dirs.values()):
            split = self.data_dir / name
            if split.is_dir():
                classes = sorted(entry.name for entry in split.iterdir() if entry.is_dir())
                if not classes:
                    raise FileNotFoundError(f"{split} has no class folders; expected {split}/<class>/<image files>")
                return classes
        tried = ", ".join(str(self.data_dir / name) for name in dict.fromkeys(self.split_dirs.values()))
        raise FileNotFoundError(
            f"no split folder found (tried {tried}); expected <data_dir>/train/<class>/*.JPEG and "
            "<data_dir>/val/<class>/*.JPEG, set --data.init_args.data_dir"
        )

    def _folder_split(self, split: str, transform: Callable) -> Dataset:
        root = self.data_dir / self.split_dirs[split]
        if not root.is_dir():
            raise FileNotFoundError(f"{split} folder {root} does not exist (layout: {root}/<class>/<image files>)")
        dataset = SafeImageFolder(str(root), transform, self.on_bad_sample)
        if dataset.classes != self.class_names:
            raise ValueError(
                f"{root} has classes {dataset.classes[:5]}... which differ from {self.class_names[:5]}...; "
                "every split must hold the same class folders"
            )
        return dataset

    def _build_split(self, split: str, transform: Callable) -> Dataset:
        return self._folder_split(split, transform)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._build_split("train", self.train_transform)
            self.val_set = self._build_split("val", self.eval_transform)
        elif stage == "validate":
            self.val_set = self._build_split("val", self.eval_transform)
        elif stage == "test":
            self.test_set = self._build_split("test", self.eval_transform)
        super().setup(stage)

    def predict_dataset(self) -> Dataset:
        return ImageFilesDataset(self.predict_dir, self.eval_transform, on_bad_sample=self.on_bad_sample)


class HFImageDataset(Dataset):
    """A Hugging Face ``datasets.Dataset`` with ``image`` and ``label`` columns -> ``(transform(image), label)``.

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

    def _read(self, index: int) -> tuple[torch.Tensor, int]:
        name = f"{self.source} row {index}"
        try:
            row = self.dataset[index]  # datasets decodes the image here
            image = row["image"]
            image.load()
        except (OSError, ValueError, SyntaxError) as err:
            raise BadSampleError(f"{name}: unreadable image ({type(err).__name__}: {err})") from err
        return self.transform(to_rgb(image, name)), int(row["label"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
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
        root = Path(data_dir)
        if source == "auto":
            # Only the top two levels: an ILSVRC2012 tree holds 1.3M files.
            parquet = next(root.glob("*.parquet"), None) or next(root.glob("*/*.parquet"), None)
            source = "hf" if (root / "dataset_dict.json").is_file() or parquet else "folder"
        if source not in ("folder", "hf"):
            raise ValueError(f"ImageNetDataModule source must be auto, folder or hf, got {source!r}")
        self.source = source
        self.hf_splits = {"train": train_split, "val": val_split, "test": test_split}
        self.hf_cache_dir = hf_cache_dir
        super().__init__(data_dir, **kwargs)

    def _read_class_names(self) -> list[str]:
        if self.source == "folder":
            return super()._read_class_names()
        return self._hf_class_names()

    def _parquet_files(self, split: str) -> list[str]:
        files = sorted(self.data_dir.rglob("*.parquet"))
        chosen = [
            str(f)
            for f in files
            if f.name.startswith(f"{split}-")
            or f.name == f"{split}.parquet"
            or split in f.relative_to(self.data_dir).parts[:-1]
        ]
        if not chosen:
            raise FileNotFoundError(
                f"no parquet files for split {split!r} under {self.data_dir}; name them {split}-*.parquet or put "
                f"them in a {split}/ folder (found: {[f.name for f in files[:5]]})"
            )
        return chosen

    def _hf_class_names(self) -> list[str]:
        import datasets
        import pyarrow.parquet as pq

        if (self.data_dir / "dataset_dict.json").is_file():
            splits = json.loads((self.data_dir / "dataset_dict.json").read_text())["splits"]
            split = next((s for s in self.hf_splits.values() if s in splits), None)
            if split is None:
                raise ValueError(f"{self.data_dir} has splits {splits}; none of {sorted(set(self.hf_splits.values()))}")
            features = datasets.load_from_disk(str(self.data_dir / split)).features
            where = str(self.data_dir / split)
        else:
            files = sorted(self.data_dir.rglob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{self.data_dir} holds neither dataset_dict.json nor parquet files")
            where = str(files[0])
            features = datasets.Features.from_arrow_schema(pq.read_schema(where))
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
        import datasets

        name = self.hf_splits[split]
        if (self.data_dir / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(self.data_dir))
            if name not in dataset:
                raise KeyError(f"{self.data_dir} has no split {name!r} (has {list(dataset)}); set {split}_split")
            dataset = dataset[name]
        else:
            files = {name: self._parquet_files(name)}
            dataset = datasets.load_dataset("parquet", data_files=files, split=name, cache_dir=self.hf_cache_dir)
        return HFImageDataset(dataset, transform, self.on_bad_sample, source=f"{self.data_dir} [{name}]")
