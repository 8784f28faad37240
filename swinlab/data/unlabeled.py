"""Unlabelled images for SimMIM pre-training: every image under a folder, Fashion-MNIST's idx file, or data saved
with Hugging Face ``datasets``; labels, where a source has them, are never read.

The folder reader covers the layouts of the labelled families too: point it at ImageNet's ``train/`` (class
folders), COCO's ``train2017/`` or ADE20K's ``images/training/``. Each sample is ``{"image": (C, S, S) normalised
float tensor, "mask": (S / p, S / p) int64 SimMIM mask}`` (``swinlab.models.simmim.MaskGenerator``, p = the model's
patch size). Training crops with the official SimMIM transform (``RandomResizedCrop(S, scale 0.67-1, ratio
3/4-4/3)`` + horizontal flip); validation resizes the short side to S and centre-crops.

A sample is a pure function of ``(seed, epoch, index)``: its crop, flip and mask are drawn from a generator seeded
with them (the training sampler hands the epoch to the data set with each index), so a resumed run sees exactly
the samples of an uninterrupted one whatever the worker count, and validation masks are the same every time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from swinlab.data.bad_samples import BadSampleGuard, OnBadSample, open_image
from swinlab.data.base import BaseDataModule
from swinlab.data.fashion_mnist import FASHION_MNIST_FILES, read_idx
from swinlab.data.huggingface import holds_hf_data, load_split, read_row
from swinlab.data.resumable import ResumableDataLoader, ResumableSampler
from swinlab.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from swinlab.models.simmim import MaskGenerator

Source = Literal["auto", "folder", "fashion_mnist", "huggingface"]
# Every extension Pillow has a decoder for (".jpg", ".png", ".tif", ".webp", ...; not its write-only ".pdf").
PILLOW_EXTENSIONS = frozenset(
    extension.lower() for extension, kind in Image.registered_extensions().items() if kind in Image.OPEN
)
_EVAL_EPOCH = -1  # the "epoch" of validation samples: fixed masks


class ImageFolderSource:
    """Every file under ``root`` (recursive, sorted) whose extension Pillow reads; ``read(i)`` -> 8-bit RGB."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir {root} is not a folder; pass the folder that holds the images")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in PILLOW_EXTENSIONS and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"{root} holds no image files (any extension Pillow reads, searched recursively)")

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> Image.Image:
        return open_image(self.files[index])


class FashionMNISTSource:
    """The images of Fashion-MNIST's training idx file in ``root`` (labels unused), as greyscale 28x28."""

    def __init__(self, root: Path) -> None:
        name = FASHION_MNIST_FILES["train_images"]
        path = next((p for p in (root / f"{name}.gz", root / name) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"{name}.gz not found in {root}; install dataset-fashion-mnist (files in "
                "/usr/share/datasets/fashion-mnist) or point data_dir at the folder that holds it"
            )
        self.images = read_idx(path)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], "L")


class HuggingFaceSource:
    """The ``image`` column of split ``split`` of data saved with Hugging Face ``datasets`` (other columns unused)."""

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.dataset = root, load_split(root, split)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> Image.Image:
        return read_row(self.dataset, index, f"{self.root} row {index}")["image"]


def source_kind(root: str | Path, source: Source = "auto") -> str:
    """``source``, or for ``auto`` what ``root`` holds: ``huggingface`` data, ``fashion_mnist`` idx files, or else a
    ``folder`` of images."""
    root = Path(root)
    if source != "auto":
        if source not in ("folder", "fashion_mnist", "huggingface"):
            raise ValueError(f"source={source!r} is not one of auto, folder, fashion_mnist, huggingface")
        return source
    if root.is_dir() and holds_hf_data(root):
        return "huggingface"
    if any((root / f"{FASHION_MNIST_FILES['train_images']}{ext}").is_file() for ext in (".gz", "")):
        return "fashion_mnist"
    return "folder"


def open_source(root: str | Path, source: Source = "auto", split: str = "train") -> Any:
    """The image source under ``root`` (see ``source_kind``)."""
    kind, root = source_kind(root, source), Path(root)
    if kind == "huggingface":
        return HuggingFaceSource(root, split)
    return FashionMNISTSource(root) if kind == "fashion_mnist" else ImageFolderSource(root)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (seed, epoch, index)."""
    return hash((seed, epoch, index)) & (2**63 - 1)


class MaskedImageDataset(Dataset):
    """``source`` images (those at ``indices``, default all) -> ``{"image": transform(image), "mask": masks()}``,
    each drawn from a generator seeded by ``(seed, epoch, index)``. Keys are positions (validation: a fixed epoch)
    or ``(epoch, position)`` pairs from ``EpochIndexSampler``. Unreadable images are skipped (or raise) by
    ``on_bad_sample``."""

    def __init__(
        self,
        source: Any,
        transform: Callable,
        masks: MaskGenerator,
        mode: str,
        seed: int,
        on_bad_sample: OnBadSample = "skip",
        indices: Sequence[int] | None = None,
    ) -> None:
        self.source, self.transform, self.masks, self.mode, self.seed = source, transform, masks, mode, seed
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.guard = BadSampleGuard(on_bad_sample)

    def __len__(self) -> int:
        return len(self.indices)

    def _sample(self, position: int, epoch: int) -> dict[str, torch.Tensor]:
        index = self.indices[position]
        image = self.source.read(index).convert(self.mode)
        seed = sample_seed(self.seed, epoch, index)
        # torchvision's random transforms draw from torch's global generator: seed it for this sample only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tensor = self.transform(image)
        return {"image": tensor, "mask": self.masks(torch.Generator().manual_seed(seed))}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, position = key if isinstance(key, tuple) else (_EVAL_EPOCH, key)
        return self.guard(lambda i: self._sample(i, epoch), position, len(self))


class EpochIndexSampler(ResumableSampler):
    """A ``ResumableSampler`` that yields ``(epoch, index)``, so each sample's random draws can depend on the epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class UnlabeledImageDataModule(BaseDataModule):
    """Images without labels, with SimMIM masks, for ``swinlab.tasks.MaskedImageModelingTask``.

    Args:
        data_dir: a folder of images (any depth), Fashion-MNIST's idx folder, or Hugging Face ``datasets`` data.
        source: ``auto`` (detect), ``folder``, ``fashion_mnist`` or ``huggingface``.
        split: the Hugging Face split to read.
        val_dir: validation images (same kinds as ``data_dir``); without it ``val_size`` images of ``data_dir``
            (a fixed random choice, ``split_seed``) are held out.
        image_size: the square crop side; a multiple of ``mask_patch_size``.
        mask_patch_size, model_patch_size, mask_ratio: ``MaskGenerator`` (model_patch_size = the backbone's).
        channels: 3 (RGB) or 1 (greyscale).
        mean, std: normalisation (default ImageNet's, Fashion-MNIST's for that source).
        min_scale: ``RandomResizedCrop`` scale lower bound (SimMIM: 0.67).
        seed: of the crops, flips and masks (default: the run's ``seed_everything``).
    """

    def __init__(
        self,
        data_dir: str,
        source: Source = "auto",
        split: str = "train",
        val_dir: str | None = None,
        val_size: int = 1000,
        split_seed: int = 0,
        image_size: int = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        min_scale: float = 0.67,
        seed: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, on_bad_sample)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        self.masks = MaskGenerator(image_size, mask_patch_size, model_patch_size, mask_ratio)
        self.data_dir, self.source, self.split, self.val_dir = data_dir, source, split, val_dir
        self.val_size, self.split_seed, self.image_size = val_size, split_seed, image_size
        self.mode = "RGB" if channels == 3 else "L"
        fashion = source_kind(data_dir, source) == "fashion_mnist"
        default_mean, default_std = (
            (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if fashion else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        )
        self.mean = tuple(mean or default_mean)[:channels]
        self.std = tuple(std or default_std)[:channels]
        self.seed = int(os.getenv("PL_GLOBAL_SEED", 0)) if seed is None else seed
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        # Fashion-MNIST's 28x28 images are zero-padded to the size first, as its classification transform does.
        pad = [v2.CenterCrop(image_size)] if fashion else []
        crop = v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0))
        self.train_transform = v2.Compose([*pad, crop, v2.RandomHorizontalFlip(), *to_tensor])
        fit = pad or [v2.Resize(image_size), v2.CenterCrop(image_size)]
        self.eval_transform = v2.Compose([*fit, *to_tensor])
        self.class_names = []

    @property
    def num_classes(self) -> None:
        """None: no labels (the CLI links no class count into the task)."""
        return None

    def _dataset(self, source: Any, transform: Callable, indices: Sequence[int] | None = None) -> MaskedImageDataset:
        return MaskedImageDataset(source, transform, self.masks, self.mode, self.seed, self.on_bad_sample, indices)

    def setup(self, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        source = open_source(self.data_dir, self.source, self.split)
        if self.val_dir is not None:
            self.train_set = self._dataset(source, self.train_transform)
            self.val_set = self._dataset(open_source(self.val_dir, self.source, self.split), self.eval_transform)
            return
        if not 0 < self.val_size < len(source):
            raise ValueError(f"val_size must be in (0, {len(source)}) for {self.data_dir}, got {self.val_size}")
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        self.train_set = self._dataset(source, self.train_transform, order[self.val_size :])
        self.val_set = self._dataset(source, self.eval_transform, order[: self.val_size])

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__} has no train set; setup() did not build one")
        return ResumableDataLoader(
            self.train_set,
            self.batch_size,
            sampler=EpochIndexSampler(self.train_set, True, self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last_train,
        )
