import gzip
import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from swinlab.data import FashionMNISTDataModule
from swinlab.data.fashion_mnist import read_idx


def test_read_idx_reads_images_and_labels(fashion_mnist_dir):
    images = read_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz")
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(40)]


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.gz is not an unsigned-byte idx file"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


def test_splits_shapes_and_normalisation(fashion_mnist_dir):
    dm = FashionMNISTDataModule(data_dir=str(fashion_mnist_dir), image_size=32, val_size=8, batch_size=4)
    assert dm.num_classes == 10 and dm.class_names[0] == "T-shirt/top"
    dm.setup("fit")
    assert len(dm.train_set) == 32 and len(dm.val_set) == 8
    batch = next(iter(dm.train_dataloader()))
    images, labels = batch["image"], batch["label"]
    assert images.shape == (4, 1, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    dm.setup("test")
    assert len(dm.test_set) == 20
    # Eval images are the 28x28 picture centred in a zero border, normalised: the border is (0 - mean) / std.
    image = dm.test_set[0]["image"]
    assert torch.allclose(image[:, :2, :], torch.full_like(image[:, :2, :], -0.2860 / 0.3530), atol=1e-4)


def test_validation_split_is_fixed_and_disjoint(fashion_mnist_dir):
    first, second = (FashionMNISTDataModule(data_dir=str(fashion_mnist_dir), val_size=8) for _ in range(2))
    first.setup("fit")
    second.setup("fit")
    assert torch.equal(first.val_set.images, second.val_set.images)
    train_rows = {bytes(x.numpy()) for x in first.train_set.images}
    assert not any(bytes(x.numpy()) in train_rows for x in first.val_set.images)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        FashionMNISTDataModule(data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value) and "download=true" in str(error.value)
    # With download the check waits for prepare_data; setup without the files names the folder the same way.
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.setup("fit")


def test_bad_val_size(fashion_mnist_dir):
    dm = FashionMNISTDataModule(data_dir=str(fashion_mnist_dir), val_size=40)
    with pytest.raises(ValueError, match="val_size"):
        dm.setup("fit")


def test_predict_reads_any_image_as_28x28_grey(fashion_mnist_dir, predict_folder):
    dm = FashionMNISTDataModule(data_dir=str(fashion_mnist_dir), predict_dir=str(predict_folder), batch_size=8)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (3, 1, 32, 32)
    assert batch["file"] == ["img_0.JPEG", "img_1.JPEG", "more/img_0.JPEG"] and batch["error"] == ["", "", ""]


@pytest.fixture
def mirror(fashion_mnist_dir):
    """A local HTTP server on 127.0.0.1 serving the fixture's four idx .gz files; it stops when the test ends."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(fashion_mnist_dir))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def served_checksums(folder) -> dict[str, str]:
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.gz"))}


def test_download_fetches_the_missing_files_and_checks_them(fashion_mnist_dir, mirror, tmp_path, monkeypatch):
    assert set(served_checksums(fashion_mnist_dir)) == set(FashionMNISTDataModule.checksums)
    monkeypatch.setattr(FashionMNISTDataModule, "mirrors", ("http://127.0.0.1:9/", mirror))  # first one refuses
    monkeypatch.setattr(FashionMNISTDataModule, "checksums", served_checksums(fashion_mnist_dir))
    target = tmp_path / "downloaded"
    target.mkdir()
    (target / "t10k-labels-idx1-ubyte").write_bytes(
        gzip.decompress((fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    )
    dm = FashionMNISTDataModule(data_dir=str(target), download=True, val_size=8)
    dm.prepare_data()
    # The three missing files arrive byte for byte; the one already there (uncompressed) is used as it is.
    assert sorted(p.name for p in target.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    for name in ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert (target / name).read_bytes() == (fashion_mnist_dir / name).read_bytes()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 32 and len(dm.test_set) == 20


def test_download_with_a_wrong_checksum_fails_clearly(fashion_mnist_dir, mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "mirrors", (mirror,))  # serves files unlike torchvision's MD5s
    target = tmp_path / "downloaded"
    dm = FashionMNISTDataModule(data_dir=str(target), download=True)
    with pytest.raises(RuntimeError, match=r"train-images-idx3-ubyte.gz.*MD5 checksum [0-9a-f]{32} differs") as error:
        dm.prepare_data()
    assert FashionMNISTDataModule.checksums["train-images-idx3-ubyte.gz"] in str(error.value)
    assert not list(target.iterdir()), "the corrupt download is removed"


def test_download_without_network_names_the_folder_and_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "mirrors", ("http://127.0.0.1:9/",))  # nothing listens on port 9
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match="could not download") as error:
        dm.prepare_data()
    message = str(error.value)
    assert str(tmp_path) in message and "127.0.0.1:9" in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=true" in message


def test_labels_per_class_keeps_that_many_of_each_class_chosen_by_the_split_seed(fashion_mnist_dir):
    """Low-label fine-tuning (docs/pretraining.md): 40 images, 8 held out, 2 of each class kept."""
    kept = []
    for seed in (0, 1):
        data = FashionMNISTDataModule(str(fashion_mnist_dir), val_size=8, split_seed=seed, labels_per_class=2)
        data.setup("fit")
        labels = data.train_set.labels
        assert torch.bincount(labels, minlength=10).tolist() == [2] * 10 and len(data.val_set) == 8
        kept.append(data.train_set.images)
    assert not torch.equal(kept[0], kept[1])
