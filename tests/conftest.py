"""Shared fixtures: tiny models and tiny data written in tmp_path in the real on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants

from tests.helpers import TINY_SWIN, write_fashion_mnist, write_images


# A Swin small enough for CPU tests: two stages, 32x32 input, 4x4 windows.
@pytest.fixture
def tiny_swin() -> dict:
    return dict(TINY_SWIN)


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


@pytest.fixture
def fashion_mnist_dir(tmp_path: Path) -> Path:
    """The four Fashion-MNIST idx .gz files with 40 training and 20 test images (random pixels, all 10 labels)."""
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    return write_fashion_mnist(root)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline. huggingface_hub reads the variables once, at import: patch its constants too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# Test modules that run OpenVINO or onnxruntime in the test process.
RUNTIME_MODULES = {"test_export.py", "test_model_file.py", "test_export_recipes.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run OpenVINO or onnxruntime in-process go last: after them a signal sent to the same process
    (the SLURM requeue and kill tests) segfaulted it in the dynamic loader (seen with both runtimes' thread pools
    alive; root cause not found), so the signal tests run before any of them in each xdist worker."""
    items.sort(key=lambda item: item.path.name in RUNTIME_MODULES or "deploy" in item.path.parts)
