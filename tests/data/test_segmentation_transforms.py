"""The joint segmentation transforms keep image and label map aligned through rescale, crop, flip and padding."""

import pytest
import torch
import torch.nn.functional as F

from swinlab.data.segmentation_transforms import SegmentationTrainTransform


def drawn_scene(height: int = 60, width: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """A white L-shape (not mirror-symmetric, off centre) on black, and its label map (1 on the shape, 0 off)."""
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[8:50, 6:20] = 1  # the upright bar, on the left
    mask[38:50, 6:44] = 1  # the foot, pointing right
    image = (mask * 255).expand(3, -1, -1).clone()
    return image, mask


def interior(region: torch.Tensor) -> torch.Tensor:
    """Pixels of ``region`` (H, W) bool whose 5x5 neighbourhood lies wholly inside it and inside the crop: clear
    of the one-pixel shift between antialiased bilinear (image) and nearest (labels) resampling at edges."""
    padded = F.pad(region[None, None].float(), (2, 2, 2, 2), value=0.0)
    return -F.max_pool2d(-padded, 5, stride=1)[0, 0] > 0.5


def transform(flip_prob: float) -> SegmentationTrainTransform:
    """Rescale (factor 0.5..1.5 of an 80x60 fit, so some crops need padding), crop 40, flip; no colour change
    and no normalisation, so image values stay in [0, 1]."""
    return SegmentationTrainTransform(
        crop_size=40,
        scale=(80, 60),
        ratio_range=(0.5, 1.5),
        cat_max_ratio=1.0,
        flip_prob=flip_prob,
        photometric=False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_a_drawn_shape_stays_on_its_labels(flip_prob: float, seed: int) -> None:
    torch.manual_seed(seed)
    out_image, out_mask = transform(flip_prob)(*drawn_scene())
    assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
    assert set(out_mask.unique().tolist()) <= {0, 1, 255}
    shape, background, padding = out_mask == 1, out_mask == 0, out_mask == 255
    assert interior(shape).any() and interior(background).any(), "the crop shows both the shape and the background"
    brightness = out_image.mean(dim=0)
    # Away from the edges the pixels are white on the shape and black off it; padding is black and ignored.
    assert (brightness[interior(shape)] > 0.99).all()
    assert (brightness[interior(background)] < 0.01).all()
    assert (brightness[padding] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_flip_mirrors_image_and_labels_together(seed: int) -> None:
    """With the same draws (rescale factor, crop), flip_prob 1 gives the mirror of flip_prob 0 within the crop."""
    torch.manual_seed(seed)
    image, mask = transform(0.0)(*drawn_scene())
    torch.manual_seed(seed)
    flipped_image, flipped_mask = transform(1.0)(*drawn_scene())
    height, width = int((mask != 255).any(dim=1).sum()), int((mask != 255).any(dim=0).sum())
    assert torch.equal(flipped_mask[:height, :width], mask[:height, :width].flip(-1))
    assert torch.equal(flipped_image[:, :height, :width], image[:, :height, :width].flip(-1))
    assert not torch.equal(flipped_mask, mask), "the L-shape is not mirror-symmetric"


def test_random_crop_and_flip_keep_each_label_on_its_own_pixel() -> None:
    """Pixels encode their (row, column) in channels 0 and 1, the label map the same position as
    ``(row + 7 * column) % 250``: after the crop and flip every label must still be its pixel's (a mask cropped one
    pixel away from the image shifts every value by 1 or 7)."""
    height, width = 48, 64
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([rows, columns, torch.zeros_like(rows)]).to(torch.uint8)
    mask = ((rows + 7 * columns) % 250).to(torch.uint8)
    transform = SegmentationTrainTransform(
        crop_size=32,
        scale=(width, height),  # fits the image as it is: no resize
        ratio_range=(1.0, 1.0),
        cat_max_ratio=1.0,
        photometric=False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    torch.manual_seed(0)
    for _ in range(8):
        out_image, out_mask = transform(image, mask)
        position = (out_image * 255).round().long()
        assert out_mask.shape == (32, 32)
        assert torch.equal(out_mask, (position[0] + 7 * position[1]) % 250)
