"""Reading a checkpoint file without running code in it, with one-line errors that name the file and the problem.

Lightning-free, so that ``swinlab.models`` (pretrained weights) and ``swinlab.checkpointing`` (``--ckpt_path``,
resuming) read files the same way.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be used; the one-line message names the file and what is wrong."""


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_checkpoint_file(path: str | Path, what: str = "--ckpt_path", map_location: Any = "cpu") -> Any:
    """The contents of a local checkpoint file (``torch.load`` with ``weights_only=True``, or safetensors), or a
    ``CheckpointFileError`` naming ``what`` (the option that gave it), the file and the problem: missing, empty,
    not a checkpoint, truncated, or a pickle that would run code (nothing in it runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{what} {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"{what} {path}: the file is empty (0 bytes), a save that never finished")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointFileError(f"{what} {path}: not a complete safetensors file ({first_line(err)})") from None
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointFileError(
            f"{what} {path}: truncated checkpoint ({size} bytes, the end of its zip archive is missing), a save that "
            "was cut short; use an earlier checkpoint"
        )
    if not head.startswith((b"PK", b"\x80")):
        raise CheckpointFileError(
            f"{what} {path}: not a PyTorch checkpoint (it starts with {head!r}; a .ckpt/.pth file is a zip archive "
            "written by torch.save)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CheckpointFileError(
            f"{what} {path}: refused, it holds pickled Python objects other than tensors and plain values "
            f"({found.group(1) if found else first_line(err)}), which would run code when loaded; re-save only the "
            "weights from a copy you trust (torch.save(model.state_dict(), path)) or convert it to .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(f"{what} {path}: corrupt or truncated checkpoint ({first_line(err)})") from None
