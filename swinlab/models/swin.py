"""Swin Transformer (Liu et al. 2021, arXiv 2103.14030), faithful to the paper and the official code.

Tensors inside the network are channels-last, ``(B, H, W, C)``; stage outputs leave as NCHW. Every paper
ablation is a constructor argument: ``window_size``, ``shift``, ``position_bias``, ``patch_size``,
``embed_dim``, ``depths``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``drop_path_rate``.

Any input size works: each block pads its map to the window grid and the attention mask keeps the padding
out, so a real token only ever attends to real tokens of its own (shifted) window.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

PositionBias = Literal["relative", "absolute", "relative+absolute", "none"]
POSITION_BIAS_CHOICES: tuple[str, ...] = ("relative", "absolute", "relative+absolute", "none")
AttentionKernel = Literal["auto", "sdpa", "explicit"]
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "sdpa", "explicit")

# The official code fills masked attention logits with -100, not -inf: a row that is masked everywhere
# (possible in a window of padding) then stays finite instead of turning into NaN.
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window * window, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """(window^2, window^2) indices into a ((2 * table_window - 1)^2, heads) bias table.

    ``window`` may be smaller than the table's window (a window clipped to a small feature map): its
    offsets, at most ``window - 1``, all have entries in the larger table.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (table_window - 1)
    return relative[..., 0] * (2 * table_window - 1) + relative[..., 1]


class WindowLayout(NamedTuple):
    """How an H x W map is cut into (shifted) windows, precomputed once per (H, W, window, shift).

    ``gather`` (nW * N,): for each window slot, the row-major index of its source token on the map
    (padding slots point at token 0; the mask hides them). ``scatter`` (H * W,): the window slot of each
    token. ``mask`` (nW, N, N) additive, or None where no pair needs masking. One ``index_select`` each
    way replaces pad + roll + partition (and their reverses), which costs several copies.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    mask: torch.Tensor | None


def window_layout(H: int, W: int, window: int, shift: int, device: torch.device | None = None) -> WindowLayout:
    """Windows of an H x W map padded to the window grid and cyclically shifted by ``shift``, built on ``device``.

    Two kinds of pairs are masked: tokens from different regions of a shifted window (the paper's SW-MSA
    mask, regions as in the official code), and keys that are padding.
    """
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    source = torch.full((Hp, Wp), -1, dtype=torch.long, device=device)
    source[:H, :W] = torch.arange(H * W, device=device).view(H, W)
    region = torch.zeros(Hp, Wp, dtype=torch.long, device=device)
    if shift > 0:
        source = torch.roll(source, shifts=(-shift, -shift), dims=(0, 1))
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for label, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
            region[hs, ws] = label
    slots = window_partition(source[None, :, :, None], window).reshape(-1, window * window)  # (nW, N)
    regions = window_partition(region[None, :, :, None], window).reshape(-1, window * window)
    padding = slots < 0
    flat = slots.reshape(-1)
    # Padding slots write to a spare last entry, dropped after: no data-dependent shapes, so torch.compile
    # traces this without a graph break.
    scatter = torch.empty(H * W + 1, dtype=torch.long, device=device)
    slot = torch.arange(flat.numel(), device=device)
    scatter = scatter.scatter_(0, flat.masked_fill(padding.reshape(-1), H * W), slot)[: H * W]
    mask = None
    if shift > 0 or (Hp, Wp) != (H, W):
        masked = (regions[:, :, None] != regions[:, None, :]) | padding[:, None, :]
        mask = torch.zeros(masked.shape, device=device).masked_fill(masked, MASK_VALUE)
    return WindowLayout(flat.clamp(min=0), scatter, mask)


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
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def use_explicit_attention(attention: AttentionKernel, device_type: str, needs_grad: bool, compiling: bool) -> bool:
    """Whether :class:`WindowAttention` runs explicit matmul + softmax rather than SDPA (see its docstring)."""
    if attention != "auto":
        return attention == "explicit"
    if needs_grad:
        return device_type == "cpu"
    return device_type == "cuda" and compiling


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with an optional relative position bias.

    Input (B * nW, N, C) with N = window^2; ``mask`` (nW, N, N) additive or None. ``attention`` picks the
    kernel: ``"sdpa"`` sums bias and mask into one additive mask for ``scaled_dot_product_attention``;
    ``"explicit"`` is matmul + softmax with the (nW, heads, N, N) mask added by broadcasting. ``"auto"`` takes
    what measured faster (docs/benchmarks.md): explicit when training on CPU (SDPA falls back to its math kernel
    for a mask that needs a gradient, ~20% slower there) and in CUDA inference under ``torch.compile`` (inductor
    fuses bias, mask and softmax: 1.24x SDPA on an H200); SDPA otherwise (eager CUDA: 1.08-1.16x explicit in
    inference, 1.17-1.18x in bf16 training). Both compute the same function.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        relative_bias: bool = True,
        attention: AttentionKernel = "auto",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={attention!r}; choose one of {ATTENTION_CHOICES}")
        self.attention = attention
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if relative_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer(
                "relative_position_index", relative_position_index(window_size, window_size), persistent=False
            )
        else:
            self.relative_position_bias_table = None
        self._index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        # The last additive mask handed to SDPA, reused while the bias needs no gradient (inference): one entry,
        # so a changing batch size does not pile up masks.
        self._mask_cache: tuple[tuple, torch.Tensor | None] | None = None

    def relative_bias(self, window: int) -> torch.Tensor | None:
        """(heads, N, N) bias for an effective window (the table's own, or a smaller clipped one)."""
        if self.relative_position_bias_table is None:
            return None
        if window == self.window_size:
            index = self.relative_position_index
        else:
            key = (window, self.relative_position_bias_table.device)
            if key not in self._index_cache:
                with torch.inference_mode(False):  # reused by training steps, see SwinStage.layout
                    self._index_cache[key] = relative_position_index(window, self.window_size).to(key[1])
            index = self._index_cache[key]
        N = window * window
        return self.relative_position_bias_table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)

    def bias_and_mask(self, window: int, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Relative bias plus window mask, (nW, heads, N, N), or (1, heads, N, N) without a mask; None if neither."""
        bias = self.relative_bias(window)
        if mask is None:
            return None if bias is None else bias.to(dtype)[None]
        return (mask[:, None] if bias is None else bias[None] + mask[:, None]).to(dtype)

    def sdpa_mask(
        self, window: int, mask: torch.Tensor | None, batch: int, dtype: torch.dtype, cacheable: bool
    ) -> torch.Tensor | None:
        """The additive mask for SDPA on (B * nW, heads, N, N) logits: (B * nW, heads, N, N), (1, heads, N, N) or None.

        With a window mask it is repeated over the batch: SDPA's fused kernels broadcast a mask only over a
        batch dimension of size 1, and one copy of the mask measured faster on CPU than folding the windows into
        the head axis (which copies q, k and v). Cached when ``cacheable`` (nothing needs its gradient, not compiling).
        """
        table = self.relative_position_bias_table
        if cacheable:
            # A mask made under inference_mode cannot be used where autograd records (e.g. a frozen table in
            # training), so the mode is part of the key; the table's version changes when weights are loaded.
            key = (
                window,
                batch,
                dtype,
                torch.is_inference_mode_enabled(),
                None if mask is None else mask.data_ptr(),
                None if table is None else (table.data_ptr(), table._version),
            )
            if self._mask_cache is not None and self._mask_cache[0] == key:
                return self._mask_cache[1]
        attn_mask = self.bias_and_mask(window, mask, dtype)
        if attn_mask is not None:
            if attn_mask.shape[0] > 1:
                nW, heads, N = attn_mask.shape[:3]
                attn_mask = attn_mask.expand(batch, nW, heads, N, N).reshape(batch * nW, heads, N, N)
            # CUDA's fused kernels refuse a mask whose last dimension is strided, as the permuted bias view is (on
            # an H200 the unmasked blocks fell back to the slow math kernel); a no-op after the repeat above.
            attn_mask = attn_mask.contiguous()
        if cacheable:
            self._mask_cache = (key, attn_mask)
        return attn_mask

    def forward(self, x: torch.Tensor, window: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        BnW, N, C = x.shape
        heads, dropout = self.num_heads, self.attn_drop if self.training else 0.0
        qkv = self.qkv(x).view(BnW, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B * nW, heads, N, head_dim)
        table = self.relative_position_bias_table
        needs_grad = table is not None and table.requires_grad and torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()
        if not compiling and needs_grad and self._mask_cache is not None:
            self._mask_cache = None  # training: do not keep the last validation batch's mask in memory
        if use_explicit_attention(self.attention, x.device.type, needs_grad, compiling):
            bias = self.bias_and_mask(window, mask, q.dtype)
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if bias is not None:
                attn = (attn.view(-1, bias.shape[0], heads, N, N) + bias).view(BnW, heads, N, N)
            attn = attn.softmax(dim=-1)
            if dropout:
                attn = F.dropout(attn, dropout)
            x = attn @ v
        else:
            batch = BnW // (1 if mask is None else mask.shape[0])
            attn_mask = self.sdpa_mask(window, mask, batch, q.dtype, cacheable=not (compiling or needs_grad))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(BnW, N, C)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """Pre-norm block: (S)W-MSA then MLP, each with a residual and stochastic depth. (B, H, W, C) -> same.

    ``shift`` is True for the odd blocks of a stage (SW-MSA, cyclic shift by floor(M / 2)).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        relative_bias: bool = True,
        attention: AttentionKernel = "auto",
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop, relative_bias, attention)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, window: int, layout: WindowLayout) -> torch.Tensor:
        """``window`` and ``layout`` (padding, shift, mask) are this map's effective ones (see :class:`SwinStage`)."""
        B, H, W, C = x.shape
        windows = self.norm1(x).view(B, H * W, C).index_select(1, layout.gather).view(-1, window * window, C)
        attended = self.attn(windows, window, layout.mask).view(B, -1, C).index_select(1, layout.scatter)
        x = x + self.drop_path(attended.view(B, H, W, C))
        if x.device.type == "cpu" and not self.training and not torch.is_grad_enabled():
            return self.mlp_inplace_chunked(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def mlp_inplace_chunked(self, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(norm2(x))`` computed in place, a few thousand tokens at a time (inference on CPU only).

        The MLP is per token, so chunks give the same result. On CPU every tensor above glibc's mmap threshold
        (32 MiB, e.g. Swin-T's stage-1 hidden activations at batch 8) is freshly mapped and page-faulted in;
        ~4 MiB chunks stay in cache and reuse freed memory (Swin-T, batch 8: 1.01-1.07x, docs/benchmarks.md).
        """
        tokens = x.view(-1, x.shape[-1])
        for chunk in tokens.split(max(512, (1 << 20) // self.mlp.fc1.out_features)):
            chunk += self.mlp(self.norm2(chunk))
        return x


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), LayerNorm, Linear to 2C without bias. (B, H, W, C) -> (B, H/2, W/2, 2C).

    Odd sizes are zero-padded first. The concatenation order is the official one (x00, x10, x01, x11).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating W-MSA and SW-MSA. (B, H, W, C) -> (B, H', W', C').

    Window layouts (indices and masks) depend only on (map size, window, shift): built once per size, cached.
    The layouts of ``feature_size`` (the map size at the model's ``img_size``) are built at construction as
    non-persistent buffers, so they move with the module and a compiled graph reads them instead of
    rebuilding them every step.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        shift: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        relative_bias: bool = True,
        clip_window_to_feature: bool = False,
        name: str = "stage",
        attention: AttentionKernel = "auto",
        feature_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        in_dim = dim // 2 if downsample else dim
        self.downsample = PatchMerging(in_dim) if downsample else nn.Identity()
        self.window_size = window_size
        self.clip_window_to_feature = clip_window_to_feature
        self.name = name
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift=shift and j % 2 == 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[j] if drop_path else 0.0,
                relative_bias=relative_bias,
                attention=attention,
            )
            for j in range(depth)
        )
        self._layouts: dict[tuple, WindowLayout] = {}
        self._warned_sizes: set[tuple[int, int]] = set()
        self.feature_size = feature_size
        if feature_size is not None:
            window, shift = self.effective_window(*feature_size, log=False)
            kinds = {"plain": 0, "shifted": shift} if shift else {"plain": 0}
            for kind, kind_shift in kinds.items():
                layout = window_layout(*feature_size, window, kind_shift)
                for field, tensor in layout._asdict().items():
                    self.register_buffer(f"{kind}_{field}", tensor, persistent=False)

    def effective_window(self, H: int, W: int, log: bool = True) -> tuple[int, int]:
        """(window, shift) for an H x W map; shift is the one of shifted blocks."""
        window, shift = self.window_size, self.window_size // 2
        if min(H, W) <= window:
            if self.clip_window_to_feature:
                return min(H, W), 0
            if log and (H, W) not in self._warned_sizes and not torch.compiler.is_compiling():
                self._warned_sizes.add((H, W))
                logger.info(
                    "%s: feature map %dx%d is no larger than window %d; the shifted blocks still shift by %d "
                    "(the official code shrinks the window and drops the shift here: "
                    "pass clip_window_to_feature=True to match it)",
                    self.name,
                    H,
                    W,
                    window,
                    shift,
                )
        return window, shift

    def layout(self, H: int, W: int, window: int, shift: int, device: torch.device) -> WindowLayout:
        if self.feature_size == (H, W):
            kind = "shifted" if shift else "plain"
            return WindowLayout(*(getattr(self, f"{kind}_{field}") for field in WindowLayout._fields))
        if torch.compiler.is_compiling():
            return window_layout(H, W, window, shift, device)
        key = (H, W, window, shift, device)
        if key not in self._layouts:
            # Normal tensors even when the first call runs under inference_mode (e.g. Lightning's sanity check):
            # inference tensors could not be saved for backward by the training steps that reuse them.
            with torch.inference_mode(False):
                self._layouts[key] = window_layout(H, W, window, shift, device)
        return self._layouts[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        H, W = x.shape[1:3]
        window, shift = self.effective_window(H, W)
        plain = self.layout(H, W, window, 0, x.device)
        shifted = self.layout(H, W, window, shift, x.device) if shift else plain
        for block in self.blocks:
            layout = shifted if block.shift_size else plain
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
    ``attention`` picks the window-attention kernel (see :class:`WindowAttention`); ``img_size`` is the size
    whose window layouts are prebuilt (any other size works and gets its layouts on first use).
    """

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
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        clip_window_to_feature: bool = False,
        out_indices: Sequence[int] | None = None,
        grad_checkpointing: bool | Sequence[bool] = False,
        attention: AttentionKernel = "auto",
    ) -> None:
        super().__init__()
        validate_config(embed_dim, depths, num_heads, window_size, position_bias, patch_size, out_indices)
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.depths = tuple(depths)
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.out_indices = tuple(out_indices) if out_indices is not None else None

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if position_bias in ("absolute", "relative+absolute"):
            grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        drop_path = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # rises linearly over all blocks
        self.layers = nn.ModuleList()
        feature_size = (-(-self.img_size[0] // patch_size), -(-self.img_size[1] // patch_size))
        for i, depth in enumerate(depths):
            if i > 0:  # patch merging pads odd sizes
                feature_size = (-(-feature_size[0] // 2), -(-feature_size[1] // 2))
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    embed_dim * 2**i,
                    depth,
                    num_heads[i],
                    window_size,
                    downsample=i > 0,
                    shift=shift,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path[start : start + depth],
                    relative_bias=position_bias in ("relative", "relative+absolute"),
                    clip_window_to_feature=clip_window_to_feature,
                    name=f"stage {i}",
                    attention=attention,
                    feature_size=feature_size,
                )
            )
        if self.out_indices is None:
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        else:
            for i in self.out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))
        self.set_grad_checkpointing(grad_checkpointing)
        self.apply(_init_weights)

    @property
    def feature_channels(self) -> list[int]:
        return [self.embed_dim * 2**i for i in self._feature_indices()]

    @property
    def feature_strides(self) -> list[int]:
        return [self.patch_size * 2**i for i in self._feature_indices()]

    def _feature_indices(self) -> tuple[int, ...]:
        return self.out_indices if self.out_indices is not None else tuple(range(self.num_layers))

    def set_grad_checkpointing(self, enable: bool | Sequence[bool] = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~30% more compute).

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
            return first + int(parts[3]) if parts[2] == "blocks" else first
        return self.num_lr_layers

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H / p, W / p, C), with the absolute position embedding if any."""
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed
            if pos.shape[1:3] != x.shape[1:3]:
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
    window_size: int,
    position_bias: str,
    patch_size: int,
    out_indices: Sequence[int] | None,
) -> None:
    """Raise a ValueError that names the argument and the fix for a configuration that cannot work."""
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
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if position_bias not in POSITION_BIAS_CHOICES:
        raise ValueError(f"position_bias={position_bias!r} is not one of {POSITION_BIAS_CHOICES}")
    if out_indices is not None and (not out_indices or any(not 0 <= i < len(depths) for i in out_indices)):
        raise ValueError(f"out_indices={tuple(out_indices)} must name stages in 0..{len(depths) - 1}")


def swin_t(**kwargs) -> SwinTransformer:
    """Swin-T: C=96, depths 2-2-6-2, heads 3-6-12-24 (28.3M params, 4.5 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.2, **kwargs}
    )


def swin_s(**kwargs) -> SwinTransformer:
    """Swin-S: C=96, depths 2-2-18-2, heads 3-6-12-24 (49.6M params, 8.7 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.3, **kwargs}
    )


def swin_b(**kwargs) -> SwinTransformer:
    """Swin-B: C=128, depths 2-2-18-2, heads 4-8-16-32 (87.8M params, 15.4 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "drop_path_rate": 0.5, **kwargs}
    )


def swin_l(**kwargs) -> SwinTransformer:
    """Swin-L: C=192, depths 2-2-18-2, heads 6-12-24-48 (196.5M params, 34.5 GMACs at 224)."""
    return SwinTransformer(
        **{"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "drop_path_rate": 0.2, **kwargs}
    )
