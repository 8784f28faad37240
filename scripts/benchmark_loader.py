"""How many images/s the ImageNet training data path delivers, per loader worker.

Measures ``ImageNetDataModule``'s training data path without a model: JPEG decode alone and decode + the Swin
training transform (random resized crop, flip, RandAugment, normalise, random erasing) in this process, which is
what one loader worker does, then the real ``train_dataloader()`` with each ``--workers`` count. A GPU that trains
at R images/s needs about R / (images/s per worker) workers.

    python scripts/benchmark_loader.py --data-dir /data/imagenet --workers 0 1 2 --json loader.json
    python scripts/benchmark_loader.py --generate 256 --workers 0 1 2   # a generated folder, see below

With ``--generate N`` it writes N JPEGs of ImageNet's typical size (500x375, quality 90) in the ILSVRC2012 layout
(``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) into a temporary folder; their content is smooth random colour
fields with mild noise, closer to photographs than pure noise (which decodes slower than real images).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from swinlab.data import ImageNetDataModule

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")
IMAGE_SIZE = (500, 375)  # (width, height): the most common ILSVRC2012 size


def write_imagenet_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` training JPEGs spread over four classes (plus one val image each) in the ILSVRC2012 layout."""
    if count < len(WNIDS):
        raise ValueError(f"--generate needs at least {len(WNIDS)} images (one per class), got {count}")
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    for i in range(count + len(WNIDS)):
        split, wnid = ("train", WNIDS[i % len(WNIDS)]) if i < count else ("val", WNIDS[i - count])
        folder = root / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def images_per_s_in_process(dataset: torch.utils.data.Dataset, count: int, transform: bool) -> float:
    """One worker's rate: decode (and transform when ``transform``) ``count`` images in this process."""
    paths = [path for path, _ in dataset.samples[:count]]
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        if transform:
            dataset.transform(rgb)
    return len(paths) / (time.perf_counter() - start)


def loader_images_per_s(
    data_dir: Path, workers: int, batch_size: int, batches: int, image_size: int, auto_augment: str | None
) -> float:
    """Images/s of ``ImageNetDataModule.train_dataloader()`` over ``batches`` batches after the first.

    The first batch is left out: it includes the workers' start-up.
    """
    dm = ImageNetDataModule(
        data_dir=str(data_dir),
        source="folder",
        image_size=image_size,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=False,
        auto_augment=auto_augment,
    )
    dm.setup("fit")
    available = len(dm.train_set) // batch_size - 1
    if available < batches:
        raise ValueError(
            f"{data_dir}/train holds {len(dm.train_set)} images: {batches} timed batches of {batch_size} after a "
            f"warm-up batch need {(batches + 1) * batch_size}; lower --batches or --batch-size, or --generate more"
        )
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, help="an ImageNet folder: <data-dir>/train/<wnid>/*.JPEG")
    source.add_argument("--generate", type=int, help="write this many training JPEGs into a temporary folder")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], help="loader worker counts to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per worker count (after one warm-up)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--auto-augment",
        default="rand-m9-mstd0.5-inc1",
        help="timm RandAugment string of the train transform (the Swin recipe by default)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="in-process timings; the median is reported")
    parser.add_argument("--json", type=Path, default=Path("benchmark_loader.json"))
    args = parser.parse_args(argv)
    if any(w < 0 for w in args.workers) or args.batch_size < 1 or args.batches < 1 or args.repeats < 1:
        parser.error("--workers must be >= 0 and --batch-size, --batches, --repeats >= 1")

    with tempfile.TemporaryDirectory(prefix="swinlab_loader_") as tmp:
        data_dir = write_imagenet_folder(Path(tmp), args.generate) if args.generate else args.data_dir
        if not (data_dir / "train").is_dir():
            raise FileNotFoundError(f"{data_dir}/train does not exist; pass an ImageNet folder (train/<wnid>/*.JPEG)")
        dm = ImageNetDataModule(
            data_dir=str(data_dir),
            source="folder",
            image_size=args.image_size,
            num_workers=0,
            auto_augment=args.auto_augment,
        )
        dm.setup("fit")
        count = min(len(dm.train_set), args.batches * args.batch_size)
        torch.manual_seed(0)  # seeds the loader workers
        random.seed(0)  # timm's RandAugment draws from `random`
        decode = statistics.median(images_per_s_in_process(dm.train_set, count, False) for _ in range(args.repeats))
        transform = statistics.median(images_per_s_in_process(dm.train_set, count, True) for _ in range(args.repeats))
        print(f"one worker, in process: decode {decode:.1f} img/s, decode + train transform {transform:.1f} img/s")
        loaders = {}
        for workers in args.workers:
            loaders[workers] = loader_images_per_s(
                data_dir, workers, args.batch_size, args.batches, args.image_size, args.auto_augment
            )
            print(f"train_dataloader, num_workers={workers}: {loaders[workers]:.1f} img/s")

    width, height = IMAGE_SIZE
    result = {
        "data": str(args.data_dir) if args.data_dir else f"generated: {args.generate} JPEGs {width}x{height}",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "auto_augment": args.auto_augment,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "decode_images_per_s_per_worker": decode,
        "train_transform_images_per_s_per_worker": transform,
        "loader_images_per_s": {str(w): rate for w, rate in loaders.items()},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}; a GPU training at R img/s needs about R / {transform:.0f} workers")
    return result


if __name__ == "__main__":
    main()
