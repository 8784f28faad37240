"""Load official microsoft/Swin-Transformer, timm, and swinlab checkpoints into a swinlab model.

Layouts differ in where patch merging lives: the official code keeps it at the END of stage i
(``layers.{i}.downsample``, i = 0..2), timm and swinlab at the START of stage i (i = 1..3). The official
files also carry buffers (``relative_position_index``, ``attn_mask``) that swinlab rebuilds. Loading never
unpickles code: ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.interpolate import RectBivariateSpline
from torch import nn

from swinlab.models.checkpoint_file import read_checkpoint_file, unwrap_weights
from swinlab.models.hub import resolve_weights

logger = logging.getLogger(__name__)

# Wrappers other code puts around a backbone's keys: DDP, Lightning tasks, mmdet/mmseg.
_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "relative_coords_table")
_OFFICIAL_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
# The parts of a SimMIM pre-training checkpoint (official or swinlab) that are not the encoder.
_SIMMIM_PART = re.compile(r"(^|\.)(mask_token$|decoder\.)")


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]
    skipped_keys: list[str]  # dropped on purpose: head of another size, parts a features model has no use for


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.pth/.pt/.ckpt/.bin or .safetensors), unwrapped from ``model``/``state_dict``."""
    path = resolve_weights(path)  # a file path, or Hub weights by name (swinlab.models.hub)
    obj = unwrap_weights(read_checkpoint_file(path, "checkpoint"))  # never unpickles code (CheckpointFileError)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint {path} does not hold a state dict of tensors (found {type(obj).__name__}"
            f"{' with keys ' + ', '.join(list(map(str, obj))[:5]) if isinstance(obj, dict) else ''}); "
            "expected an official Swin .pth (key 'model'), a timm state dict, or a Lightning checkpoint"
        )
    return obj


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers other code puts around a backbone's keys (DDP ``module.``, Lightning ``backbone.`` ...)."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            # Lightning task checkpoints hold the backbone under "backbone." next to heads: keep the backbone.
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def to_swinlab_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official or timm keys to swinlab's (timm-like) layout and drop rebuilt buffers."""
    state = strip_prefixes(state)
    official = any(k.startswith("layers.0.downsample.") for k in state)
    out = {}
    for key, value in state.items():
        if key.endswith(_BUFFER_SUFFIXES):
            continue
        if official:
            match = _OFFICIAL_DOWNSAMPLE.match(key)
            if match:
                key = f"layers.{int(match.group(1)) + 1}.downsample." + key[match.end() :]
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        out[key] = value
    return out


def resize_relative_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2M'-1)^2, heads) -> ((2M-1)^2, heads) by bicubic interpolation, as the paper does at fine-tuning."""
    old = round(table.shape[0] ** 0.5)
    new = 2 * window - 1
    grid = table.T.reshape(1, -1, old, old)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(-1, new * new).T.to(table.dtype)


def geometric_resize_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2M'-1)^2, heads) -> ((2M-1)^2, heads) as SimMIM fine-tuning does (``remap_pretrained_keys_swin`` in
    microsoft/SimMIM utils.py, BEiT's method): the source offsets are spread on a geometric progression that reaches
    the target's half-width, and a 2-D cubic spline through them (scipy's ``interp2d(kind="cubic")`` there, the same
    spline as ``RectBivariateSpline(kx=3, ky=3, s=0)`` on a grid) is read at the target's integer offsets."""
    src, dst = round(table.shape[0] ** 0.5), 2 * window - 1
    left, right = 1.01, 1.5  # bisection for the ratio q with 1 + q + ... + q^(src//2 - 1) = dst // 2
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    distances = np.cumsum([1.0] + [q ** (i + 1) for i in range(src // 2 - 1)])
    source = np.concatenate([-distances[::-1], [0.0], distances])
    target = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    grids = table.detach().float().cpu().numpy().T.reshape(-1, src, src)
    resized = [RectBivariateSpline(source, source, grid, kx=3, ky=3, s=0)(target, target) for grid in grids]
    return torch.from_numpy(np.stack(resized).reshape(len(resized), -1).T.copy()).to(table.dtype)


def split_simmim_parts(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(encoder part, {mask token and decoder})`` of a SimMIM pre-training state dict (official
    ``encoder.mask_token`` / ``decoder.0.*``, or a swinlab ``MaskedImageModelingTask`` checkpoint); any other state
    dict is all encoder part. The SimMIM part keeps its keys as they are."""
    if not any(key.endswith("mask_token") for key in state):
        return state, {}
    simmim = {key: value for key, value in state.items() if _SIMMIM_PART.search(key)}
    return {key: value for key, value in state.items() if key not in simmim}, simmim


def resize_absolute_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, L, C) or (1, H, W, C) -> (1, *grid, C) by bicubic interpolation."""
    if pos.ndim == 3:
        side = round(pos.shape[1] ** 0.5)
        pos = pos.reshape(1, side, side, -1)
    if tuple(pos.shape[1:3]) != tuple(grid):
        pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False)
        pos = pos.permute(0, 2, 3, 1)
    return pos


def load_pretrained(model: nn.Module, path: str | Path) -> LoadResult:
    """Load an official, timm or swinlab checkpoint into ``model``, adapting it where the paper says how.

    A different window size interpolates the relative-position-bias tables (bicubic), a different image size
    the absolute position embedding; a head of another size is dropped with a warning; a final norm and head
    that a features model (``out_indices``) has no use for are skipped quietly. Missing and unexpected keys are
    logged by name; any other shape mismatch raises a ValueError naming the key, both shapes and the file.
    A model that knows its own checkpoint layout (``TimmBackbone``) loads through its ``load_pretrained_file``.
    A SimMIM pre-training checkpoint (official or swinlab) gives its encoder: the mask token and decoder are
    dropped (named once in the log) and the bias tables resized by SimMIM's geometric interpolation. A file with
    none of the model's weights raises a ValueError.
    """
    if hasattr(model, "load_pretrained_file"):
        return model.load_pretrained_file(path)
    state, simmim = split_simmim_parts(read_state_dict(path))
    if simmim:
        logger.info(
            "%s: a SimMIM pre-training checkpoint: its encoder is loaded, %s dropped",
            path,
            ", ".join(sorted(simmim)),
        )
    return load_state(model, state, path, geometric=bool(simmim))


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, geometric: bool = False
) -> LoadResult:
    """``load_pretrained`` of a state dict read from ``path`` (named in messages). ``geometric`` resizes the
    relative-position-bias tables as SimMIM fine-tuning does (``geometric_resize_bias_table``), else bicubic."""
    state = to_swinlab_layout(state)
    target = model.state_dict()
    if not any(key in target for key in state):
        raise ValueError(
            f"{path} holds no Swin encoder for this model: none of its {len(state)} tensors "
            f"({', '.join(list(state)[:3])}, ...) is a weight of the model; pass an official, timm or swinlab Swin "
            "checkpoint, or a SimMIM pre-training one"
        )
    resize_table = geometric_resize_bias_table if geometric else resize_relative_bias_table
    features_only = getattr(model, "out_indices", None) is not None
    converted, skipped = {}, []
    for key, value in state.items():
        if key not in target:
            if features_only and (key.startswith(("head.", "norm.")) or key in ("norm.weight", "norm.bias")):
                skipped.append(key)
                continue
            converted[key] = value  # reported as unexpected below
            continue
        want = target[key].shape
        if key.endswith("relative_position_bias_table") and value.shape != want:
            value = resize_table(value, round((want[0] ** 0.5 + 1) / 2))
        elif key == "absolute_pos_embed":
            value = resize_absolute_pos_embed(value, tuple(want[1:3]))
        elif key.startswith("head.") and value.shape != want:
            logger.warning(
                "%s: head %s has shape %s but the model's is %s (num_classes differs): the head is left "
                "newly initialised",
                path,
                key,
                tuple(value.shape),
                tuple(want),
            )
            skipped.append(key)
            continue
        if value.shape != want:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)} but the model expects {tuple(want)}; "
                "check that the checkpoint is for the same variant (embed_dim, depths, num_heads, patch_size)"
            )
        converted[key] = value
    result = model.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]  # a dropped head was already reported
    if missing:
        logger.warning(
            "%s: %d keys of the model are not in the checkpoint and stay as initialised: %s",
            path,
            len(missing),
            ", ".join(missing),
        )
    if result.unexpected_keys:
        logger.warning(
            "%s: %d keys of the checkpoint have no place in the model and were ignored: %s",
            path,
            len(result.unexpected_keys),
            ", ".join(result.unexpected_keys),
        )
    if skipped:
        logger.info("%s: skipped %s", path, ", ".join(skipped))
    return LoadResult(list(result.missing_keys), list(result.unexpected_keys), skipped)
