"""Semantic segmentation data: folders of images with label maps, or local parquet files.

Folder layout (``data_root``)::

    images/training/*.jpg|png    annotations/training/*.png     (same file stems)
    images/validation/*.jpg|png  annotations/validation/*.png

Parquet layout: a Hugging Face segmentation set (e.g. ``scene_parse_150``) saved as parquet (``Dataset.to_parquet``
or the hub's parquet export) anywhere under ``data_root``; a file belongs to the training split when a folder or
file name in its path starts with ``train`` and to the validation split when one starts with ``val``. Columns
``image`` and ``annotation`` (the label map), as in the folder layout.

Samples are ``{"image", "mask", "file"}`` (``file``: the image's file name, or ``<split>_<row>`` for parquet rows);
predict samples add ``raw_image`` (the uint8 original, for overlays) and ``error``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from swinlab.data.bad_samples import (
    READ_ERROR_KEY,
    BadSampleError,
    BadSampleGuard,
    OnBadSample,
    open_image,
    placeholder_image,
)
from swinlab.data.base import BaseDataModule, ImageFilesDataset, collate_as_lists
from swinlab.data.huggingface import load_split, read_row
from swinlab.data.segmentation_transforms import (
    IGNORE_INDEX,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
)

logger = logging.getLogger(__name__)

Split = Literal["training", "validation"]


def reduce_zero_label(mask: torch.Tensor) -> torch.Tensor:
    """Label maps where 0 means "other" (ADE20K's): 0 becomes ``IGNORE_INDEX`` and 1..255 shift down by one
    (uint8 (H, W))."""
    reduced = mask.to(torch.int16) - 1
    reduced[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced.to(torch.uint8)


def _label_map_tensor(label_image: Image.Image, name: str) -> torch.Tensor:
    # PIL, not torchvision: palette ("P") PNGs must give the palette indices, not colours.
    if label_image.mode not in ("L", "P", "I;16", "I"):
        raise BadSampleError(
            f"{name}: a label map must be a single-channel PNG (mode L or P), got mode {label_image.mode}"
        )
    try:
        array = np.asarray(label_image)
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSampleError(f"{name}: unreadable label map ({type(err).__name__}: {err})") from err
    if array.max(initial=0) > 255:
        raise BadSampleError(f"{name}: label values must be <= 255, got {array.max()}")
    return torch.from_numpy(array.astype(np.uint8))


class SegmentationFolder(Dataset):
    """``images/{split}/<stem>.jpg`` with ``annotations/{split}/<stem>.png``.

    Items are (uint8 (3, H, W), uint8 (H, W), file name).

    Images without a label map are left out with a warning naming them (``on_bad_sample="skip"``) or raise.
    """

    def __init__(self, root: str | Path, split: Split, on_bad_sample: OnBadSample = "skip") -> None:
        self.root = Path(root)
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} does not exist; a segmentation data_root holds images/{{training,validation}}/*.jpg "
                    "and annotations/{training,validation}/*.png (the ADEChallengeData2016 layout)"
                )
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.images:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {image_dir}")
        self.labels = [label_dir / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            message = (
                f"{len(missing)} images in {image_dir} have no label map, e.g. {missing[0]} "
                "(expected the same stem, .png)"
            )
            if on_bad_sample == "raise" or len(missing) == len(self.labels):
                raise FileNotFoundError(message)
            logger.warning("%s; on_bad_sample=skip leaves them out: %s", message, ", ".join(missing))
            kept = [(image, label) for image, label in zip(self.images, self.labels) if label.is_file()]
            self.images, self.labels = [image for image, _ in kept], [label for _, label in kept]

    def __len__(self) -> int:
        return len(self.images)

    def file(self, index: int) -> str:
        return self.images[index].name

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image = pil_to_tensor(open_image(self.images[index]))
        try:
            with Image.open(self.labels[index]) as label_image:
                mask = _label_map_tensor(label_image, str(self.labels[index]))
        except (OSError, SyntaxError) as err:
            raise BadSampleError(f"{self.labels[index]}: unreadable label map ({type(err).__name__}: {err})") from err
        return image, mask, self.file(index)


class SegmentationParquet(Dataset):
    """Rows of a Hugging Face segmentation split (e.g. ``scene_parse_150``) with ``image`` and ``annotation``
    columns."""

    def __init__(self, dataset: Any, split: Split, source: str) -> None:
        self.table, self.split = dataset, split
        missing = {"image", "annotation"} - set(self.table.column_names)
        if missing:
            raise ValueError(
                f"{source}: parquet files need columns 'image' and 'annotation' (scene_parse_150 layout), "
                f"missing {sorted(missing)}; found {self.table.column_names}"
            )

    def __len__(self) -> int:
        return len(self.table)

    def file(self, index: int) -> str:
        return f"{self.split}_{index:06d}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        row_name = f"{self.split} parquet row {index}"
        row = read_row(self.table, index, row_name, label_images=["annotation"])
        return pil_to_tensor(row["image"]), _label_map_tensor(row["annotation"], row_name), self.file(index)


class _Labelled(Dataset):
    """Applies label reduction, the range check and a transform to a (image, label map, file) source; a sample
    that fails (unreadable, sizes differ, label beyond the classes) is handled as ``on_bad_sample`` says.

    ``keep_raw`` (predict) adds ``raw_image`` and ``READ_ERROR_KEY``: sample ``i`` is always source sample ``i``,
    marked failed when it cannot be used (see ``swinlab.data.bad_samples``).
    """

    def __init__(
        self,
        source: Dataset,
        num_classes: int,
        reduce_zero: bool,
        transform: Any,
        train: bool,
        keep_raw: bool = False,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        self.source, self.num_classes, self.reduce_zero = source, num_classes, reduce_zero
        self.transform, self.train, self.keep_raw = transform, train, keep_raw
        self.guard = BadSampleGuard(on_bad_sample)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.keep_raw:
            return self.guard.read_or_fail(self._read, index, partial(self._failed, index))
        return self.guard(self._read, index, len(self))

    def _failed(self, index: int, error: str) -> dict[str, Any]:
        raw = pil_to_tensor(placeholder_image())
        mask = torch.full(raw.shape[-2:], IGNORE_INDEX, dtype=torch.long)
        return {
            "image": self.transform(raw),
            "mask": mask,
            "file": self.source.file(index),
            "raw_image": raw,
            READ_ERROR_KEY: error,
        }

    def _read(self, index: int) -> dict[str, Any]:
        image, mask, file = self.source[index]
        if image.shape[-2:] != mask.shape:
            raise BadSampleError(f"{file}: image is {tuple(image.shape[-2:])} but its label map is {tuple(mask.shape)}")
        if self.reduce_zero:
            mask = reduce_zero_label(mask)
        labels = mask[mask != IGNORE_INDEX]
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise BadSampleError(
                f"{file}: label {int(labels.max())} >= num_classes {self.num_classes} "
                f"(reduce_zero_label={self.reduce_zero}); check class_names and reduce_zero_label"
            )
        if self.train:
            image, mask = self.transform(image, mask)
            return {"image": image, "mask": mask, "file": file}
        sample = {"image": self.transform(image), "mask": mask.long(), "file": file}
        if self.keep_raw:
            sample |= {"raw_image": image, READ_ERROR_KEY: ""}
        return sample


class _Unlabelled(Dataset):
    """The ``predict_dir`` images -> ``{"image": transform(image), "raw_image": uint8 (3, H, W), "file": path,
    READ_ERROR_KEY: "" or why the file could not be read}`` (a failed one carries a placeholder image)."""

    def __init__(self, source: ImageFilesDataset, transform: SegmentationEvalTransform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.source[index]
        image = sample["image"]
        return {
            "image": self.transform(image),
            "raw_image": image,
            "file": sample["file"],
            READ_ERROR_KEY: sample[READ_ERROR_KEY],
        }


class SegmentationDataModule(BaseDataModule):
    """Images with label maps (see the module docstring) for UperNet: the mmseg training pipeline, and evaluation
    at the original resolution.

    Training samples are ``{"image": (3, crop, crop), "mask": (crop, crop), "file"}`` stacked into batches.
    Evaluation batches are lists (images keep their sizes): ``image`` resized into ``test_scale``, ``mask`` the
    label map at the original size (int64, ``IGNORE_INDEX`` = 255 not scored), ``file``. ``test`` uses the
    validation split (test images often have no labels); ``predict`` uses ``predict_dir`` or the
    validation images and adds ``raw_image`` (the uint8 original) for overlays and ``error`` (``READ_ERROR_KEY``:
    "" or why the file could not be read; such a row is marked failed, never replaced, see
    ``swinlab.data.bad_samples``).

    Args:
        data_root: folder with the images/annotations layout or with parquet files.
        source: ``folder``, ``parquet`` or ``auto`` (folder when ``data_root/images`` exists).
        class_names: class names after label reduction (``num_classes`` follows); required.
        reduce_zero_label: map label 0 to 255 (ignored) and k to k - 1, for label maps where 0 means "other".
        crop_size, scale, ratio_range, cat_max_ratio: training augmentation (see ``SegmentationTrainTransform``).
        test_scale: evaluation resize (long, short) keeping the aspect ratio; None keeps the size.
        batch_size: training images per device; eval_batch_size: images per evaluation step.
        on_bad_sample: ``skip`` (warn, count, use the next sample) or ``raise`` for an unreadable image or label map,
            sizes that differ, a label beyond ``class_names``, an image without a label map.
        train_fraction: train on this fraction of the training images only (a fixed random choice by
            ``split_seed``), for low-label runs (docs/pretraining.md).
    """

    eval_collate = staticmethod(collate_as_lists)

    def __init__(
        self,
        data_root: str,
        source: Literal["auto", "folder", "parquet"] = "auto",
        class_names: list[str] | None = None,
        reduce_zero_label: bool = False,
        crop_size: int | tuple[int, int] = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        photometric: bool = True,
        test_scale: tuple[int, int] | None = (2048, 512),
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        predict_dir: str | None = None,
        on_bad_sample: OnBadSample = "skip",
        train_fraction: float = 1.0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, on_bad_sample=on_bad_sample)
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.train_fraction, self.split_seed = train_fraction, split_seed
        self.data_root = Path(data_root)
        if not class_names:
            raise ValueError(
                f"{type(self).__name__} needs class_names (the names of label values 0, 1, ... after "
                "reduce_zero_label); set data.init_args.class_names"
            )
        self.class_names = list(class_names)
        if source not in ("auto", "folder", "parquet"):
            raise ValueError(f"source must be 'auto', 'folder' or 'parquet', got {source!r}")
        self.source = source
        self.reduce_zero_label = reduce_zero_label
        self.predict_dir = predict_dir
        self.train_transform = SegmentationTrainTransform(
            crop_size=crop_size,
            scale=scale,
            ratio_range=ratio_range,
            cat_max_ratio=cat_max_ratio,
            photometric=photometric,
            ignore_index=IGNORE_INDEX,
        )
        self.eval_transform = SegmentationEvalTransform(scale=test_scale)

    def _resolved_source(self) -> str:
        if self.source != "auto":
            return self.source
        if (self.data_root / "images").is_dir():
            return "folder"
        if next(self.data_root.rglob("*.parquet"), None) is not None:
            return "parquet"
        raise FileNotFoundError(
            f"data_root {self.data_root} holds neither images/{{training,validation}} (ADEChallengeData2016 layout) "
            "nor parquet files (e.g. scene_parse_150); set data.init_args.data_root to the extracted data set"
        )

    def _split(self, split: Split) -> Dataset:
        if self._resolved_source() == "folder":
            return SegmentationFolder(self.data_root, split, self.on_bad_sample)
        prefix = "train" if split == "training" else "val"
        return SegmentationParquet(load_split(self.data_root, prefix), split, f"{self.data_root} [{prefix}*]")

    def _labelled(self, split: Split, train: bool, keep_raw: bool = False) -> Dataset:
        transform = self.train_transform if train else self.eval_transform
        return _Labelled(
            self._split(split), self.num_classes, self.reduce_zero_label, transform, train, keep_raw, self.on_bad_sample
        )

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._labelled("training", train=True)
            if self.train_fraction < 1.0:
                count = max(1, round(self.train_fraction * len(self.train_set)))
                order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.split_seed))
                self.train_set = Subset(self.train_set, order[:count].tolist())
        if stage in ("fit", "validate", "test"):
            self.val_set = self.test_set = self._labelled("validation", train=False)
        if stage == "predict":
            if self.predict_dir is not None:
                images = ImageFilesDataset(self.predict_dir, pil_to_tensor, on_bad_sample=self.on_bad_sample)
                self.predict_set = _Unlabelled(images, self.eval_transform)
            else:
                self.predict_set = self._labelled("validation", train=False, keep_raw=True)
