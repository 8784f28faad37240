"""Write a small synthetic segmentation data set in the ADE20K (ADEChallengeData2016) layout.

Each image shows a few non-overlapping filled circles, squares and triangles on a muted textured background;
each class has its own hue band (reddish circles, greenish squares, bluish triangles) so a small model trained
from scratch on 2 CPU cores learns it in minutes. Label maps follow ADE20K's convention so the same data module
and ``reduce_zero_label`` apply: 0 = "other"
(a 2-pixel band on every shape outline, ignored in training and scoring), 1 = background, 2 = circle,
3 = square, 4 = triangle. Run with no arguments it writes ``data/shapes_segmentation``, which
``configs/segmentation/quickstart_shapes.yaml`` reads.
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("background", "circle", "square", "triangle")  # label k + 1 in the PNGs (0 = other)
CLASS_HUES = {"circle": 0.0, "square": 1 / 3, "triangle": 2 / 3}
OUTLINE_WIDTH = 2
DEFAULT_OUT = Path("data/shapes_segmentation")  # data.init_args.data_root of the quickstart config


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted colour blobs plus stripes plus pixel noise, (size, size, 3) uint8."""
    coarse = rng.uniform(40, 215, size=(4, 4, 3))
    coarse = 0.3 * coarse + 0.7 * coarse.mean(axis=-1, keepdims=True)  # low saturation: shapes carry the colour
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR), dtype=np.float32)
    period, angle = rng.uniform(6, 20), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:size, :size]
    stripes = 20 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    noise = rng.normal(0, 12, size=(size, size, 3))
    return np.clip(smooth + stripes[..., None] + noise, 0, 255).astype(np.uint8)


def _shape_colour(kind: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """Saturated colour whose hue band depends on the class (+-0.07 of the wheel around red, green, blue)."""
    hue = (CLASS_HUES[kind] + rng.uniform(-0.07, 0.07)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return tuple(int(255 * c) for c in rgb)


def _shape_outline(kind: str, centre: np.ndarray, radius: float, rng: np.random.Generator) -> list | tuple:
    cx, cy = centre
    if kind == "circle":
        return (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "square":
        corners = rng.uniform(0, np.pi / 2) + np.pi / 4 + np.arange(4) * np.pi / 2
    else:
        corners = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in corners]


def _place(
    rng: np.random.Generator, size: int, placed: list[tuple[np.ndarray, float]]
) -> tuple[np.ndarray, float] | None:
    """A centre and circumradius whose circle keeps clear of the shapes already placed (None after 30 tries)."""
    for _ in range(30):
        radius = rng.uniform(0.1, 0.25) * size
        centre = rng.uniform(radius, size - radius, size=2)
        if all(np.linalg.norm(centre - c) > radius + r + OUTLINE_WIDTH for c, r in placed):
            return centre, radius
    return None


def make_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """One RGB image and its label map (mode L), both ``size x size``."""
    image = Image.fromarray(_background(rng, size))
    labels = Image.new("L", (size, size), CLASS_NAMES.index("background") + 1)
    draw_image, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(rng.integers(2, 6)):
        spot = _place(rng, size, placed)
        if spot is None:
            break
        placed.append(spot)
        kind = CLASS_NAMES[rng.integers(1, len(CLASS_NAMES))]
        outline = _shape_outline(kind, *spot, rng)
        colour = _shape_colour(kind, rng)
        label = CLASS_NAMES.index(kind) + 1
        if kind == "circle":
            draw_image.ellipse(outline, fill=colour)
            draw_labels.ellipse(outline, fill=label, outline=0, width=OUTLINE_WIDTH)
        else:
            draw_image.polygon(outline, fill=colour)
            draw_labels.polygon(outline, fill=label, outline=0, width=OUTLINE_WIDTH)
    # Mild noise on the shapes too, so flatness alone does not separate them from the background.
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), labels


def write_dataset(out: Path, num_train: int, num_val: int, size: int, seed: int) -> None:
    """Write ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png`` under ``out``."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        image_dir, label_dir = out / "images" / split, out / "annotations" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, labels = make_sample(rng, size)
            stem = f"shapes_{split}_{index:05d}"
            image.save(image_dir / f"{stem}.jpg", quality=95)
            labels.save(label_dir / f"{stem}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--num-train", type=int, default=800, help="training images")
    parser.add_argument("--num-val", type=int, default=50, help="validation images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1 or args.size < 32:
        parser.error("--num-train and --num-val must be >= 1 and --size >= 32")
    write_dataset(args.out, args.num_train, args.num_val, args.size, args.seed)
    print(f"wrote {args.num_train} training and {args.num_val} validation images to {args.out}")


if __name__ == "__main__":
    main()
