"""Reading images safely, and what a data set does with a sample it cannot use (``on_bad_sample``).

Every data module takes ``on_bad_sample``:

- ``skip`` (default): a warning names the file and why, and the sample is replaced by the next usable one (so
  batches keep their size); one bad file never stops a long run. The loaders of ``BaseDataModule``
  (``SkipCountingLoader``) collect the skipped samples of every DataLoader worker, and the ``BadSampleReport``
  callback reports them once per epoch, summed over workers and DDP ranks: "N of M samples skipped" with the
  first files, and the metric ``<stage>/bad_samples``;
- ``raise``: a ``BadSampleError`` naming the file stops the run.

``predict`` never replaces a sample, so every output row is its own file's: with ``skip`` a file that cannot be
read gives a sample *marked failed*. Predict samples are dicts, and their ``READ_ERROR_KEY`` entry holds ``""``
when the file was read, else the reason naming the file (e.g. ``"/data/x.jpg: unreadable image (OSError: ...)"``);
the image of a failed sample is a black ``PLACEHOLDER_SIZE`` square put through the same transform, only there
so the batch keeps its shape: the task must not predict on it, and writers write the row as failed.

Images that are merely unusual are converted, not skipped: greyscale, palette, CMYK, 16-bit and alpha images
become 8-bit RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, default_collate

logger = logging.getLogger(__name__)

OnBadSample = Literal["skip", "raise"]
Sample = TypeVar("Sample")

# Give up after this many unusable samples in a row: the data (or its config) is wrong as a whole.
MAX_CONSECUTIVE_BAD = 16
# How many skipped files the epoch report names.
REPORTED_FILES = 5
# The predict-sample key of the reason its file could not be read ("" when it was read), and the side of the black
# placeholder image a failed predict sample carries (see the module docstring).
READ_ERROR_KEY = "error"
PLACEHOLDER_SIZE = 32

# (index, reason) of the samples this process skipped since its last collate. A DataLoader worker reads a batch's
# samples and collates them in one go, so the collate (``SkipCountingCollate``) takes exactly that batch's skips.
_skipped_since_collate: list[tuple[int, str]] = []


def take_skipped() -> list[tuple[int, str]]:
    """The ``(index, reason)`` of the samples this process skipped since the last call, and forget them."""
    skipped = list(_skipped_since_collate)
    _skipped_since_collate.clear()
    return skipped


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names its file and the reason."""


def placeholder_image(mode: str = "RGB") -> Image.Image:
    """The black ``PLACEHOLDER_SIZE`` square a predict sample marked failed carries instead of its image."""
    return Image.new(mode, (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE))


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL image -> 8-bit RGB. 16/32-bit greyscale is scaled to 0..255 (PIL's own ``convert`` would clip it)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max(initial=0)), 1.0)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white instead of dropping alpha (which turns transparent regions into arbitrary colours).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BadSampleError(f"{name}: cannot convert image mode {image.mode} to RGB ({err})") from err


def open_image(path: str | Path) -> Image.Image:
    """Decode ``path`` completely and return it as 8-bit RGB; a missing, truncated or corrupt file raises
    ``BadSampleError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a transform
            return to_rgb(image, str(path))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        if isinstance(err, BadSampleError):
            raise
        raise BadSampleError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err


def check_on_bad_sample(on_bad_sample: str) -> OnBadSample:
    """``on_bad_sample`` itself, or a ValueError naming the allowed values."""
    if on_bad_sample not in ("skip", "raise"):
        raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
    return on_bad_sample


class BadSampleGuard:
    """Applies ``on_bad_sample`` to a data set's reads: ``guard(read, index, length)`` for training and evaluation,
    ``guard.read_or_fail(read, index, failed)`` for predict.

    ``read(i)`` returns sample ``i`` or raises ``BadSampleError``. With ``skip`` the next indices are tried (at most
    ``MAX_CONSECUTIVE_BAD``); each bad one is warned about the first time this process meets it (``bad_samples``,
    per process), and every skip is handed to the loader's collate (see ``take_skipped``) for the epoch total.
    """

    def __init__(self, on_bad_sample: OnBadSample = "skip") -> None:
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.bad_samples: dict[int, str] = {}  # index -> reason

    def __call__(self, read: Callable[[int], Sample], index: int, length: int) -> Sample:
        errors = []
        for offset in range(min(MAX_CONSECUTIVE_BAD, length)):
            candidate = (index + offset) % length
            try:
                return read(candidate)
            except BadSampleError as err:
                if self.on_bad_sample == "raise":
                    raise _stopping(err) from err
                _skipped_since_collate.append((candidate, str(err)))
                if candidate not in self.bad_samples:
                    self.bad_samples[candidate] = str(err)
                    logger.warning("skipped bad sample %d: %s", candidate, err)
                errors.append(str(err))
        raise BadSampleError(
            f"{len(errors)} samples in a row from index {index} are unusable, the data or its config is wrong as a "
            f"whole; first: {errors[0]}"
        )

    def read_or_fail(self, read: Callable[[int], Sample], index: int, failed: Callable[[str], Sample]) -> Sample:
        """Predict: ``read(index)``, or ``failed(reason)`` (the sample marked failed) when it raises
        ``BadSampleError``, so a row is never another file's; with ``raise`` the error stops the run."""
        try:
            return read(index)
        except BadSampleError as err:
            if self.on_bad_sample == "raise":
                raise _stopping(err) from err
            logger.warning("cannot read predict sample %d: %s; its row is marked failed", index, err)
            return failed(str(err))


def _stopping(err: BadSampleError) -> BadSampleError:
    return BadSampleError(f"{err} (on_bad_sample=raise; set on_bad_sample: skip to skip it)")


@dataclass
class SkippedSamples:
    """What one pass over a loader met: ``samples`` loaded, ``skipped`` (index -> reason) the distinct samples
    skipped on the way."""

    samples: int = 0
    skipped: dict[int, str] = field(default_factory=dict)


class SkipCountingCollate:
    """``collate`` (PyTorch's default when None) that also returns how many samples the batch holds and which
    were skipped while reading them: ``samples -> (batch, len(samples), [(index, reason), ...])``."""

    def __init__(self, collate: Callable[[list], Any] | None = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, samples: list) -> tuple[Any, int, list[tuple[int, str]]]:
        return self.collate(samples), len(samples), take_skipped()


class SkipCountingLoader(DataLoader):
    """A ``DataLoader`` whose ``skipped`` tells what the latest pass (epoch) skipped, over all its workers.

    Batches are those of ``collate_fn``; the skip records travel from the workers beside them (see
    ``SkipCountingCollate``) and are unpacked here, in the main process.
    """

    def __init__(self, dataset: Any, *args: Any, collate_fn: Callable[[list], Any] | None = None, **kwargs: Any):
        if not isinstance(collate_fn, SkipCountingCollate):  # Lightning may rebuild the loader from its attributes
            collate_fn = SkipCountingCollate(collate_fn)
        super().__init__(dataset, *args, collate_fn=collate_fn, **kwargs)
        self.skipped = SkippedSamples()

    def __iter__(self) -> Iterator[Any]:
        take_skipped()  # reads made outside this loader (and inherited by forked workers) are not its own
        self.skipped = SkippedSamples()
        return _UnpackSkipped(super().__iter__(), self.skipped)


class _UnpackSkipped:
    """Iterates a ``SkipCountingLoader``: yields the batches, adds their skip records to ``tally``."""

    def __init__(self, batches: Iterator[tuple[Any, int, list[tuple[int, str]]]], tally: SkippedSamples) -> None:
        self.batches, self.tally = batches, tally

    def __iter__(self) -> _UnpackSkipped:
        return self

    def __next__(self) -> Any:
        batch, size, skipped = next(self.batches)
        self.tally.samples += size
        self.tally.skipped.update(skipped)
        return batch


class BadSampleReport(Callback):
    """Once per train, validation and test epoch: the samples skipped by ``on_bad_sample="skip"``, summed over the
    DataLoader workers and DDP ranks, as a warning "N of M samples skipped" naming the first files (when N > 0)
    and as the metric ``<stage>/bad_samples`` (N; stages ``train``, ``val``, ``test``).

    Only loaders that count (``SkipCountingLoader``, every ``BaseDataModule`` loader) are reported.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "train", trainer.train_dataloader)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test", trainer.test_dataloaders)

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str, loaders: Any) -> None:
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        counting = [loader for loader in loaders if isinstance(loader, SkipCountingLoader)]
        if not counting:
            return
        samples = sum(loader.skipped.samples for loader in counting)
        # Keyed by (loader, index): a sample skipped by several workers or ranks counts once.
        skipped = {
            (number, index): reason
            for number, loader in enumerate(counting)
            for index, reason in loader.skipped.skipped.items()
        }
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, (samples, skipped))
            samples = sum(count for count, _ in gathered)
            skipped = {key: reason for _, per_rank in gathered for key, reason in per_rank.items()}
        # Already the total of every rank; sync_dist (a mean of equal values) tells Lightning so, which would
        # otherwise warn that an unsynced epoch metric is one rank's.
        pl_module.log(f"{stage}/bad_samples", float(len(skipped)), on_step=False, on_epoch=True, sync_dist=True)
        if skipped and trainer.is_global_zero:
            first = [skipped[key] for key in sorted(skipped)[:REPORTED_FILES]]
            more = f" (and {len(skipped) - len(first)} more)" if len(skipped) > len(first) else ""
            logger.warning(
                "%s epoch %d: %d of %d samples skipped (on_bad_sample=skip): %s%s",
                stage,
                trainer.current_epoch,
                len(skipped),
                samples,
                "; ".join(first),
                more,
            )
