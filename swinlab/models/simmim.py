"""SimMIM (Xie et al., CVPR 2022; microsoft/SimMIM): masked image modelling for any swinlab Swin (V1 or V2).

A learnable mask token replaces the patch embeddings of the masked patches (after the patch embedding, before any
absolute position embedding); the encoder's last map goes through one 1x1 convolution to ``stride^2 x in_chans``
channels and ``PixelShuffle(stride)`` back to pixels (stride = the encoder's total stride, 32 for the paper's
models); the loss is L1 on the masked pixels only, normalised as the official code does. ``MaskGenerator`` draws
the masks (ceil(ratio x blocks) random blocks of ``mask_patch_size`` pixels per image) from a given
``torch.Generator``, so the data pipeline decides the random stream (``swinlab.data.unlabeled``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from swinlab.models.pretrained import load_state, read_state_dict, resize_absolute_pos_embed, split_simmim_parts
from swinlab.models.swin import SwinTransformer

logger = logging.getLogger(__name__)

_SIMMIM_KEY = re.compile(r"(mask_token|decoder\..*)$")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class MaskGenerator:
    """The official SimMIM mask: the image is cut into blocks of ``mask_patch_size`` pixels, ceil(``mask_ratio`` x
    blocks) of them are masked at random, and the block mask is repeated to the model's patches.

    ``generator()`` -> (H / model_patch_size, W / model_patch_size) int64 tensor, 1 = masked; the blocks come from
    ``generator`` (a seeded ``torch.Generator``), or torch's global generator when None.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        height, width = _pair(input_size)
        if mask_patch_size < 1 or model_patch_size < 1 or mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} is not a multiple of the model's patch_size={model_patch_size}; "
                f"use a multiple of {model_patch_size} (the paper: 32 with patch 4)"
            )
        if height % mask_patch_size or width % mask_patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of mask_patch_size={mask_patch_size}; crop to a "
                f"multiple of {mask_patch_size} (e.g. {max(1, height // mask_patch_size) * mask_patch_size}) or "
                "choose a mask_patch_size that divides it"
            )
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.input_size, self.mask_patch_size = (height, width), mask_patch_size
        self.model_patch_size, self.mask_ratio = model_patch_size, mask_ratio
        self.blocks = (height // mask_patch_size, width // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.block_count = self.blocks[0] * self.blocks[1]
        self.mask_count = math.ceil(self.block_count * mask_ratio)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        masked = torch.randperm(self.block_count, generator=generator)[: self.mask_count]
        mask = torch.zeros(self.block_count, dtype=torch.int64)
        mask[masked] = 1
        mask = mask.view(self.blocks)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )


class SimMIM(nn.Module):
    """SimMIM around a swinlab ``SwinTransformer`` classifier built with ``num_classes=0`` (V1 or V2 switches).

    ``forward(images, mask)``: images (B, C, H, W), mask (B, H / patch, W / patch) with 1 = masked ->
    ``(loss, reconstruction)``, the reconstruction (B, C, H, W) in the images' (normalised) units. The decoder
    predicts ``in_chans`` channels (the official code: always 3, for RGB; the same there).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(encoder, SwinTransformer):
            raise ValueError(
                f"SimMIM needs a swinlab Swin backbone (swin_*, swinv2_*, or a registered SwinTransformer), got "
                f"{type(encoder).__name__}; pick a Swin backbone"
            )
        if encoder.out_indices is not None:
            raise ValueError(
                f"SimMIM reconstructs from the final norm of the classifier layout; build the encoder without "
                f"out_indices (got {encoder.out_indices})"
            )
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.stride = encoder.patch_size * 2 ** (encoder.num_layers - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), mask -> the last stage's normalised map (B, num_features, H / stride, W / stride)."""
        encoder = self.encoder
        x = encoder.patch_embed(images)  # (B, H / p, W / p, C)
        if mask.shape != (x.shape[0], *x.shape[1:3]):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but {tuple(images.shape[-2:])} images with patch_size "
                f"{self.patch_size} need ({x.shape[0]}, {x.shape[1]}, {x.shape[2]}); make the masks with "
                f"model_patch_size={self.patch_size} at this input size"
            )
        weight = mask.unsqueeze(-1).type_as(x)
        x = x * (1.0 - weight) + self.mask_token.unsqueeze(0) * weight
        if encoder.absolute_pos_embed is not None:
            x = x + resize_absolute_pos_embed(encoder.absolute_pos_embed, tuple(x.shape[1:3]))
        x = encoder.pos_drop(x)
        for stage in encoder.layers:
            x = stage(x)
        return encoder.norm(x).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        # Sizes that are no multiple of the stride are padded inside the encoder: crop the padding off again.
        reconstruction = self.decoder(self.encode(images, mask))[..., :height, :width]
        pixel_mask = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1)
        pixel_mask = pixel_mask[..., :height, :width].type_as(images)
        error = F.l1_loss(images, reconstruction, reduction="none")
        loss = (error * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.in_chans
        return loss, reconstruction


def load_simmim_pretrained(model: SimMIM, path: str | Path) -> None:
    """Continue pre-training from ``path``: an official SimMIM release (``{"model": {"encoder.…", "decoder.…"}}``),
    a swinlab ``MaskedImageModelingTask`` checkpoint (both: encoder, mask token and decoder), or any Swin checkpoint
    ``load_pretrained`` reads (encoder only; the mask token and decoder stay newly initialised)."""
    encoder_state, simmim_state = split_simmim_parts(read_state_dict(path))
    load_state(model.encoder, encoder_state, path)
    # "encoder.mask_token" (official) or "model.mask_token" (task) -> "mask_token"; "<prefix>decoder.*" -> "decoder.*"
    own = {_SIMMIM_KEY.search(key).group(0): value for key, value in simmim_state.items()}
    if not own:
        logger.info("%s holds a Swin encoder only: the mask token and decoder start newly initialised", path)
        return
    result = model.load_state_dict(own, strict=False)
    expected = {"mask_token", *(f"decoder.{key}" for key in model.decoder.state_dict())}
    if result.unexpected_keys or expected & set(result.missing_keys):
        logger.warning(
            "%s: SimMIM parts %s not loaded (missing: %s)",
            path,
            ", ".join(result.unexpected_keys) or "all",
            ", ".join(sorted(expected & set(result.missing_keys))) or "none",
        )
