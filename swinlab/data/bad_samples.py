"""Reading images safely, and what a data set does with a sample it cannot use (``on_bad_sample``).

Every data module takes ``on_bad_sample``:

- ``skip`` (default): a warning names the file and why, the sample is counted in ``bad_samples`` and replaced by
  the next usable one (so batches keep their size); one bad file never stops a long run;
- ``raise``: a ``BadSampleError`` naming the file stops the run.

Images that are merely unusual are converted, not skipped: greyscale, palette, CMYK, 16-bit and alpha images
become 8-bit RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

OnBadSample = Literal["skip", "raise"]
Sample = TypeVar("Sample")

# Give up after this many unusable samples in a row: the data (or its config) is wrong as a whole.
MAX_CONSECUTIVE_BAD = 16


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names its file and the reason."""


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
    """Applies ``on_bad_sample`` to a data set's reads: ``guard(read, index, length)``.

    ``read(i)`` returns sample ``i`` or raises ``BadSampleError``. With ``skip`` the next indices are tried (at most
    ``MAX_CONSECUTIVE_BAD``), each bad one warned about once and counted in ``bad_samples`` (per process: with
    DataLoader workers each worker counts its own).
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
                    raise BadSampleError(f"{err} (on_bad_sample=raise; set on_bad_sample: skip to skip it)") from err
                if candidate not in self.bad_samples:
                    self.bad_samples[candidate] = str(err)
                    logger.warning("skipped bad sample %d: %s (%d bad so far)", candidate, err, len(self.bad_samples))
                errors.append(str(err))
        raise BadSampleError(
            f"{len(errors)} samples in a row from index {index} are unusable, the data or its config is wrong as a "
            f"whole; first: {errors[0]}"
        )
