"""COCO-style detection and instance segmentation data: COCO JSON folders or Hugging Face ``datasets``.

Samples are ``{"image", "target", "file"}`` (``file`` where the source has files): ``image`` a float tensor
(3, H, W) in [0, 1] (the detector normalises and resizes it itself) and ``target`` torchvision's target dict

- ``boxes``   (N, 4) float, absolute ``x1, y1, x2, y2`` pixels
- ``labels``  (N,) int64, contiguous class index ``0 .. num_classes - 1`` (index into ``class_names``)
- ``masks``   (N, H, W) uint8, only with masks on (COCO JSON source)
- ``iscrowd`` (N,) int64 and ``area`` (N,) float, as in the annotation file (COCO metrics use them)
- ``image_id`` int

Batches keep one entry per image (``collate_as_lists``): ``{"image": [...], "target": [...], "file": [...]}``.
Predict samples are ``{"image", "target": {"image_id"}, "file", "error"}`` (see ``DetectionPredictImages``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from swinlab.data.bad_samples import (
    READ_ERROR_KEY,
    BadSampleError,
    BadSampleGuard,
    OnBadSample,
    open_image,
    placeholder_image,
)
from swinlab.data.base import BaseDataModule, ImageFilesDataset, collate_as_lists
from swinlab.data.detection_augment import (
    COCO_CROP_RESIZE_SIZES,
    COCO_CROP_SIZE,
    COCO_MAX_SIZE,
    COCO_SIZES,
    multiscale_crop_augment,
)
from swinlab.data.huggingface import load_split, read_row, split_features

logger = logging.getLogger(__name__)


@dataclass
class ObjectList:
    """The objects of one image as parallel lists: ``boxes`` absolute ``x1, y1, x2, y2``, contiguous ``labels``,
    ``iscrowd``, ``areas``, ``ids`` (for messages), the image's ``file`` where known and the source's own
    ``annotations`` (for masks)."""

    boxes: list[list[float]]
    labels: list[int]
    iscrowd: list[int]
    areas: list[float]
    ids: list[Any]
    file: str | None = None
    annotations: list[dict] = field(default_factory=list)


def detection_transforms(train: bool, flip_prob: float = 0.5, augment: v2.Transform | None = None) -> v2.Compose:
    """PIL image + target -> float image in [0, 1]. Training adds ``augment`` (e.g. ``multiscale_crop_augment``,
    which resizes, crops and flips itself) or, without one, a horizontal flip that moves boxes and masks; resizing
    is then left to torchvision's ``GeneralizedRCNNTransform`` inside the detector.
    """
    steps: list[v2.Transform] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train and augment is not None:
        steps.append(augment)
    elif train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    return v2.Compose(steps)


def _valid_box(x1: float, y1: float, x2: float, y2: float) -> bool:
    return x2 > x1 and y2 > y1


def _clip_to_image(box: Sequence[float], width: int, height: int) -> list[float] | None:
    """An ``x1, y1, x2, y2`` box clipped to the image, or None when it lies outside (empty once clipped)."""
    x1, y1, x2, y2 = box
    clipped = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
    return clipped if _valid_box(*clipped) else None


def _make_target(
    boxes: list[list[float]],
    labels: list[int],
    iscrowd: list[int],
    area: list[float],
    image_id: int,
    size: tuple[int, int],
    masks: np.ndarray | None,
) -> dict[str, Any]:
    target: dict[str, Any] = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=size
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.tensor(iscrowd, dtype=torch.int64),
        "area": torch.tensor(area, dtype=torch.float32),
        "image_id": image_id,
    }
    if masks is not None:
        target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
    return target


class DetectionRows(Dataset):
    """The one reader of detection rows, shared by the COCO JSON and Hugging Face sources: a subclass lists an
    image's objects (``image_objects``), this class filters, clips and packs them into a sample.

    Boxes with zero width or height are dropped. ``drop_crowd`` removes crowd regions (training; the detector
    cannot learn from them), ``skip_empty`` leaves out images with no remaining object (training). Boxes are
    clipped to the image; one that is empty after clipping (outside the image) is dropped with a warning naming
    the file and the object ids, counted in ``dropped_boxes``. An unreadable image is handled as ``on_bad_sample``
    says.
    """

    def __init__(
        self,
        drop_crowd: bool,
        transforms: v2.Transform | None,
        source: str,
        on_bad_sample: OnBadSample,
    ) -> None:
        self.drop_crowd = drop_crowd
        self.transforms = transforms
        self.source = source
        self.guard = BadSampleGuard(on_bad_sample)
        self.dropped_boxes = 0
        self._warned_images: set[int] = set()
        self.rows: list[Any] = []  # what ``image_objects`` reads, one entry per sample

    def image_objects(self, row: Any) -> tuple[Image.Image, ObjectList, int, str]:
        """``(RGB image, objects, image id, name)`` of ``row``, the name (a path, a row) for messages."""
        raise NotImplementedError

    def masks(self, objects: ObjectList, keep: list[int], height: int, width: int) -> np.ndarray | None:
        """(N, H, W) uint8 instance masks of the kept objects, or None (boxes only)."""
        return None

    def kept(self, objects: ObjectList) -> list[int]:
        """Indices of the objects that stay: valid boxes, and no crowd regions when ``drop_crowd``."""
        return [
            i
            for i, box in enumerate(objects.boxes)
            if _valid_box(*box) and not (self.drop_crowd and objects.iscrowd[i])
        ]

    def skip_empty(self, objects: Iterable[ObjectList]) -> None:
        """Leave out the rows with no object left (training); ``objects``: those of each row, in order."""
        self.rows = [row for row, row_objects in zip(self.rows, objects) if self.kept(row_objects)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.guard(self._read, index, len(self))

    def _read(self, index: int) -> dict[str, Any]:
        image, objects, image_id, name = self.image_objects(self.rows[index])
        width, height = image.size
        keep, boxes, dropped = [], [], []
        for i in self.kept(objects):
            box = _clip_to_image(objects.boxes[i], width, height)
            if box is not None:
                keep.append(i)
                boxes.append(box)
            else:
                dropped.append(objects.ids[i])
        if dropped and image_id not in self._warned_images:
            self._warned_images.add(image_id)
            self.dropped_boxes += len(dropped)
            logger.warning(
                "%s: dropped %d boxes that lie outside the %dx%d image (object ids %s in %s; %d dropped so far)",
                name,
                len(dropped),
                width,
                height,
                dropped,
                self.source,
                self.dropped_boxes,
            )
        target = _make_target(
            boxes,
            [objects.labels[i] for i in keep],
            [objects.iscrowd[i] for i in keep],
            [objects.areas[i] for i in keep],
            image_id,
            (height, width),
            self.masks(objects, keep, height, width),
        )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        sample = {"image": image, "target": target}
        if objects.file is not None:
            sample["file"] = objects.file
        return sample


class CocoJsonDetection(DetectionRows):
    """One split of a COCO folder: images in ``image_dir``, annotations in a COCO instances JSON (rows: image ids).

    Polygon, uncompressed RLE and compressed RLE masks are decoded by pycocotools. An image whose size disagrees
    with the annotation file is handled as ``on_bad_sample`` says. Samples carry ``file`` (the ``file_name``).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        category_ids: list[int],
        masks: bool = True,
        drop_crowd: bool = False,
        skip_empty: bool = False,
        transforms: v2.Transform | None = None,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        from pycocotools.coco import COCO

        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.annotation_file} not found")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.image_dir} not found")
        super().__init__(drop_crowd, transforms, str(self.annotation_file), on_bad_sample)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco = COCO(str(self.annotation_file))
        self.label_of_category = {cid: label for label, cid in enumerate(category_ids)}
        self.with_masks = masks
        for ann in self.coco.dataset.get("annotations", []):
            if ann["category_id"] not in self.label_of_category:
                raise ValueError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                    f"which is not among the categories {category_ids}; fix the annotation or the 'categories' list"
                )
        self.rows = sorted(self.coco.getImgIds())
        if skip_empty:
            self.skip_empty(map(self.objects, self.rows))

    @property
    def image_ids(self) -> list[int]:
        return self.rows

    def objects(self, row: int) -> ObjectList:
        """The annotations of image id ``row``."""
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=row))
        return ObjectList(
            boxes=[[x, y, x + w, y + h] for x, y, w, h in (ann["bbox"] for ann in anns)],
            labels=[self.label_of_category[ann["category_id"]] for ann in anns],
            iscrowd=[int(ann.get("iscrowd", 0)) for ann in anns],
            areas=[float(ann.get("area", ann["bbox"][2] * ann["bbox"][3])) for ann in anns],
            ids=[ann.get("id") for ann in anns],
            file=self.coco.loadImgs(row)[0]["file_name"],
            annotations=anns,
        )

    def image_objects(self, row: int) -> tuple[Image.Image, ObjectList, int, str]:
        info = self.coco.loadImgs(row)[0]
        path = self.image_dir / info["file_name"]
        image = open_image(path)
        width, height = image.size
        if info.get("width", width) != width or info.get("height", height) != height:
            raise BadSampleError(
                f"{path}: the image is {width}x{height} but {self.annotation_file} (image id {row}) says "
                f"{info['width']}x{info['height']}; its boxes and masks would not fit it"
            )
        return image, self.objects(row), int(row), str(path)

    def masks(self, objects: ObjectList, keep: list[int], height: int, width: int) -> np.ndarray | None:
        if not self.with_masks:
            return None
        masks = np.zeros((len(keep), height, width), dtype=np.uint8)
        for i, index in enumerate(keep):
            masks[i] = self.coco.annToMask(objects.annotations[index])
        return masks


class HFDetection(DetectionRows):
    """One split of a Hugging Face ``datasets`` detection set: columns ``image`` and ``objects`` (a dict of lists
    with ``bbox`` and ``category``, optionally ``area`` and ``iscrowd``), optionally ``image_id`` (rows: row
    indices).

    ``category`` is already a contiguous index (a ``ClassLabel`` in the usual layout). Boxes only.
    """

    def __init__(
        self,
        dataset: Any,
        bbox_format: Literal["xywh", "xyxy"] = "xywh",
        drop_crowd: bool = False,
        skip_empty: bool = False,
        transforms: v2.Transform | None = None,
        source: str = "dataset",
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        missing = {"image", "objects"} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"{source}: Hugging Face detection data needs columns 'image' and 'objects' "
                f"(with 'bbox' and 'category'); missing {sorted(missing)}, found {dataset.column_names}"
            )
        if bbox_format not in ("xywh", "xyxy"):
            raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}")
        super().__init__(drop_crowd, transforms, source, on_bad_sample)
        self.dataset = dataset
        self.bbox_format = bbox_format
        self.rows = list(range(len(dataset)))
        if skip_empty:
            self.skip_empty(map(self.objects, dataset["objects"]))  # one read of the column, not one per row

    def _xyxy(self, box: list[float]) -> list[float]:
        if self.bbox_format == "xywh":
            x, y, w, h = box
            return [x, y, x + w, y + h]
        return list(box)

    def objects(self, objects: dict[str, list]) -> ObjectList:
        """A row's ``objects`` column."""
        if "bbox" not in objects or "category" not in objects:
            raise ValueError(f"'objects' needs keys 'bbox' and 'category', found {sorted(objects)}")
        boxes = [self._xyxy(box) for box in objects["bbox"]]
        return ObjectList(
            boxes=boxes,
            labels=[int(category) for category in objects["category"]],
            iscrowd=[int(crowd) for crowd in objects.get("iscrowd") or [0] * len(boxes)],
            areas=[float(area) for area in objects.get("area") or [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]],
            ids=list(range(len(boxes))),
        )

    def image_objects(self, row: int) -> tuple[Image.Image, ObjectList, int, str]:
        name = f"{self.source} row {row}"
        data = read_row(self.dataset, row, name)
        return data["image"], self.objects(data["objects"]), int(data.get("image_id", row)), name


class DetectionPredictImages(Dataset):
    """Image files to detect on: sample ``i`` is ``{"image": (3, H, W) float in [0, 1], "target": {"image_id"},
    "file", READ_ERROR_KEY}`` for file ``i``, always. A file that cannot be read gives, with
    ``on_bad_sample="skip"``, the placeholder image and the reason in ``READ_ERROR_KEY`` (the task predicts nothing
    for it, the writer lists it as failed; see ``swinlab.data.bad_samples``); with ``raise`` it stops the run.
    """

    def __init__(
        self, root: str | Path, files: Sequence[str], image_ids: Sequence[int], on_bad_sample: OnBadSample = "skip"
    ) -> None:
        if len(files) != len(image_ids):
            raise ValueError(f"{len(files)} files but {len(image_ids)} image ids")
        self.root, self.files, self.image_ids = Path(root), list(files), list(image_ids)
        self.to_tensor = detection_transforms(train=False)
        self.guard = BadSampleGuard(on_bad_sample)

    def __len__(self) -> int:
        return len(self.files)

    def _sample(self, index: int, image: Image.Image, error: str = "") -> dict[str, Any]:
        return {
            "image": self.to_tensor(image),
            "target": {"image_id": self.image_ids[index]},
            "file": self.files[index],
            READ_ERROR_KEY: error,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.guard.read_or_fail(
            lambda i: self._sample(i, open_image(self.root / self.files[i])),
            index,
            lambda error: self._sample(index, placeholder_image(), error),
        )


class COCODataModule(BaseDataModule):
    """COCO detection / instance segmentation.

    ``source="coco"``: the standard layout ``root/{train2017,val2017}/`` and
    ``root/annotations/instances_{train2017,val2017}.json``; COCO category ids are mapped to contiguous labels
    (``category_ids[label]`` maps back). ``source="hf"``: the same data saved with Hugging Face ``datasets``
    (``save_to_disk`` or parquet; splits ``train``/``validation`` by default), boxes only, so ``masks`` must be
    off. Training leaves out crowd regions and images without annotations; validation keeps both (crowd
    regions are ignored by the COCO metric, as in the official evaluation). Test runs on the validation split.
    Batches are dicts of lists (see the module docstring); training keeps the last incomplete batch.

    Training augmentation (``train_augment``): ``flip`` (a horizontal flip with ``flip_prob``; the detector does
    its own multi-scale resize) or ``multiscale_crop``, the official 3x policy of ``swinlab.data.detection_augment``
    (short side one of ``train_sizes``, long side <= ``train_max_size``, or first a resize to ``crop_resize_sizes``
    and a random ``crop_size`` crop, with probability ``crop_prob``; then the flip). With ``multiscale_crop`` the
    images arrive resized, so ``DetectionTask`` turns the detector's own training resize off (``train_resizes``).

    ``predict`` reads every image under ``predict_dir`` (recursively; image ids are the files' sorted positions),
    else the validation split's images (its image ids); each sample's ``READ_ERROR_KEY`` is "" or why the file could
    not be read (that image is marked failed, never replaced by another). The Hugging Face source without
    ``predict_dir`` predicts on its validation rows.
    """

    train_collate = eval_collate = staticmethod(collate_as_lists)
    drop_last_train = False

    def __init__(
        self,
        root: str,
        source: Literal["coco", "hf"] = "coco",
        train_split: str | None = None,
        val_split: str | None = None,
        masks: bool = True,
        hf_bbox_format: Literal["xywh", "xyxy"] = "xywh",
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        flip_prob: float = 0.5,
        train_augment: Literal["flip", "multiscale_crop"] = "flip",
        train_sizes: Sequence[int] = COCO_SIZES,
        train_max_size: int = COCO_MAX_SIZE,
        crop_resize_sizes: Sequence[int] = COCO_CROP_RESIZE_SIZES,
        crop_size: tuple[int, int] = COCO_CROP_SIZE,
        crop_prob: float = 0.5,
        predict_dir: str | None = None,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, on_bad_sample=on_bad_sample)
        if train_augment not in ("flip", "multiscale_crop"):
            raise ValueError(f"train_augment must be 'flip' or 'multiscale_crop', got {train_augment!r}")
        if source not in ("coco", "hf"):
            raise ValueError(f"COCODataModule source must be 'coco' or 'hf', got {source!r}")
        if source == "hf" and masks:
            raise ValueError(
                "the Hugging Face detection format carries boxes only: set data masks: false and the model's "
                "masks: false (Faster R-CNN), or use source: coco for instance masks"
            )
        self.root = Path(root)
        self.source = source
        self.train_split = train_split or ("train2017" if source == "coco" else "train")
        self.val_split = val_split or ("val2017" if source == "coco" else "validation")
        self.masks = masks
        self.hf_bbox_format = hf_bbox_format
        self.flip_prob = flip_prob
        self.train_augment = train_augment
        # Built now so that bad sizes or probabilities fail at construction, not in a DataLoader worker.
        self.augment = (
            multiscale_crop_augment(train_sizes, train_max_size, crop_resize_sizes, crop_size, crop_prob, flip_prob)
            if train_augment == "multiscale_crop"
            else None
        )
        self.predict_dir = predict_dir
        self.category_ids, self.class_names = self._read_categories()

    @property
    def train_resizes(self) -> bool:
        """Whether training images arrive resized by the augmentation (the detector must not resize them again)."""
        return self.augment is not None

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def _read_categories(self) -> tuple[list[int], list[str]]:
        """Category ids (sorted, as COCO does) and names, read from the validation split."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data root {self.root} not found (for the quickstart run `python scripts/make_shapes_coco.py`)"
            )
        if self.source == "coco":
            path = self.annotation_file(self.val_split)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found; a COCO root holds {self.val_split}/ and "
                    f"annotations/instances_{self.val_split}.json"
                )
            categories = sorted(json.loads(path.read_text()).get("categories", []), key=lambda c: c["id"])
            if not categories:
                raise ValueError(f"{path}: the 'categories' list is empty or missing")
            return [c["id"] for c in categories], [c["name"] for c in categories]
        features, where = split_features(self.root, [self.val_split])
        objects = features.get("objects")
        # 'objects' is a dict of lists or a list of dicts depending on how it was built; unwrap either.
        while hasattr(objects, "feature"):
            objects = objects.feature
        category = objects.get("category") if isinstance(objects, dict) else None
        while hasattr(category, "feature"):
            category = category.feature
        names = getattr(category, "names", None)
        if names is None:
            raise ValueError(
                f"{where}: objects.category must be a datasets.ClassLabel (its names become class_names), "
                f"got {category}"
            )
        return list(range(len(names))), list(names)

    def _dataset(self, split: str, train: bool) -> Dataset:
        transforms = detection_transforms(train, self.flip_prob, self.augment)
        if self.source == "coco":
            return CocoJsonDetection(
                self.root / split,
                self.annotation_file(split),
                self.category_ids,
                masks=self.masks,
                drop_crowd=train,
                skip_empty=train,
                transforms=transforms,
                on_bad_sample=self.on_bad_sample,
            )
        return HFDetection(
            load_split(self.root, split),
            self.hf_bbox_format,
            drop_crowd=train,
            skip_empty=train,
            transforms=transforms,
            source=f"{self.root} [{split}]",
            on_bad_sample=self.on_bad_sample,
        )

    def _predict_dataset(self) -> Dataset:
        if self.predict_dir is not None:
            listing = ImageFilesDataset(self.predict_dir, transform=lambda image: image)  # lists and checks the folder
            files = [path.relative_to(listing.root).as_posix() for path in listing.files]
            return DetectionPredictImages(listing.root, files, range(len(files)), self.on_bad_sample)
        if self.source == "hf":
            return self._dataset(self.val_split, train=False)
        images = json.loads(self.annotation_file(self.val_split).read_text()).get("images", [])
        images.sort(key=lambda info: info["id"])
        return DetectionPredictImages(
            self.root / self.val_split,
            [info["file_name"] for info in images],
            [info["id"] for info in images],
            self.on_bad_sample,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_set is None:
            self.train_set = self._dataset(self.train_split, train=True)
        if stage in ("fit", "validate", "test") and self.val_set is None:
            self.val_set = self._dataset(self.val_split, train=False)
        self.test_set = self.val_set
        if stage == "predict" and self.predict_set is None:
            self.predict_set = self._predict_dataset()
