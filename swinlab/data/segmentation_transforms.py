"""Joint image + label-map transforms for semantic segmentation (the mmsegmentation ADE20K pipeline).

Images enter as uint8 tensors (3, H, W) and label maps as uint8/int tensors (H, W); every geometric step
resizes label maps with nearest neighbour (torchvision ``tv_tensors.Mask``), and colour steps leave them alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# The label value that is neither trained on nor scored (mmseg's); padding and reduce_zero_label write it.
IGNORE_INDEX = 255


def to_pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """``size`` as a positive ``(height, width)``; a ValueError naming the argument ``name`` otherwise."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """Size that fits (H, W) inside ``scale`` keeping the aspect ratio: the long edge at most ``max(scale)``
    and the short edge at most ``min(scale)`` (mmcv ``imrescale``; (2048, 512) gives 512 short side for most
    photos)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def photometric_distortion() -> v2.Transform:
    """mmseg ``PhotoMetricDistortion``: brightness (+-32/255, here as a factor), contrast 0.5-1.5,
    saturation 0.5-1.5 and hue +-18/180 of the colour wheel, each applied with probability 0.5."""
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(brightness=32 / 255)], p=0.5),
            v2.RandomApply([v2.ColorJitter(contrast=0.5)], p=0.5),
            v2.RandomApply([v2.ColorJitter(saturation=0.5)], p=0.5),
            v2.RandomApply([v2.ColorJitter(hue=0.1)], p=0.5),
        ]
    )


class SegmentationTrainTransform:
    """Random rescale, random crop with a cap on one category's share, flip, photometric distortion,
    normalisation, padding to the crop size (image 0 after normalisation, label ``ignore_index``).

    Args:
        crop_size: output (height, width) or one int.
        scale: the (long, short) size an image is rescaled into before the ratio is applied.
        ratio_range: the random factor on ``scale``.
        cat_max_ratio: retry a crop (up to 10 times) while one category covers this share or more of its
            labelled pixels; 1.0 turns it off.
        ignore_index: label value that is not scored (also used for padding).
    """

    def __init__(
        self,
        crop_size: int | Sequence[int] = 512,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.crop_size = to_pair(crop_size, "crop_size")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.flip = v2.RandomHorizontalFlip(flip_prob)
        self.photometric = photometric_distortion() if photometric else None
        self.normalize = v2.Normalize(mean, std)

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return top, left, crop_h, crop_w

    def _random_crop(self, mask: torch.Tensor) -> tuple[int, int, int, int]:
        box = self._crop_box(*mask.shape[-2:])
        if self.cat_max_ratio >= 1.0:
            return box
        for _ in range(10):
            top, left, h, w = box
            labels = mask[..., top : top + h, left : left + w]
            counts = torch.bincount(labels[labels != self.ignore_index].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
            box = self._crop_box(*mask.shape[-2:])
        return box

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image (3, H, W), labels (H, W) -> float image (3, h, w), int64 labels (h, w), (h, w) = crop."""
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask[None])
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        size = rescale_size(*image.shape[-2:], [s * ratio for s in self.scale])
        image, mask = TF.resize(image, list(size)), TF.resize(mask, list(size))  # Mask -> nearest
        top, left, h, w = self._random_crop(mask)
        image, mask = TF.crop(image, top, left, h, w), TF.crop(mask, top, left, h, w)
        image, mask = self.flip(image, mask)
        if self.photometric is not None:
            image = self.photometric(image)
        image = self.normalize(TF.to_dtype(image, torch.float32, scale=True))
        pad_bottom, pad_right = self.crop_size[0] - h, self.crop_size[1] - w
        if pad_bottom or pad_right:
            image = TF.pad(image, [0, 0, pad_right, pad_bottom], fill=0.0)
            mask = TF.pad(mask, [0, 0, pad_right, pad_bottom], fill=self.ignore_index)
        return image.as_subclass(torch.Tensor), mask[0].as_subclass(torch.Tensor).long()


class SegmentationEvalTransform:
    """Test-time resize into ``scale`` keeping the aspect ratio (None keeps the size), then normalise.

    The label map is not resized: predictions are resized back to the original image and scored there.
    """

    def __init__(
        self,
        scale: Sequence[int] | None = (2048, 512),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.scale = tuple(scale) if scale is not None else None
        self.normalize = v2.Normalize(mean, std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 image (3, H, W) -> float image (3, h, w)."""
        image = tv_tensors.Image(image)
        if self.scale is not None:
            image = TF.resize(image, list(rescale_size(*image.shape[-2:], self.scale)))
        return self.normalize(TF.to_dtype(image, torch.float32, scale=True)).as_subclass(torch.Tensor)
