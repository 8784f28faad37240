"""Swin-MLP (Liu et al. 2021, paper Table 10): Swin with window attention replaced by a spatial MLP.

Each block mixes the tokens of a window with one fully connected layer per head group (a grouped ``Conv1d``
over the ``window^2`` tokens, as in the official ``swin_mlp.py``); shifted blocks offset the window grid by
zero padding instead of a cyclic roll and mask. Everything else (patch embedding, patch merging, channel MLP,
stage layout, features and heads) is the Swin Transformer's, so every task can use ``swin_mlp_t`` in place of
``swin_t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from swinlab.models.registry import register_model
from swinlab.models.swin import PatchMerging, SwinOptions, SwinTransformer, log_small_map, small_map_window
from swinlab.models.windows import window_partition


class SwinMLPBlock(nn.Module):
    """Pre-norm block: (shifted) window spatial MLP then channel MLP, each with a residual. (B, H, W, C) -> same.

    The map is zero-padded to the window grid; a shifted block also pads ``window - shift`` before and
    ``shift`` after each axis (the official shift), so its windows straddle those of the previous block.
    Padding is zeros after ``norm1``: it adds only the spatial MLP's bias to real tokens, and is cut off after.

    The spatial MLP: head group h (channels ``h * C / heads`` to ``(h + 1) * C / heads``) of every output token
    is a learned linear combination of that group at all ``window^2`` tokens of its window, a grouped 1x1
    ``Conv1d`` over the ``heads * window^2`` (head, token) rows.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        rows = num_heads * window_size * window_size
        self.spatial_mlp = nn.Conv1d(rows, rows, kernel_size=1, groups=num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate)

    def mix_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Spatial MLP per window and head group: (B * nW, N, C) -> same, N = window^2."""
        BnW, N, C = windows.shape
        heads = self.num_heads
        x = windows.view(BnW, N, heads, C // heads).transpose(1, 2).reshape(BnW, heads * N, C // heads)
        x = self.spatial_mlp(x)
        return x.view(BnW, heads, N, C // heads).transpose(1, 2).reshape(BnW, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        M, shift = self.window_size, self.shift_size
        before = M - shift if shift else 0
        y = F.pad(self.norm1(x), (0, 0, before, shift + (-W) % M, before, shift + (-H) % M))
        Hp, Wp = y.shape[1:3]
        y = self.mix_windows(window_partition(y, M))  # (B * nW, M * M, C)
        y = y.view(B, Hp // M, Wp // M, M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        x = x + self.drop_path(y[:, before : before + H, before : before + W])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinMLPStage(nn.Module):
    """Patch merging (except in stage 0), then ``depth`` blocks alternating plain and shifted windows.
    (B, H, W, C) -> (B, H', W', C').

    The spatial MLP is sized for its window, so the window is fixed here: where ``feature_size`` (the stage's map
    at ``img_size``) is no larger than ``options.window_size``, ``options.clip_window_to_feature`` shrinks it to
    that map and drops the shift.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        options: SwinOptions,
        stage: int,
        drop_path: Sequence[float],
        feature_size: tuple[int, int],
    ) -> None:
        super().__init__()
        window, shift = small_map_window(*feature_size, options.window_size, options.clip_window_to_feature)
        if min(feature_size) <= options.window_size:
            log_small_map(f"stage {stage}", *feature_size, options.window_size, options.clip_window_to_feature)
        self.downsample = PatchMerging(dim // 2, options.merge_norm) if stage > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SwinMLPBlock(
                dim,
                num_heads,
                window,
                shift=options.shift and shift > 0 and j % 2 == 1,
                mlp_ratio=options.mlp_ratio,
                drop_rate=options.drop_rate,
                drop_path=drop_path[j],
            )
            for j in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        return x


# SwinTransformer arguments that only window attention reads: Swin-MLP has none.
ATTENTION_ONLY = ("qkv_bias", "attn_drop_rate", "attention", "similarity", "norm", "pretrained_window_size", "padding")


class SwinMLP(SwinTransformer):
    """Swin-MLP backbone and classifier, with the interface (and the other arguments) of :class:`SwinTransformer`.

    ``forward(x)``: (B, C_in, H, W) -> (B, num_classes) logits (or (B, num_features) when num_classes=0);
    ``forward_features(x)``: NCHW stage maps for ``out_indices``. ``num_heads`` are the spatial MLP's head
    groups. ``position_bias`` is 'none' (the official default) or 'absolute' (the official ``ape``); the spatial
    MLP weights are themselves position-specific, so there is no relative bias. A stage's window is fixed at
    construction (:class:`SwinMLPStage`). Any input size works; a map smaller than the window is zero-padded to one
    window. The arguments in ``ATTENTION_ONLY`` are refused.
    """

    stage_type = SwinMLPStage

    def __init__(
        self,
        num_heads: Sequence[int] = (8, 16, 32, 64),
        window_size: int = 8,
        position_bias: Literal["none", "absolute"] = "none",
        **kwargs: Any,
    ) -> None:
        if position_bias not in ("none", "absolute"):
            raise ValueError(
                f"Swin-MLP takes position_bias 'none' or 'absolute', got {position_bias!r}: its spatial MLP has "
                "no attention logits for a relative bias to add to"
            )
        if unused := [name for name in ATTENTION_ONLY if name in kwargs]:
            raise ValueError(f"Swin-MLP has no window attention, so it takes no {', '.join(unused)}")
        super().__init__(num_heads=num_heads, window_size=window_size, position_bias=position_bias, **kwargs)


@register_model
def swin_mlp_t(**kwargs) -> SwinMLP:
    """SwinMLP-T/C12 (official config swin_mlp_tiny_c12_patch4_window8_256): C=96, depths 2-2-6-2, heads
    8-16-32-64 (head groups of 12 channels), window 8, 256 px (21.2M params with 1000 classes)."""
    return SwinMLP(
        **{
            "img_size": 256,
            "embed_dim": 96,
            "depths": (2, 2, 6, 2),
            "num_heads": (8, 16, 32, 64),
            "window_size": 8,
            "drop_path_rate": 0.2,
            **kwargs,
        }
    )
