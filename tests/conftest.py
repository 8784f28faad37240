"""Shared fixtures: tiny models and tiny data written in tmp_path in the real on-disk layouts."""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

# A Swin small enough for CPU tests: two stages, 32x32 input, 4x4 windows.
TINY_SWIN = {
    "img_size": 32,
    "patch_size": 2,
    "window_size": 4,
    "embed_dim": 16,
    "depths": [1, 1],
    "num_heads": [1, 2],
}


@pytest.fixture
def tiny_swin() -> dict:
    return dict(TINY_SWIN)


def write_images(folder: Path, count: int, rng: np.random.Generator, size: int = 40, mode: str = "RGB") -> None:
    """``count`` random JPEGs ``img_<i>.JPEG`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img_{i}.JPEG")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ILSVRC2012 layout: ``train/<wnid>/*.JPEG`` (4 per class) and ``val/<wnid>/*.JPEG`` (2 per class), 3 classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for wnid in ("n01440764", "n01443537", "n01484850"):
        write_images(root / "train" / wnid, 4, rng)
        write_images(root / "val" / wnid, 2, rng)
    return root


@pytest.fixture
def predict_folder(tmp_path: Path) -> Path:
    """Three images to classify, one in a subfolder, plus a file that is not an image."""
    rng = np.random.default_rng(1)
    root = tmp_path / "to_predict"
    write_images(root, 2, rng, size=36)
    write_images(root / "more", 1, rng, size=50)
    (root / "notes.txt").write_text("not an image")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped unsigned-byte idx file (the MNIST format): magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_mnist_dir(tmp_path: Path) -> Path:
    """The four Fashion-MNIST idx .gz files with 40 training and 20 test images (random pixels, all 10 labels)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    for split, count in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``load_script("make_shapes_coco")`` imports ``scripts/make_shapes_coco.py`` (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_layout(state: dict, config: str = "swin_tiny_patch4_window7_224") -> dict:
    """A timm-layout (or swinlab) state dict renamed to the official microsoft/Swin-Transformer layout (patch
    merging at the END of the previous stage, head without ``.fc``, buffers kept) and wrapped in ``{"model": ...}``."""
    out = {}
    for key, value in state.items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        out[key.replace("head.fc.", "head.")] = value
    return {"model": out, "epoch": 299, "config": config}
