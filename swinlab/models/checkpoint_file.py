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

# Where checkpoints keep the weights: official Swin releases (``model``, ``model_ema``), Lightning (``state_dict``).
WEIGHT_KEYS = ("model", "state_dict", "model_ema")


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


def unwrap_weights(contents: Any) -> Any:
    """The weights in a checkpoint's contents: the mapping under the first of :data:`WEIGHT_KEYS` that holds one,
    else the contents themselves (a bare state dict)."""
    for key in WEIGHT_KEYS:
        if isinstance(contents, dict) and isinstance(contents.get(key), dict):
            return contents[key]
    return contents


def read_lightning_checkpoint(path: str | Path, what: str = "--ckpt_path") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, hyper_parameters)`` of a Lightning checkpoint file (``{}`` for hyper-parameters it does not
    save), or a ``CheckpointFileError``: unreadable (:func:`read_checkpoint_file`), or not a Lightning checkpoint."""
    checkpoint = read_checkpoint_file(path, what)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        found = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointFileError(
            f"{what} {path}: not a Lightning checkpoint (no state_dict; found {found[:120]}); weights of a backbone "
            "alone (official, timm) go in model.init_args.pretrained"
        )
    return checkpoint["state_dict"], dict(checkpoint.get("hyper_parameters") or {})
