"""Write a small synthetic instance-segmentation data set in the COCO layout.

Each image holds a few non-overlapping circles, rectangles and triangles in random colours on a random
background; every shape gets a polygon mask. The output mirrors COCO 2017::

    OUT/train2017/000000000001.png ...
    OUT/val2017/...
    OUT/annotations/instances_train2017.json
    OUT/annotations/instances_val2017.json

Run with no arguments it writes ``data/shapes_coco``, where ``configs/detection/quickstart_shapes.yaml`` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
CIRCLE_VERTICES = 32


def shape_polygon(kind: str, cx: float, cy: float, radius: float, rng: random.Random) -> list[tuple[float, float]]:
    """Vertices of one shape centred at (cx, cy) that fits in a circle of ``radius``."""
    if kind == "circle":
        angles = [2 * math.pi * i / CIRCLE_VERTICES for i in range(CIRCLE_VERTICES)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]
    if kind == "rectangle":
        half_w = radius * rng.uniform(0.55, 0.95)
        half_h = radius * rng.uniform(0.55, 0.95)
        return [
            (cx - half_w, cy - half_h),
            (cx + half_w, cy - half_h),
            (cx + half_w, cy + half_h),
            (cx - half_w, cy + half_h),
        ]
    if kind == "triangle":
        start = rng.uniform(0, 2 * math.pi)
        return [
            (cx + radius * math.cos(start + k * 2 * math.pi / 3), cy + radius * math.sin(start + k * 2 * math.pi / 3))
            for k in range(3)
        ]
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {[c['name'] for c in CATEGORIES]}")


def polygon_area(points: list[tuple[float, float]]) -> float:
    """Shoelace area of a simple polygon."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        total += x0 * y1 - x1 * y0
    return abs(total) / 2.0


def random_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def make_image(
    rng: random.Random, size: int, max_shapes: int, min_radius: float, max_radius: float
) -> tuple[Image.Image, list[tuple[str, list[tuple[float, float]]]]]:
    """One image and its shapes as (category name, polygon); shapes never overlap, so polygons are exact masks."""
    image = Image.new("RGB", (size, size), random_colour(rng))
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    shapes = []
    for _ in range(rng.randint(1, max_shapes)):
        for _attempt in range(20):
            radius = rng.uniform(min_radius, max_radius)
            cx = rng.uniform(radius, size - radius)
            cy = rng.uniform(radius, size - radius)
            if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        kind = rng.choice(CATEGORIES)["name"]
        polygon = shape_polygon(kind, cx, cy, radius, rng)
        draw.polygon(polygon, fill=random_colour(rng))
        shapes.append((kind, polygon))
    return image, shapes


def write_split(
    out: Path,
    split: str,
    num_images: int,
    rng: random.Random,
    size: int,
    max_shapes: int,
    min_radius: float,
    max_radius: float,
    first_id: int,
) -> int:
    """Write ``num_images`` images and ``annotations/instances_{split}.json``; return the next free image id."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    category_id = {c["name"]: c["id"] for c in CATEGORIES}
    images, annotations = [], []
    for image_id in range(first_id, first_id + num_images):
        image, shapes = make_image(rng, size, max_shapes, min_radius, max_radius)
        file_name = f"{image_id:012d}.png"
        image.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for kind, polygon in shapes:
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id[kind],
                    "segmentation": [[round(v, 2) for point in polygon for v in point]],
                    "area": round(polygon_area(polygon), 2),
                    "bbox": [
                        round(min(xs), 2),
                        round(min(ys), 2),
                        round(max(xs) - min(xs), 2),
                        round(max(ys) - min(ys), 2),
                    ],
                    "iscrowd": 0,
                }
            )
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    return first_id + num_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("data/shapes_coco"), help="output folder (default: %(default)s)"
    )
    parser.add_argument("--num-train", type=int, default=600, help="training images (default: %(default)s)")
    parser.add_argument("--num-val", type=int, default=100, help="validation images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--max-shapes", type=int, default=4, help="most shapes per image (default: %(default)s)")
    parser.add_argument("--min-radius", type=float, default=10.0, help="smallest shape radius (default: %(default)s)")
    parser.add_argument("--max-radius", type=float, default=30.0, help="largest shape radius (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error(f"--num-train and --num-val must be >= 1, got {args.num_train} and {args.num_val}")
    if not 0 < args.min_radius <= args.max_radius or 2 * args.max_radius >= args.size:
        parser.error(
            f"need 0 < --min-radius <= --max-radius and 2 * --max-radius < --size, got "
            f"{args.min_radius}, {args.max_radius}, {args.size}"
        )
    rng = random.Random(args.seed)
    shape_args = (rng, args.size, args.max_shapes, args.min_radius, args.max_radius)
    next_id = write_split(args.out, "train2017", args.num_train, *shape_args, first_id=1)
    write_split(args.out, "val2017", args.num_val, *shape_args, first_id=next_id)
    print(f"wrote {args.num_train} train and {args.num_val} val images to {args.out}")


if __name__ == "__main__":
    main()
