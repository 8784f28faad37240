"""Fashion-MNIST from the four standard idx files (the quickstart's data), read from a folder or downloaded."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar
from urllib.error import URLError

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import calculate_md5, download_url

from swinlab.data.bad_samples import OnBadSample
from swinlab.data.base import ImageFilesDataset
from swinlab.data.classification import ClassificationDataModule
from swinlab.data.transforms import fashion_mnist_transform

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # number of dimensions -> magic number of unsigned-byte idx files


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte idx file (gzipped or not) -> uint8 array, shape (N,) for labels, (N, H, W) for images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = data[3]
    if ndim not in _IDX_MAGIC or magic != _IDX_MAGIC[ndim]:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic number {magic})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} bytes of data, its header says shape {shape}: truncated file?")
    return array.reshape(shape)


class TensorImageDataset(Dataset):
    """uint8 images (N, 1, H, W) and labels (N,) -> ``{"image": transform(image), "label": label}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.transform(self.images[index]), "label": int(self.labels[index])}


class FashionMNISTDataModule(ClassificationDataModule):
    """Fashion-MNIST (10 classes, 60k train / 10k test, 28x28 grey) as (1, S, S) tensors, S = ``image_size``.

    ``val_size`` images of the training file (a fixed random choice, ``split_seed``) are held out for validation;
    ``labels_per_class`` keeps only that many training images of each class (a random choice by ``split_seed``);
    the test loop runs on the 10k test file. Predict images are read as greyscale and resized to 28x28 first.

    ``download=True`` fetches the idx .gz files missing from ``data_dir`` (in ``prepare_data``, so once per node)
    from ``mirrors`` and checks them against ``checksums`` (both torchvision's); files already there are used as
    they are.
    """

    # Class attributes, so a mirror (or a test's local server) can stand in: URL = mirror + file name.
    mirrors: ClassVar[tuple[str, ...]] = tuple(FashionMNIST.mirrors)
    checksums: ClassVar[dict[str, str]] = dict(FashionMNIST.resources)  # "<name>.gz" -> MD5

    def __init__(
        self,
        data_dir: str = "/usr/share/datasets/fashion-mnist",
        image_size: int = 32,
        augment: bool = True,
        crop_padding: int = 2,
        val_size: int = 5000,
        split_seed: int = 0,
        labels_per_class: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        predict_dir: str | None = None,
        on_bad_sample: OnBadSample = "skip",
        download: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, predict_dir, on_bad_sample)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.data_dir = Path(data_dir)
        self.val_size = val_size
        self.split_seed = split_seed
        self.labels_per_class = labels_per_class
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.train_transform = fashion_mnist_transform(image_size, augment=augment, crop_padding=crop_padding)
        self.eval_transform = fashion_mnist_transform(image_size)
        self.download = download
        if not download:
            self._files()  # fail now, naming the folder, rather than after the model is built

    def _how_to_get_the_data(self) -> str:
        return (
            f"Fill {self.data_dir} with the four idx .gz files ({', '.join(self.checksums)}) in one of two ways: "
            "install the Debian/Ubuntu package (`sudo apt-get install dataset-fashion-mnist`, files in "
            "/usr/share/datasets/fashion-mnist, the default data_dir), or run once with "
            "--data.init_args.download=true on a machine with network access (and a writable data_dir)"
        )

    def _find(self, name: str) -> Path | None:
        return next((p for p in (self.data_dir / f"{name}.gz", self.data_dir / name) if p.is_file()), None)

    def _files(self) -> dict[str, Path]:
        """The four idx files by key (``train_images``...), gzipped or not; a FileNotFoundError names the missing."""
        found = {key: self._find(name) for key, name in FASHION_MNIST_FILES.items()}
        missing = [f"{FASHION_MNIST_FILES[key]}.gz" for key, path in found.items() if path is None]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST file(s) {', '.join(missing)} not found in {self.data_dir}. "
                + self._how_to_get_the_data()
            )
        return found

    def prepare_data(self) -> None:
        """With ``download``: fetch each missing idx .gz file into ``data_dir``, trying ``mirrors`` in turn."""
        if not self.download:
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"cannot create data_dir {self.data_dir} for the download ({err}); pass a writable one"
            ) from err
        for name in FASHION_MNIST_FILES.values():
            if self._find(name) is None:
                self._download(f"{name}.gz")

    def _download(self, filename: str) -> None:
        expected = self.checksums[filename]
        target = self.data_dir / filename
        errors = []
        for mirror in self.mirrors:
            url = f"{mirror}{filename}"
            try:
                download_url(url, str(self.data_dir), filename)
            except (URLError, OSError, RuntimeError) as err:
                errors.append(f"{url}: {type(err).__name__}: {err}")
                target.unlink(missing_ok=True)  # a partial file must not pass for the data next time
                continue
            actual = calculate_md5(str(target))
            if actual == expected:
                logger.info("downloaded %s from %s", target, url)
                return
            target.unlink()
            errors.append(f"{url}: MD5 checksum {actual} differs from the expected {expected} (corrupt download)")
        raise RuntimeError(
            f"could not download Fashion-MNIST file {filename} into {self.data_dir}: "
            + "; ".join(errors)
            + ". "
            + self._how_to_get_the_data()
        )

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        files = self._files()
        images = torch.from_numpy(read_idx(files[f"{split}_images"]).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(files[f"{split}_labels"]).astype(np.int64))
        if len(images) != len(labels):
            raise ValueError(
                f"{files[f'{split}_images']} has {len(images)} images but {files[f'{split}_labels']} has "
                f"{len(labels)} labels"
            )
        return images, labels

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            images, labels = self._load("train")
            if not 0 < self.val_size < len(labels):
                raise ValueError(f"val_size must be in (0, {len(labels)}), got {self.val_size}")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
            val_idx, train_idx = order[: self.val_size], order[self.val_size :]
            if self.labels_per_class is not None:  # low-label runs: the first of each class in the seeded order
                train_idx = torch.cat([train_idx[labels[train_idx] == c][: self.labels_per_class] for c in range(10)])
            self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], self.train_transform)
            self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], self.eval_transform)
        elif stage == "test":
            self.test_set = TensorImageDataset(*self._load("test"), self.eval_transform)
        super().setup(stage)

    def predict_dataset(self) -> Dataset:
        to_tensor = partial(_grey_image_to_tensor, transform=self.eval_transform)
        return ImageFilesDataset(self.predict_dir, to_tensor, "L", self.on_bad_sample)


def _grey_image_to_tensor(image: Image.Image, transform: Callable) -> torch.Tensor:
    """A greyscale PIL image of any size -> ``transform`` of it resized to Fashion-MNIST's 28x28."""
    grey = np.asarray(image.resize((28, 28), Image.Resampling.BILINEAR), dtype=np.uint8)
    return transform(torch.from_numpy(grey.copy()).unsqueeze(0))
