"""What the swinlab data modules share: batch sizes, workers, ``on_bad_sample``, class names and the loaders; and
the folder of unlabelled images that ``predict`` reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from swinlab.data.bad_samples import (
    READ_ERROR_KEY,
    BadSampleGuard,
    OnBadSample,
    SkipCountingLoader,
    check_on_bad_sample,
    open_image,
    placeholder_image,
)
from swinlab.data.resumable import ResumableDataLoader


def collate_as_lists(samples: list[dict[str, Any]]) -> dict[str, list]:
    """A batch that keeps one entry per sample under each key, for images of their own sizes (the detector pads
    them itself; segmentation scores each image at its original size)."""
    return {key: [sample[key] for sample in samples] for key in samples[0]}


class ImageFilesDataset(Dataset):
    """Every image file under ``root`` (recursively, sorted) -> ``{"image": transform(image), "file": path relative
    to root, READ_ERROR_KEY: ""}``; default collation stacks ``image`` and lists the others.

    Images are decoded to RGB (see ``open_image``) and converted to ``mode``. Sample ``i`` is always file ``i``: one
    that cannot be decoded is marked failed (``READ_ERROR_KEY`` = the reason, a placeholder image; see
    ``swinlab.data.bad_samples``) with ``on_bad_sample="skip"``, or raises with ``raise``.
    """

    def __init__(
        self, root: str | Path, transform: Callable, mode: str = "RGB", on_bad_sample: OnBadSample = "skip"
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"predict_dir {self.root} is not a folder; pass a folder of image files")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(
                f"predict_dir {self.root} holds no image files (looked for {', '.join(IMG_EXTENSIONS)})"
            )
        self.transform = transform
        self.mode = mode
        self.guard = BadSampleGuard(on_bad_sample)

    def __len__(self) -> int:
        return len(self.files)

    def _sample(self, index: int, image: Image.Image, error: str = "") -> dict[str, Any]:
        file = self.files[index].relative_to(self.root).as_posix()
        return {"image": self.transform(image.convert(self.mode)), "file": file, READ_ERROR_KEY: error}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.guard.read_or_fail(
            lambda i: self._sample(i, open_image(self.files[i])),
            index,
            lambda error: self._sample(index, placeholder_image(self.mode), error),
        )


class BaseDataModule(LightningDataModule):
    """Loader settings and the one loader factory of the swinlab data modules.

    Subclasses set ``class_names`` (``num_classes`` follows) and fill ``train_set``, ``val_set``, ``test_set`` and
    ``predict_set`` in ``setup``. The training loader is a ``ResumableDataLoader`` (a resumed run continues at the
    next unseen batch of the same order); the others keep the data set's order and use ``eval_batch_size``. All
    of them count the samples skipped in each pass (``SkipCountingLoader``, reported by ``BadSampleReport``).
    ``on_bad_sample`` (``skip`` or ``raise``) is checked here, before any data is read, and handed to the data
    sets (see ``swinlab.data.bad_samples``).
    """

    class_names: list[str]
    # Collate functions (None: PyTorch's default), set by subclasses whose samples do not stack.
    train_collate: Callable[[list], Any] | None = None
    eval_collate: Callable[[list], Any] | None = None
    # Whether training drops the last incomplete batch.
    drop_last_train: bool = True

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        super().__init__()
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        eval_batch_size = eval_batch_size or batch_size
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0  # DataLoader refuses it without workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def datasets(self) -> dict[str, Dataset]:
        """The data sets built so far, by loader name (``train``, ``val``, ``test``, ``predict``)."""
        built = {"train": self.train_set, "val": self.val_set, "test": self.test_set, "predict": self.predict_set}
        return {name: dataset for name, dataset in built.items() if dataset is not None}

    def loader(self, dataset: Dataset | None, split: str, train: bool = False) -> DataLoader:
        """The loader of one split: resumable, shuffled and ``batch_size`` for training, else in order."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} set; setup() did not build one")
        kwargs = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "collate_fn": self.train_collate if train else self.eval_collate,
            "drop_last": train and self.drop_last_train,
        }
        if train:
            return ResumableDataLoader(dataset, self.batch_size, **kwargs)
        return SkipCountingLoader(dataset, batch_size=self.eval_batch_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.predict_set, "predict")
