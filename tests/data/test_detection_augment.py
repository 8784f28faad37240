"""The 3x detection augmentation on crafted samples: image, mask and box stay aligned; flips mirror; crops drop."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from swinlab.data.detection_augment import RandomRangeCrop, multiscale_crop_augment

HEIGHT, WIDTH = 60, 90
# Object i is a rectangle (x1, y1, x2, y2) filled with colour channel i (red, green, blue).
RECTANGLES = ((5, 8, 30, 40), (50, 30, 85, 55), (35, 2, 45, 12))
# Scaled-down COCO settings (sides 480-800 / 400-600 / crops 384-600 for images of about 640 x 480).
SMALL = {"sizes": (48, 56, 64), "max_size": 100, "crop_resize_sizes": (40, 50), "crop_size": (32, 50)}


def crafted_sample() -> tuple[tv_tensors.Image, dict]:
    image = torch.zeros(3, HEIGHT, WIDTH, dtype=torch.uint8)
    masks = torch.zeros(len(RECTANGLES), HEIGHT, WIDTH, dtype=torch.uint8)
    for channel, (x1, y1, x2, y2) in enumerate(RECTANGLES):
        image[channel, y1:y2, x1:x2] = 255
        masks[channel, y1:y2, x1:x2] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(RECTANGLES, dtype=torch.float32), format="XYXY", canvas_size=(HEIGHT, WIDTH)
        ),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2, 3]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "area": torch.tensor([float((x2 - x1) * (y2 - y1)) for x1, y1, x2, y2 in RECTANGLES]),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def extent(region: torch.Tensor) -> torch.Tensor:
    """Bounding box (x1, y1, x2, y2) of the true pixels of an (H, W) bool map, in box (pixel edge) coordinates."""
    ys, xs = torch.where(region)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def assert_aligned(image: torch.Tensor, target: dict, mask_tolerance: float = 1.0) -> None:
    """Each kept object's box == its mask's extent == the extent of its colour in the image (within 1 pixel)."""
    for box, mask, label in zip(target["boxes"], target["masks"], target["labels"]):
        colour = image[int(label) - 1] > 127
        assert mask.any() and colour.any()
        assert torch.allclose(extent(mask.bool()), box, atol=mask_tolerance), (label, box)
        assert torch.allclose(extent(colour), box, atol=1), (label, box)


def run(seed: int, **options) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    return multiscale_crop_augment(**{**SMALL, **options})(*crafted_sample())


@pytest.mark.parametrize("seed", range(6))
def test_resize_policy_keeps_image_mask_and_box_aligned(seed: int):
    image, target = run(seed, crop_prob=0.0, flip_prob=0.0)
    height, width = image.shape[-2:]
    assert min(height, width) in SMALL["sizes"] and max(height, width) <= SMALL["max_size"]
    assert target["masks"].shape[-2:] == (height, width) and target["boxes"].canvas_size == (height, width)
    assert target["labels"].tolist() == [1, 2, 3]  # nothing leaves the image
    assert_aligned(image, target)


# With the image's own short side (60) the resize before the crop changes nothing: the mask is resampled once and
# stays within 1 pixel. Resized before the crop, it is resampled twice (nearest, up to 0.5 pixel each time at the
# crop's scale) and the second resize enlarges the first error up to 64 / 32 times: 1.5 pixels allowed there.
@pytest.mark.parametrize(("crop_resize_sizes", "mask_tolerance"), [((60,), 1.0), ((40, 50), 1.5)])
def test_crop_policy_keeps_alignment_and_drops_objects_outside_the_crop(crop_resize_sizes, mask_tolerance):
    dropped = 0
    for seed in range(30):
        image, target = run(seed, crop_prob=1.0, flip_prob=0.0, crop_resize_sizes=crop_resize_sizes)
        height, width = image.shape[-2:]
        assert min(height, width) in SMALL["sizes"] and max(height, width) <= SMALL["max_size"]
        assert_aligned(image, target, mask_tolerance)
        kept = set(target["labels"].tolist())
        for label in {1, 2, 3} - kept:  # a dropped object is out of the picture (but for resampling blur)
            assert not (image[label - 1] > 127).any()
        assert len(target["iscrowd"]) == len(target["area"]) == len(target["masks"]) == len(kept)
        dropped += 3 - len(kept)
    assert dropped > 0


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_flip_mirrors_image_mask_and_box(crop_prob: float):
    for seed in range(4):
        plain_image, plain = run(seed, crop_prob=crop_prob, flip_prob=0.0)
        flipped_image, flipped = run(seed, crop_prob=crop_prob, flip_prob=1.0)
        width = plain_image.shape[-1]
        assert torch.equal(flipped_image, plain_image.flip(-1))
        assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
        mirrored = torch.stack([width - plain["boxes"][:, 2], plain["boxes"][:, 1]], dim=1)
        mirrored = torch.cat([mirrored, (width - plain["boxes"][:, 0])[:, None], plain["boxes"][:, 3:]], dim=1)
        assert torch.allclose(flipped["boxes"], mirrored)
        assert_aligned(flipped_image, flipped, mask_tolerance=1.5)


def test_range_crop_draws_each_side_in_the_range_capped_by_the_image():
    crop = RandomRangeCrop(24, 40)
    sides = set()
    for seed in range(40):
        torch.manual_seed(seed)
        height, width = crop(torch.zeros(3, 100, 80)).shape[-2:]
        assert 24 <= height <= 40 and 24 <= width <= 40
        sides.add((height, width))
        height, width = crop(torch.zeros(3, 20, 30)).shape[-2:]
        assert height == 20 and 24 <= width <= 30
    assert len(sides) > 10  # height and width drawn independently


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="min_size=50, max_size=40"):
        RandomRangeCrop(50, 40)
    with pytest.raises(ValueError, match="crop_prob"):
        multiscale_crop_augment(crop_prob=1.5)
