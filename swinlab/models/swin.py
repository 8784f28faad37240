"""Swin Transformer (Liu et al. 2021, arXiv 2103.14030), faithful to the paper and the official code.

Tensors inside the network are channels-last, ``(B, H, W, C)``; stage outputs leave as NCHW. Every paper
ablation is a constructor argument: ``window_size``, ``shift``, ``position_bias``, ``patch_size``,
``embed_dim``, ``depths``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``drop_path_rate``. Swin V2 (Liu et al.
2022, arXiv 2111.09883) is the same model with its changes switched on one by one: ``similarity="cosine"``,
``position_bias="cpb"`` (with ``pretrained_window_size``), ``norm="res_post"``, ``merge_norm="after"``,
``qkv_bias="qv"``; ``swinv2_t/s/b/l`` turn all of them on (the :data:`SWIN_V2` preset).

The switches that stages, blocks and attention layers read are gathered once into a frozen :class:`SwinOptions`
(validated when it is made) that every level receives unchanged, under the constructor's names.

Any input size works: each block pads its map to the window grid. ``padding`` says how: ``"official"`` (the
default) pads before the cyclic shift and lets real tokens attend to the zero padding tokens, as the official
detection/segmentation backbone; ``"timm"`` pads after the shift, as timm; ``"mask"`` masks the padding out, so a
real token only ever attends to real tokens of its own (shifted) window. How windows are laid out lives in
:mod:`swinlab.models.windows`, how attention is executed in :mod:`swinlab.models.kernels`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import typing
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from swinlab.models.kernels import AttentionKernel, WindowAttentionKernel
from swinlab.models.registry import register_model
from swinlab.models.windows import (
    Padding,
    SymbolicLayout,
    WindowLayout,
    WindowLayouts,
    log_spaced_offsets,
    pad_to_multiple,
    relative_position_index,
    symbolic_layout,
)

logger = logging.getLogger(__name__)

# Each Swin V2 change is its own switch, so a sweep can walk from V1 to V2 one change at a time.
PositionBias = Literal["relative", "absolute", "relative+absolute", "none", "cpb"]
TABLE_BIASES = ("relative", "relative+absolute")  # the position_bias choices with a learned relative bias table
ABSOLUTE_BIASES = ("absolute", "relative+absolute")  # those with an absolute position embedding
QKVBias = Literal[True, False, "qv"]  # "qv": V2's q and v biases without a k bias
Similarity = Literal["dot", "cosine"]  # V1 scaled dot product; V2 scaled cosine
NormPlacement = Literal["pre", "res_post"]  # V1 pre-norm; V2 residual post-norm
MergeNorm = Literal["before", "after"]  # patch merging's LayerNorm before (V1) or after (V2) the reduction
__all__ = [
    "SWIN_V2",
    "SwinOptions",
    "SwinTransformer",
    "swin_b",
    "swin_l",
    "swin_s",
    "swin_t",
    "swinv2_b",
    "swinv2_l",
    "swinv2_s",
    "swinv2_t",
]


@dataclasses.dataclass(frozen=True)
class SwinOptions:
    """The switches of :class:`SwinTransformer` that its stages, blocks and attention layers read, under the
    constructor's names (see its docstring); checked once, here. ``pretrained_window_size`` is one int or one per
    stage (stored as a tuple); :meth:`pretrained_window` gives a stage's."""

    window_size: int = 7
    shift: bool = True
    position_bias: PositionBias = "relative"
    mlp_ratio: float = 4.0
    qkv_bias: QKVBias = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    clip_window_to_feature: bool = True
    attention: AttentionKernel = "auto"
    similarity: Similarity = "dot"
    norm: NormPlacement = "pre"
    merge_norm: MergeNorm = "before"
    pretrained_window_size: int | tuple[int, ...] = 0
    padding: Padding = "official"

    def __post_init__(self) -> None:
        for name, choices in option_choices().items():
            value = getattr(self, name)
            # `is` for True/False: 1 == True, but qkv_bias=1 is not one of the choices.
            if not any(value is choice or (isinstance(choice, str) and value == choice) for choice in choices):
                raise ValueError(f"{name}={value!r} is not one of {choices}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if not isinstance(self.pretrained_window_size, int):  # a list from a config: hashable like the rest
            object.__setattr__(self, "pretrained_window_size", tuple(self.pretrained_window_size))

    def pretrained_window(self, stage: int) -> int:
        """Stage ``stage``'s pre-training window (0: none)."""
        sizes = self.pretrained_window_size
        return sizes if isinstance(sizes, int) else sizes[stage]


@functools.cache
def option_choices() -> dict[str, tuple]:
    """{option: its choices} for every :class:`SwinOptions` field typed as a ``Literal``."""
    hints = typing.get_type_hints(SwinOptions)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}


# Swin V2 (Liu et al. 2022, arXiv 2111.09883) as a preset of SwinOptions: the V1 model with every V2 switch on.
SWIN_V2 = {
    "similarity": "cosine",
    "position_bias": "cpb",
    "norm": "res_post",
    "merge_norm": "after",
    "qkv_bias": "qv",
}


def small_map_window(H: int, W: int, window: int, clip: bool) -> tuple[int, int]:
    """(window, shift of the shifted blocks) on an H x W map.

    Where the map is no larger than the window, the official code (and so ``clip=True``) shrinks the window to
    the map's short side and drops the shift; ``clip=False`` keeps both.
    """
    if clip and min(H, W) <= window:
        return min(H, W), 0
    return window, window // 2


def log_small_map(stage: str, H: int, W: int, window: int, clip: bool) -> None:
    """One line naming the stage whose H x W map is no larger than its window, and what the model does there."""
    if clip:
        logger.info(
            "%s: feature map %dx%d is no larger than window %d: window %d without shift there, as in the official "
            "code (clip_window_to_feature=False keeps window %d and shift %d)",
            stage,
            H,
            W,
            window,
            min(H, W),
            window,
            window // 2,
        )
    else:
        logger.info(
            "%s: feature map %dx%d is no larger than window %d; the shifted blocks still shift by %d "
            "(the official code shrinks the window and drops the shift here: "
            "clip_window_to_feature=True matches it)",
            stage,
            H,
            W,
            window,
            window // 2,
        )


class PatchEmbed(nn.Module):
    """Patch partition + linear embedding + LayerNorm: (B, C_in, H, W) -> (B, H / p, W / p, C).

    H and W need not be multiples of the patch size: the image is zero-padded on the bottom and right.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pad_to_multiple(x, self.patch_size, (-2, -1))).permute(0, 2, 3, 1))


def bias_indices(
    window: int, table_window: int, pretrained_window: int, cpb: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(index (N, N) into the bias table, CPB coordinates or None) of a ``window`` in a layer built for
    ``table_window`` (equal, or smaller where the window is clipped to a small feature map)."""
    if not cpb:  # a clipped window reads the full table at its own offsets
        return relative_position_index(window, table_window), None
    # The CPB computes a table of the window's own offsets.
    return relative_position_index(window, window), log_spaced_offsets(window, pretrained_window)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias.

    Input (B * nW, N, C) with N = window^2; ``mask`` (nW, N, N) additive or None. V1: dot-product logits
    ``q k^T / sqrt(d)``, bias from a learned ``relative_position_bias_table``. Swin V2 switches:
    ``similarity="cosine"`` (cos(q, k) times a learned per-head ``exp(logit_scale)``, clamped at 100),
    ``position_bias="cpb"`` (``16 * sigmoid(cpb_mlp(log-spaced offsets))``, any window without interpolation;
    offsets are normalised by the stage's ``pretrained_window_size`` when set) and ``qkv_bias="qv"`` (q and v
    biases, no k bias). ``attention`` picks the kernel that executes it
    (:class:`~swinlab.models.kernels.WindowAttentionKernel`); every kernel computes the same function.

    The bias-table indices (and CPB coordinates) of ``options.window_size`` and of ``feature_window`` (the window
    clipped to the stage's map at ``img_size``, when smaller) are non-persistent buffers built here; another
    clipped window (another input size) gets its few-kB indices built in the forward pass.
    """

    def __init__(
        self, dim: int, num_heads: int, options: SwinOptions, stage: int = 0, feature_window: int | None = None
    ) -> None:
        super().__init__()
        self.options = options
        self.kernel = WindowAttentionKernel(options.attention)
        self.num_heads = num_heads
        self.window_size = options.window_size
        self.pretrained_window_size = options.pretrained_window(stage)
        self.qkv = nn.Linear(dim, dim * 3, bias=options.qkv_bias is True)
        if options.qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(options.drop_rate)
        if options.similarity == "cosine":
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.relative_position_bias_table = None
        if options.position_bias in TABLE_BIASES:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * self.window_size - 1) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        elif options.position_bias == "cpb":
            hidden = nn.Linear(2, 512)
            self.cpb_mlp = nn.Sequential(hidden, nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.clipped_window = feature_window if feature_window is not None and feature_window < self.window_size else 0
        for prefix, window in (("relative", self.window_size), ("clipped", self.clipped_window)):
            index, coords = None, None
            if window and self.bias_weights():
                index, coords = bias_indices(window, self.window_size, self.pretrained_window_size, self.cpb)
            self.register_buffer(f"{prefix}_position_index", index, persistent=False)
            self.register_buffer(f"{prefix}_coords_table", coords, persistent=False)

    @property
    def cpb(self) -> bool:
        return self.options.position_bias == "cpb"

    def bias_weights(self) -> tuple[torch.Tensor, ...]:
        """The parameters the position bias is computed from (none without a relative bias)."""
        if self.cpb:
            return tuple(self.cpb_mlp.parameters())
        return (self.relative_position_bias_table,) if self.options.position_bias in TABLE_BIASES else ()

    def window_tensors(self, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(index (N, N) into the bias table, CPB coordinates or None) for an effective window."""
        if window == self.window_size:
            return self.relative_position_index, self.relative_coords_table
        if window == self.clipped_window:
            return self.clipped_position_index, self.clipped_coords_table
        index, coords = bias_indices(window, self.window_size, self.pretrained_window_size, self.cpb)
        device = self.relative_position_index.device
        return index.to(device), None if coords is None else coords.to(device, self.relative_coords_table.dtype)

    def relative_bias(self, window: int) -> torch.Tensor | None:
        """(heads, N, N) bias for an effective window (the configured one, or a smaller clipped one)."""
        if not self.bias_weights():
            return None
        index, coords = self.window_tensors(window)
        table = self.relative_position_bias_table if coords is None else 16 * torch.sigmoid(self.cpb_mlp(coords))
        N = window * window
        return table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, window: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        BnW, N, C = x.shape
        if self.options.qkv_bias == "qv":
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)))
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(BnW, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, d)
        scale = None
        if self.options.similarity == "cosine":
            q = F.normalize(q, dim=-1) * self.logit_scale.clamp(max=math.log(100.0)).exp()
            k, scale = F.normalize(k, dim=-1), 1.0
        dropout = self.options.attn_drop_rate if self.training else 0.0
        x = self.kernel(q, k, v, window, mask, self.relative_bias, self.bias_weights(), scale=scale, dropout=dropout)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(BnW, N, C)))


class SwinBlock(nn.Module):
    """(S)W-MSA then MLP, each with a residual and stochastic depth. (B, H, W, C) -> same.

    ``shifted`` is True for the odd blocks of a stage when ``options.shift`` (SW-MSA, cyclic shift by floor(M / 2)).
    ``options.norm="pre"`` (V1) normalises each branch's input, ``"res_post"`` (V2) its output: ``x + norm(attn(x))``.
    ``stage`` and ``feature_window`` go to :class:`WindowAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        options: SwinOptions,
        stage: int = 0,
        shifted: bool = False,
        drop_path: float = 0.0,
        feature_window: int | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, options, stage, feature_window)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * options.mlp_ratio), act_layer=nn.GELU, drop=options.drop_rate)

    def forward(self, x: torch.Tensor, window: int, layout: WindowLayout | SymbolicLayout) -> torch.Tensor:
        """``window`` and ``layout`` (padding, shift, mask) are this map's effective ones (see :class:`SwinStage`)."""
        B, H, W = x.shape[:3]
        post_norm = self.options.norm == "res_post"
        windows = layout.partition(x if post_norm else self.norm1(x), window)
        attended = layout.merge(self.attn(windows, window, layout.mask), B, H, W)
        x = x + self.drop_path(self.norm1(attended) if post_norm else attended)
        return x + self.drop_path(self.norm2(self.mlp(x)) if post_norm else self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), LayerNorm, Linear to 2C without bias. (B, H, W, C) -> (B, H/2, W/2, 2C).

    Odd sizes are zero-padded first. The concatenation order is the official one (x00, x10, x01, x11).
    ``merge_norm="after"`` (Swin V2) applies the LayerNorm to the reduced 2C channels instead.
    """

    def __init__(self, dim: int, merge_norm: MergeNorm = "before") -> None:
        super().__init__()
        self.merge_norm = merge_norm
        self.norm = nn.LayerNorm(2 * dim if merge_norm == "after" else 4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = pad_to_multiple(x, 2, (-3, -2))
        x = x.reshape(B, (H + 1) // 2, 2, (W + 1) // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x)) if self.merge_norm == "after" else self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Patch merging (except in stage 0), then ``depth`` blocks alternating W-MSA and SW-MSA.
    (B, H, W, C) -> (B, H', W', C').

    The window layouts (indices and masks) of each map size come from :class:`~swinlab.models.windows.WindowLayouts`;
    those of ``feature_size`` (the map size at the model's ``img_size``) are built at construction. ``drop_path``
    holds each block's stochastic-depth rate.
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
        self.options = options
        self.downsample = PatchMerging(dim // 2, options.merge_norm) if stage > 0 else nn.Identity()
        self.name = f"stage {stage}"
        self.grad_checkpointing = False
        self._warned_sizes: set[tuple[int, int]] = set()
        window, shift = self.effective_window(*feature_size, log=False)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, options, stage, options.shift and j % 2 == 1, drop_path[j], window)
            for j in range(depth)
        )
        self.layouts = WindowLayouts(feature_size, window, shift, options.padding)

    def effective_window(self, H: int, W: int, log: bool = True) -> tuple[int, int]:
        """(window, shift) for an H x W map; shift is the one of shifted blocks."""
        window_size, clip = self.options.window_size, self.options.clip_window_to_feature
        small = min(H, W) <= window_size
        if log and small and (H, W) not in self._warned_sizes and not torch.compiler.is_compiling():
            self._warned_sizes.add((H, W))
            log_small_map(self.name, H, W, window_size, clip)
        return small_map_window(H, W, window_size, clip)

    def symbolic_layouts(self, H: int, W: int, device: torch.device) -> tuple[SymbolicLayout, SymbolicLayout]:
        """(plain, shifted) :class:`~swinlab.models.windows.SymbolicLayout` of an H x W map no smaller than the
        window, possibly symbolic: what ``torch.export`` traces; the shift's small-map rule is decided in the graph."""
        window, padding, clip = self.options.window_size, self.options.padding, self.options.clip_window_to_feature
        plain = symbolic_layout(H, W, window, 0, clip, padding, device)
        if not self.options.shift:
            return plain, plain
        return plain, symbolic_layout(H, W, window, window // 2, clip, padding, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        H, W = x.shape[1:3]
        if torch.compiler.is_exporting():
            # Sizes are symbolic: no Python-built index tables, and the window never shrinks (export_onnx sets
            # the smallest input size accordingly, swinlab.deploy.onnx_graph.min_dynamic_size).
            window = self.options.window_size
            plain, shifted = self.symbolic_layouts(H, W, x.device)
        else:
            window, shift = self.effective_window(H, W)
            plain = self.layouts.get(H, W, window, 0, x.device)
            shifted = self.layouts.get(H, W, window, shift, x.device) if shift else plain
        for block in self.blocks:
            layout = shifted if block.shifted else plain
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, window, layout, use_reentrant=False)
            else:
                x = block(x, window, layout)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer backbone and classifier.

    ``forward(x)``: (B, C_in, H, W) -> (B, num_classes) logits, or (B, num_features) when num_classes=0.
    ``forward_features(x)``: list of NCHW stage maps for ``out_indices`` (strides patch_size * 2^i).
    With ``out_indices`` given (a dense-prediction backbone) each of those maps has its own LayerNorm
    ``norm{i}`` and there is no final norm or head, as in the official detection/segmentation backbones;
    without it the model is the classifier (final ``norm``, global average pool, ``head``).
    ``attention`` picks the window-attention kernel (see :mod:`swinlab.models.kernels`); ``img_size`` is the size
    whose window layouts are prebuilt (any other size works and gets its layouts built in the forward pass).
    ``padding`` (``"official"``, ``"timm"`` or ``"mask"``) is how a map that is no multiple of the window is padded:
    see the module docstring and docs/architecture.md. The switches from ``window_size`` on are kept, checked, as
    ``self.options`` (:class:`SwinOptions`), which every stage, block and attention layer reads.
    Variants with other blocks (Swin-MLP) set ``stage_type`` (see :meth:`make_stage`).
    """

    stage_type: type[nn.Module] = SwinStage

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        shift: bool = True,
        position_bias: PositionBias = "relative",
        mlp_ratio: float = 4.0,
        qkv_bias: QKVBias = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        clip_window_to_feature: bool = True,
        out_indices: Sequence[int] | None = None,
        grad_checkpointing: bool | Sequence[bool] = False,
        attention: AttentionKernel = "auto",
        similarity: Similarity = "dot",
        norm: NormPlacement = "pre",
        merge_norm: MergeNorm = "before",
        pretrained_window_size: int | Sequence[int] = 0,
        padding: Padding = "official",
    ) -> None:
        super().__init__()
        self.options = SwinOptions(
            window_size=window_size,
            shift=shift,
            position_bias=position_bias,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            clip_window_to_feature=clip_window_to_feature,
            attention=attention,
            similarity=similarity,
            norm=norm,
            merge_norm=merge_norm,
            pretrained_window_size=pretrained_window_size,
            padding=padding,
        )
        validate_config(embed_dim, depths, num_heads, patch_size, out_indices, self.options)
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.out_indices = tuple(out_indices) if out_indices is not None else None

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if position_bias in ABSOLUTE_BIASES:
            grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        # Rises linearly over all blocks; plain Python, so that the model can be built on the meta device.
        drop_path = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList()
        feature_size = (-(-self.img_size[0] // patch_size), -(-self.img_size[1] // patch_size))
        for i, depth in enumerate(depths):
            if i > 0:  # patch merging pads odd sizes
                feature_size = (-(-feature_size[0] // 2), -(-feature_size[1] // 2))
            start = sum(depths[:i])
            self.layers.append(self.make_stage(i, drop_path[start : start + depth], feature_size))
        if self.out_indices is None:
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        else:
            for i in self.out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))
        self.set_grad_checkpointing(grad_checkpointing)
        self.apply(_init_weights)
        if norm == "res_post":  # as the official V2: each residual branch starts as zero
            for block in (block for stage in self.layers for block in stage.blocks):
                for layer_norm in (block.norm1, block.norm2):
                    nn.init.zeros_(layer_norm.weight)
                    nn.init.zeros_(layer_norm.bias)

    def make_stage(self, index: int, drop_path: list[float], feature_size: tuple[int, int]) -> nn.Module:
        """Stage ``index``: patch merging (except in stage 0), then its blocks; (B, H, W, C) -> (B, H', W', C').

        ``drop_path`` holds the stochastic-depth rate of each block, ``feature_size`` the stage's map size at
        ``img_size``. A variant with other blocks sets ``stage_type`` to a stage class with :class:`SwinStage`'s
        arguments, a ``blocks`` list and a ``grad_checkpointing`` flag (or overrides this method).
        """
        dim = self.embed_dim * 2**index
        depth, heads = self.depths[index], self.num_heads[index]
        return self.stage_type(dim, depth, heads, self.options, index, drop_path, feature_size)

    @property
    def feature_channels(self) -> list[int]:
        return [self.embed_dim * 2**i for i in self._feature_indices()]

    @property
    def feature_strides(self) -> list[int]:
        return [self.patch_size * 2**i for i in self._feature_indices()]

    def _feature_indices(self) -> tuple[int, ...]:
        return self.out_indices if self.out_indices is not None else tuple(range(self.num_layers))

    def set_grad_checkpointing(self, enable: bool | Sequence[bool] = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, more compute).

        ``enable`` is one flag for all stages or one per stage, e.g. ``(True, True, False, False)`` to
        checkpoint only the high-resolution stages, which hold most of the activation memory.
        """
        flags = [enable] * self.num_layers if isinstance(enable, bool) else [bool(flag) for flag in enable]
        if len(flags) != self.num_layers:
            raise ValueError(
                f"grad_checkpointing={tuple(enable)} has {len(flags)} flags for {self.num_layers} stages; "
                "pass one bool, or one per stage"
            )
        for stage, flag in zip(self.layers, flags):
            stage.grad_checkpointing = flag

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def num_lr_layers(self) -> int:
        """Depth for layer-wise lr decay: the embedding is layer 0, block k is layer k + 1, norm/head the top."""
        return sum(self.depths) + 1

    def lr_layer_id(self, name: str) -> int:
        """Layer of a parameter name (as in ``named_parameters``) for layer-wise lr decay."""
        if name.startswith(("patch_embed", "absolute_pos_embed")):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            stage = int(parts[1])
            first = sum(self.depths[:stage]) + 1
            # Patch merging shares the previous stage's last block layer, as the official get_swin_layer has it
            # (the official layout keeps it at the end of that stage).
            return first + int(parts[3]) if parts[2] == "blocks" else first - 1
        return self.num_lr_layers

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H / p, W / p, C), with the absolute position embedding if any."""
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed
            if torch.compiler.is_exporting() or pos.shape[1:3] != x.shape[1:3]:
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic", align_corners=False)
                pos = pos.permute(0, 2, 3, 1)
            x = x + pos
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [(B, C * 2^i, H / (p * 2^i), W / (p * 2^i)) for i in out_indices], rounded up."""
        x = self.embed(x)
        wanted = self._feature_indices()
        features = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in wanted:
                norm = getattr(self, f"norm{i}", None)
                if norm is None and i == self.num_layers - 1:
                    norm = self.norm
                y = norm(x) if norm is not None else x
                features.append(y.permute(0, 3, 1, 2).contiguous())
            if i >= max(wanted):
                break
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage (B, H, W, C) -> final norm, global average pool, head."""
        return self.head(self.norm(x).mean(dim=(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.out_indices is not None:
            return self.forward_features(x)
        x = self.embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.forward_head(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _heads_near_dim_32(dim: int) -> int:
    """The divisor of ``dim`` that gives the head dimension closest to the paper's 32."""
    return min((h for h in range(1, dim + 1) if dim % h == 0), key=lambda h: abs(dim / h - 32))


def validate_config(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    patch_size: int,
    out_indices: Sequence[int] | None,
    options: SwinOptions,
) -> None:
    """Raise a ValueError that names the argument and the fix for a configuration that cannot work (the switches
    in ``options`` are checked by :class:`SwinOptions` itself; here, how they fit the stages)."""
    if len(depths) != len(num_heads):
        raise ValueError(
            f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length (one per stage)"
        )
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2**i
        if heads <= 0 or dim % heads:
            raise ValueError(
                f"embed_dim={embed_dim} gives {dim} channels in stage {i}, not divisible by num_heads[{i}]={heads}; "
                f"choose num_heads[{i}] dividing {dim} (for example {_heads_near_dim_32(dim)}, head dim close to 32) "
                f"or an embed_dim that is a multiple of {heads // math.gcd(heads, 2**i)}"
            )
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if out_indices is not None and (not out_indices or any(not 0 <= i < len(depths) for i in out_indices)):
        raise ValueError(f"out_indices={tuple(out_indices)} must name stages in 0..{len(depths) - 1}")
    pretrained = options.pretrained_window_size
    if not isinstance(pretrained, int) and len(pretrained) != len(depths):
        raise ValueError(
            f"pretrained_window_size={pretrained} has {len(pretrained)} entries for {len(depths)} stages; "
            "pass one int, or one per stage"
        )


@register_model
def swin_t(**kwargs) -> SwinTransformer:
    """Swin-T: C=96, depths 2-2-6-2, heads 3-6-12-24 (28.3M params, 4.5 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.2, **kwargs}
    )


@register_model
def swin_s(**kwargs) -> SwinTransformer:
    """Swin-S: C=96, depths 2-2-18-2, heads 3-6-12-24 (49.6M params, 8.7 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.3, **kwargs}
    )


@register_model
def swin_b(**kwargs) -> SwinTransformer:
    """Swin-B: C=128, depths 2-2-18-2, heads 4-8-16-32 (87.8M params, 15.4 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "drop_path_rate": 0.5, **kwargs}
    )


@register_model
def swin_l(**kwargs) -> SwinTransformer:
    """Swin-L: C=192, depths 2-2-18-2, heads 6-12-24-48 (196.5M params, 34.5 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "drop_path_rate": 0.2, **kwargs}
    )


@register_model
def swinv2_t(**kwargs) -> SwinTransformer:
    """SwinV2-T at 256, window 8 (timm ``swinv2_tiny_window8_256``; ``window_size=16`` gives ``..._window16_256``)."""
    return SwinTransformer(
        **{
            **SWIN_V2,
            "img_size": 256,
            "window_size": 8,
            "embed_dim": 96,
            "depths": (2, 2, 6, 2),
            "num_heads": (3, 6, 12, 24),
            "drop_path_rate": 0.2,
            **kwargs,
        }
    )


@register_model
def swinv2_s(**kwargs) -> SwinTransformer:
    """SwinV2-S at 256, window 8 (timm ``swinv2_small_window8_256``; ``window_size=16`` gives ``..._window16_256``)."""
    return SwinTransformer(
        **{
            **SWIN_V2,
            "img_size": 256,
            "window_size": 8,
            "embed_dim": 96,
            "depths": (2, 2, 18, 2),
            "num_heads": (3, 6, 12, 24),
            "drop_path_rate": 0.3,
            **kwargs,
        }
    )


@register_model
def swinv2_b(**kwargs) -> SwinTransformer:
    """SwinV2-B at 256, window 8 (timm ``swinv2_base_window8_256``; ``window_size=16`` gives ``..._window16_256``)."""
    return SwinTransformer(
        **{
            **SWIN_V2,
            "img_size": 256,
            "window_size": 8,
            "embed_dim": 128,
            "depths": (2, 2, 18, 2),
            "num_heads": (4, 8, 16, 32),
            "drop_path_rate": 0.5,
            **kwargs,
        }
    )


@register_model
def swinv2_l(**kwargs) -> SwinTransformer:
    """SwinV2-L at 192, window 12 (timm ``swinv2_large_window12_192``); its 384 fine-tune
    ``swinv2_large_window12to24_192to384`` is ``img_size=384, window_size=24, pretrained_window_size=(12, 12, 12, 6)``.
    """
    return SwinTransformer(
        **{
            **SWIN_V2,
            "img_size": 192,
            "window_size": 12,
            "embed_dim": 192,
            "depths": (2, 2, 18, 2),
            "num_heads": (6, 12, 24, 48),
            "drop_path_rate": 0.2,
            **kwargs,
        }
    )
