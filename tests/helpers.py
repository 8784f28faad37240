"""Helpers shared by the tests: tiny model settings, writers of the real on-disk layouts, script loading."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from swinlab.models.hub import WEIGHTS_FILE

#: The checkout's root: tests read configs/ and scripts/ from here, never data/ or runs/.
REPO = Path(__file__).resolve().parents[1]
#: A four-stage Swin small enough to train detection and segmentation heads in seconds.
TINY_BACKBONE = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}


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


def write_fashion_mnist(root: Path) -> Path:
    """The four Fashion-MNIST idx .gz files in ``root``: 40 training and 20 test images (random pixels, labels 0-9)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


def moved_off_init(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every norm, bias and logit scale moved off its init (zeros and ones hide mistakes) and a CPB MLP
    whose bias varies with the offset (at init it is nearly constant, which softmax ignores)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name or "logit_scale" in name:
                param.add_(0.3 * torch.randn_like(param))
            if "cpb_mlp" in name:
                param.normal_(0, 1 / param.shape[-1] ** 0.5)
    return model


SCRIPTS = REPO / "scripts"


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


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    """``repo_id``'s ``model.safetensors`` in the Hub cache layout: blob named by its sha256, a snapshot link to it
    and ``refs/main`` naming the snapshot; returns the snapshot path."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    staged = repo / "staged.safetensors"
    staged.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(staged))
    blob = repo / "blobs" / hashlib.sha256(staged.read_bytes()).hexdigest()
    blob.parent.mkdir()
    staged.rename(blob)
    snapshot = repo / "snapshots" / HUB_COMMIT / WEIGHTS_FILE
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return snapshot


def labelled_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> DataLoader:
    """Classification batches ``{"image", "label"}`` of the given tensors, in order."""
    # Imported here: conftest imports this module before pytest captures logs, and importing Lightning then (through
    # swinlab.data) would keep its log lines from reaching caplog.
    from swinlab.data.fashion_mnist import TensorImageDataset

    return DataLoader(TensorImageDataset(images, labels, nn.Identity()), batch_size=batch_size)
