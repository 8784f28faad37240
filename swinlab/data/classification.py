"""Image classification data: the classification base, and any ImageFolder tree.

Every classification data module takes ``predict_dir`` (a folder of image files to classify; predict batches are
``{"image": (B, C, H, W), "file": [relative path, ...], "error": ["" or why the file could not be read, ...]}``,
see ``swinlab.data.base.ImageFilesDataset``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from swinlab.data.bad_samples import BadSampleGuard, OnBadSample, open_image
from swinlab.data.base import BaseDataModule, ImageFilesDataset
from swinlab.data.transforms import classification_eval_transform, classification_train_transform


class SafeImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that decodes with ``open_image`` (any mode -> RGB), applies ``on_bad_sample`` and
    gives ``{"image": transform(image), "label": class index, "file": path relative to root}``."""

    def __init__(self, root: str, transform: Callable, on_bad_sample: OnBadSample = "skip") -> None:
        super().__init__(root, transform=transform, loader=open_image)
        self.guard = BadSampleGuard(on_bad_sample)

    def _read(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        file = Path(path).relative_to(self.root).as_posix()
        return {"image": self.transform(self.loader(path)), "label": label, "file": file}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.guard(self._read, index, len(self))


class ClassificationDataModule(BaseDataModule):
    """The base of the classification DataModules; subclasses set ``class_names`` and build the datasets.

    Batches are ``{"image": (B, C, H, W), "label": (B,)}`` (plus ``file`` where the data has files); validation and
    test use ``batch_size`` too. Training batches drop the last
    incomplete batch (Mixup/CutMix pairs samples, and the official recipe does it). ``on_bad_sample`` (``skip`` or
    ``raise``) says what happens to an image that cannot be read (see ``swinlab.data.bad_samples``).
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_dir: str | None = None,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        super().__init__(batch_size, None, num_workers, pin_memory, persistent_workers, on_bad_sample)
        self.predict_dir = predict_dir

    def predict_dataset(self) -> Dataset:
        """The ``predict_dir`` images with the eval transform; subclasses say how files become tensors."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.predict_dir is None:
                raise ValueError("predict needs a folder of images: pass --data.init_args.predict_dir DIR")
            self.predict_set = self.predict_dataset()


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
