"""Helpers shared by the tests: tiny model settings, writers of the real on-disk layouts, script loading."""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


TINY_SWIN = {
    "img_size": 32,
    "patch_size": 2,
    "window_size": 4,
    "embed_dim": 16,
    "depths": [1, 1],
    "num_heads": [1, 2],
}


def write_images(folder: Path, count: int, rng: np.random.Generator, size: int = 40, mode: str = "RGB") -> None:
    """``count`` random JPEGs ``img_<i>.JPEG`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img_{i}.JPEG")


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped unsigned-byte idx file (the MNIST format): magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


SCRIPTS = ROOT / "scripts"


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
