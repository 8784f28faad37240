"""The official Swin detection training augmentation ("3x" schedules): multi-scale resize or resize-crop-resize, flip.

Each image takes one of two policies at random (mmdetection ``AutoAugment`` in the official configs):

a. resize the short side to one of ``sizes`` (480, 512, ..., 800), the long side at most ``max_size`` (1333);
b. resize the short side to one of ``crop_resize_sizes`` (400, 500, 600), crop a random window whose height and width
   are drawn independently from ``crop_size`` (384 to 600 pixels; mmdetection's ``RandomCrop`` with
   ``crop_type="absolute_range"``), drop the objects left outside it, then apply (a);

then a horizontal flip. It acts on ``(image, target)`` samples as ``swinlab.data.coco`` builds them: ``boxes`` a
``tv_tensors.BoundingBoxes``, ``masks`` a ``tv_tensors.Mask`` (N, H, W), and ``labels`` / ``iscrowd`` / ``area``
(N,) dropped together with their boxes. ``area`` keeps the annotation file's value (COCO evaluation reads it; this
is a training transform). The detector should not resize again in training: build it with ``_skip_resize=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

COCO_SIZES = tuple(range(480, 801, 32))
COCO_MAX_SIZE = 1333
COCO_CROP_RESIZE_SIZES = (400, 500, 600)
COCO_CROP_SIZE = (384, 600)
# Per-object target fields that are dropped together with their boxes.
INSTANCE_FIELDS = ("labels", "iscrowd", "area")


class KeepRatioResize(v2.RandomShortestSize):
    """Resizes the short side to one of ``min_size`` (drawn uniformly), the long side at most ``max_size``, keeping
    the aspect ratio, like mmdetection's keep-ratio ``Resize``. Unlike ``v2.RandomShortestSize`` it rounds the new
    sides (flooring can turn 48 into 47) and samples masks at pixel centres (nearest-exact): plain nearest shifts
    them up to a pixel towards the top-left at every resize, and policy (b) resizes twice. The image (bilinear)
    and the boxes (exact scaling) have no such shift."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        short_side = self.min_size[int(torch.randint(len(self.min_size), ()))]
        scale = short_side / min(height, width)
        if self.max_size is not None:
            scale = min(scale, self.max_size / max(height, width))
        return {"size": (round(height * scale), round(width * scale))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


class RandomRangeCrop(v2.Transform):
    """Crops a random window whose height and width are drawn independently and uniformly from
    ``[min_size, max_size]`` pixels (each capped by the image side), at a uniformly drawn position. Boxes are
    shifted and clipped to the window; combine with ``v2.SanitizeBoundingBoxes`` to drop the emptied ones."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"crop sizes need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)

        def draw(low: int, high: int) -> int:
            return int(torch.randint(low, high + 1, ()))

        crop_height = draw(min(height, self.min_size), min(height, self.max_size))
        crop_width = draw(min(width, self.min_size), min(width, self.max_size))
        return {
            "top": draw(0, height - crop_height),
            "left": draw(0, width - crop_width),
            "height": crop_height,
            "width": crop_width,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def instance_fields(sample: tuple[Any, dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """The per-object tensors of a ``(image, target)`` sample that ``SanitizeBoundingBoxes`` filters with the boxes
    (masks are filtered by it anyway). A module-level function so the transform pickles into worker processes."""
    _, target = sample
    return tuple(target[key] for key in INSTANCE_FIELDS if key in target)


def multiscale_crop_augment(
    sizes: Sequence[int] = COCO_SIZES,
    max_size: int = COCO_MAX_SIZE,
    crop_resize_sizes: Sequence[int] = COCO_CROP_RESIZE_SIZES,
    crop_size: tuple[int, int] = COCO_CROP_SIZE,
    crop_prob: float = 0.5,
    flip_prob: float = 0.5,
) -> v2.Compose:
    """The official 3x training augmentation on ``(image, target)``; the defaults are the COCO settings, smaller
    values suit small images. ``crop_prob`` is the chance of policy (b) (0.5 in the official configs: each policy
    equally likely), ``flip_prob`` that of the horizontal flip."""
    if not 0 <= crop_prob <= 1 or not 0 <= flip_prob <= 1:
        raise ValueError(f"crop_prob and flip_prob must lie in [0, 1], got {crop_prob} and {flip_prob}")
    if not sizes or not crop_resize_sizes:
        raise ValueError(f"sizes and crop_resize_sizes need at least one value, got {sizes} and {crop_resize_sizes}")
    resize = KeepRatioResize(list(sizes), max_size=max_size)
    crop_then_resize = v2.Compose(
        [
            KeepRatioResize(list(crop_resize_sizes), max_size=max_size),
            RandomRangeCrop(*crop_size),
            v2.SanitizeBoundingBoxes(labels_getter=instance_fields),
            resize,
        ]
    )
    return v2.Compose(
        [
            v2.RandomChoice([resize, crop_then_resize], p=[1 - crop_prob, crop_prob]),
            v2.RandomHorizontalFlip(flip_prob),
        ]
    )
