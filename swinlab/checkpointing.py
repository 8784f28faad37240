"""Checkpoint files that survive a kill while saving, and that load without unpickling code."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Not "last..." and not ".ckpt": Lightning's ``ckpt_path="last"`` search must never pick a half-written file.
_PARTIAL_SUFFIX = ".partial"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint_safely(path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller explicitly passes ``False``.

    A file whose pickle names anything but tensors, containers and plain values (for example a class whose
    ``__reduce__`` runs a command) is refused with a ValueError naming the file; nothing in it runs.
    """
    weights_only = True if weights_only is None else weights_only
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refused to load checkpoint {path}: it holds Python objects other than tensors and plain values, and "
            f"swinlab loads checkpoints with weights_only=True so that a file cannot run code "
            f"({str(err).splitlines()[0]}). Only load it with weights_only=False if you trust its origin."
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local saves and ``weights_only=True`` loads.

    A save writes a temporary file in the target folder, fsyncs it, and renames it over the target
    (``os.replace``), so a kill at any moment leaves either the previous or the new complete checkpoint. Lightning's
    own save goes through a temporary file in the system temp folder and ``shutil.move``, which copies (and can be
    cut short) when that folder is on another file system. Remote paths (``s3://`` ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}; use a "
                "custom CheckpointIO for them"
            )
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(partial, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint file {path} does not exist; check --ckpt_path")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().load_checkpoint(
                path, map_location, weights_only=True if weights_only is None else weights_only
            )
        return load_checkpoint_safely(str(path).removeprefix("file://"), map_location, weights_only)
