"""Image transforms, grouped by task."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

# --------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------

# Per-channel statistics of the Fashion-MNIST training images (pixel values scaled to [0, 1]).
FASHION_MNIST_MEAN: tuple[float] = (0.2860,)
FASHION_MNIST_STD: tuple[float] = (0.3530,)


def classification_train_transform(
    image_size: int,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    color_jitter: float = 0.4,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """timm's training transform (the Swin recipe by default): PIL image -> normalised (3, S, S) float tensor.

    Random resized crop, flip, RandAugment (timm ignores ``color_jitter`` when ``auto_augment`` is set, as the
    official code does), random erasing in pixel mode.
    """
    transform = create_transform(
        image_size,
        is_training=True,
        auto_augment=auto_augment,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        color_jitter=color_jitter,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):  # RandAugment / AutoAugment ops
            if op.aug_fn is timm_auto_augment.posterize:
                op.aug_fn = _posterize_keeping_zero_bits
    return transform


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives a black image as Pillow < 13 did.

    RandAugment's increasing posterize asks for 0 bits at magnitude 10, which ``rand-m9-mstd0.5`` reaches now and
    then; Pillow 13 raises on it ("bits must be between or equal to 1 and 8") and would end a run hours in.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def classification_eval_transform(
    image_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """Resize the short side to ``image_size / crop_pct``, centre-crop ``image_size``: PIL -> (3, S, S) tensor."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return create_transform(
        image_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=tuple(mean), std=tuple(std)
    )


def fashion_mnist_transform(image_size: int = 32, augment: bool = False, crop_padding: int = 2) -> Callable:
    """(1, 28, 28) uint8 tensor -> normalised (1, S, S) float tensor.

    The 28x28 image is zero-padded (Fashion-MNIST's background is 0) or centre-cropped to ``image_size``; with
    ``augment``, a random crop from a further ``crop_padding`` zero border (none if 0) and a horizontal flip follow.
    """
    steps: list[Callable] = [v2.CenterCrop(image_size)]
    if augment and crop_padding > 0:
        steps.append(v2.RandomCrop(image_size, padding=crop_padding))
    if augment:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)]
    return v2.Compose(steps)
