"""Window layouts: where each token of a (padded, shifted) map goes in the window grid, and which pairs are masked.

:class:`~swinlab.models.swin.SwinStage` asks :class:`WindowLayouts` for the layout of its map; the blocks only
gather, attend and scatter. Layouts depend on (map size, window, shift) and the model's ``padding`` alone: those of
the model's ``img_size`` are buffers built at construction, any other size's are built in the forward pass.

Under ``torch.export`` (ONNX) the map size is symbolic, so index tables cannot be built in Python:
:class:`SymbolicLayout` cuts the windows with pad / roll / reshape / transpose and builds the SW-MSA mask from
tensor positions, computing the same function as :class:`WindowLayout`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

# The official code fills masked attention logits with -100, not -inf: a row that is masked everywhere
# (possible in a window of padding) then stays finite instead of turning into NaN.
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window * window, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    # An explicit copy: reshape's choice between a view and a copy would test symbolic sizes (torch.export).
    return x.clone(memory_format=torch.contiguous_format).view(-1, window * window, C)


def relative_offsets(window: int) -> torch.Tensor:
    """(window^2, window^2, 2) offsets (dy, dx) from key to query token of a window, each in [-(window-1), window-1]."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    return (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)


def relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """(window^2, window^2) indices into a ((2 * table_window - 1)^2, heads) bias table.

    ``window`` may be smaller than the table's window (a window clipped to a small feature map): its
    offsets, at most ``window - 1``, all have entries in the larger table.
    """
    relative = relative_offsets(window) + (table_window - 1)
    return relative[..., 0] * (2 * table_window - 1) + relative[..., 1]


Padding = Literal["official", "timm", "mask"]


class WindowLayout(NamedTuple):
    """How an H x W map is cut into (shifted) windows, precomputed once per (H, W, window, shift, padding).

    ``gather`` (nW * N,): for each window slot, the row-major index of its source token on the map; padding slots
    read row H * W, a zero token appended to the map when ``pads_with_zeros`` (else token 0, which the mask
    hides). ``scatter`` (H * W,): the window slot of each token. ``mask`` (nW, N, N) additive, or None where no
    pair needs masking. One ``index_select`` each way replaces pad + roll + partition (and their reverses), which
    costs several copies.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    mask: torch.Tensor | None
    pads_with_zeros: bool = False

    def partition(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """(B, H, W, C) map -> (B * nW, window^2, C) windows."""
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        if self.pads_with_zeros:  # padding slots read this appended zero token
            tokens = F.pad(tokens, (0, 0, 0, 1))
        return tokens.index_select(1, self.gather).view(-1, window * window, C)

    def merge(self, windows: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """(B * nW, window^2, C) windows -> (B, H, W, C) map (padding dropped, shift undone)."""
        C = windows.shape[-1]
        return windows.view(B, -1, C).index_select(1, self.scatter).view(B, H, W, C)


def window_layout(
    H: int,
    W: int,
    window: int,
    shift: int,
    device: torch.device | None = None,
    padding: Padding = "mask",
) -> WindowLayout:
    """Windows of an H x W map padded to the window grid and cyclically shifted by ``shift``, built on ``device``.

    Pairs of tokens from different regions of a shifted window are masked (the paper's SW-MSA mask, regions as
    in the official code, labelled on the padded grid). Padding, where the map is no multiple of the window:

    - ``"official"``: pad, then shift; real tokens attend to the zero padding tokens (the official detection and
      segmentation backbone, Swin-Transformer-Object-Detection ``SwinTransformerBlock``).
    - ``"timm"``: shift the unpadded map, then pad; zero padding tokens attended (timm's ``SwinTransformerBlock``).
    - ``"mask"``: pad, then shift, and keys that are padding are masked: a real token attends to real tokens only.
    """
    if padding not in get_args(Padding):
        raise ValueError(f"padding={padding!r} is not one of {get_args(Padding)}")
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    source = torch.arange(H * W, device=device).view(H, W)
    if shift > 0 and padding == "timm":
        source = torch.roll(source, shifts=(-shift, -shift), dims=(0, 1))
    source = F.pad(source, (0, Wp - W, 0, Hp - H), value=-1)
    region = torch.zeros(Hp, Wp, dtype=torch.long, device=device)
    if shift > 0:
        if padding != "timm":
            source = torch.roll(source, shifts=(-shift, -shift), dims=(0, 1))
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for label, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
            region[hs, ws] = label
    slots = window_partition(source[None, :, :, None], window).reshape(-1, window * window)  # (nW, N)
    regions = window_partition(region[None, :, :, None], window).reshape(-1, window * window)
    is_padding = slots < 0
    flat = slots.reshape(-1)
    # Padding slots write to a spare last entry, dropped after: no data-dependent shapes, so torch.compile
    # traces this without a graph break.
    scatter = torch.empty(H * W + 1, dtype=torch.long, device=device)
    slot = torch.arange(flat.numel(), device=device)
    scatter = scatter.scatter_(0, flat.masked_fill(is_padding.reshape(-1), H * W), slot)[: H * W]
    mask_padding = padding == "mask" and (Hp, Wp) != (H, W)
    mask = None
    if shift > 0 or mask_padding:
        masked = regions[:, :, None] != regions[:, None, :]
        if mask_padding:
            masked = masked | is_padding[:, None, :]
        mask = torch.zeros(masked.shape, device=device).masked_fill(masked, MASK_VALUE)
    pads_with_zeros = padding != "mask" and (Hp, Wp) != (H, W)
    gather = flat.masked_fill(is_padding.reshape(-1), H * W if pads_with_zeros else 0)
    return WindowLayout(gather, scatter, mask, pads_with_zeros)


class WindowLayouts(nn.Module):
    """The window layouts of one stage: those of ``feature_size`` prebuilt, any other map size's built on call.

    ``padding`` is how maps that are no multiple of the window are padded (:func:`window_layout`). The layouts
    of ``feature_size`` (the map size at the model's ``img_size``, with its effective ``window`` and ``shift``)
    are built at construction as non-persistent buffers ``plain_*`` and ``shifted_*``: they move with the module
    and a compiled graph reads them instead of rebuilding them every step. Another size's layout is built in the
    forward pass (well under 1% of a forward, docs/benchmarks.md), so no state changes after construction.
    """

    def __init__(self, feature_size: tuple[int, int], window: int, shift: int, padding: Padding = "mask") -> None:
        super().__init__()
        self.feature_size = feature_size
        self.padding = padding
        self.prebuilt_pads_with_zeros: dict[str, bool] = {}
        kinds = {"plain": 0, "shifted": shift} if shift else {"plain": 0}
        for kind, kind_shift in kinds.items():
            layout = window_layout(*feature_size, window, kind_shift, padding=padding)
            for field in ("gather", "scatter", "mask"):
                self.register_buffer(f"{kind}_{field}", getattr(layout, field), persistent=False)
            self.prebuilt_pads_with_zeros[kind] = layout.pads_with_zeros

    def get(self, H: int, W: int, window: int, shift: int, device: torch.device) -> WindowLayout:
        """The layout of an H x W map cut into ``window`` windows shifted by ``shift``."""
        if self.feature_size == (H, W):
            kind = "shifted" if shift else "plain"
            tensors = (getattr(self, f"{kind}_{field}") for field in ("gather", "scatter", "mask"))
            return WindowLayout(*tensors, self.prebuilt_pads_with_zeros[kind])
        return window_layout(H, W, window, shift, device, self.padding)


def ceil_to(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``; a plain formula, so it also holds for symbolic sizes."""
    return (size + multiple - 1) // multiple * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int, dims: Sequence[int]) -> torch.Tensor:
    """``x`` zero-padded at the end of each of ``dims`` to a multiple of
    ``multiple``. Eager skips the copy where nothing is padded; under ``torch.export`` the pad is always emitted
    (a no-op for multiples), since a Python test of a symbolic size would fix it in the graph."""
    dims = [dim - x.ndim if dim >= 0 else dim for dim in dims]
    pad = [0] * (2 * -min(dims))
    for dim in dims:
        size = x.shape[dim]
        pad[2 * (-dim - 1) + 1] = ceil_to(size, multiple) - size
    if not torch.compiler.is_exporting() and not any(pad):
        return x
    return F.pad(x, pad)


def _roll(x: torch.Tensor, shift: int, active: bool | torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) rolled by ``shift`` on H and W where ``active`` (a bool, or a 0-dim bool tensor)."""
    if not shift or active is False:
        return x
    rolled = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return rolled if active is True else torch.where(active, rolled, x)


def _crop(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The top-left H x W of a (B, Hp, Wp, C) map. By index_select, not slicing: torch.export cannot prove
    H <= Hp for symbolic sizes, which a slice's bounds check would need."""
    if not torch.compiler.is_exporting():
        return x[:, :H, :W]
    return x.index_select(1, torch.arange(H, device=x.device)).index_select(2, torch.arange(W, device=x.device))


def shift_is_active(H: int, W: int, window: int, clip: bool, device: torch.device | None = None) -> bool | torch.Tensor:
    """Whether the shifted blocks of an H x W map shift (the small-map rule of ``small_map_window``, for maps no
    smaller than the window): a bool where the sizes decide it, else a 0-dim bool tensor computed in the graph,
    so that one exported graph shifts on larger maps and not on a map exactly one window wide."""
    if not clip:
        return True
    larger = torch.sym_min(H, W) > window
    if statically_known_true(larger):
        return True
    if statically_known_true(torch.sym_not(larger)):
        return False
    # Lengths of aranges carry the symbolic sizes into tensors without a guard on them.
    return (torch.arange(H, device=device) >= window).any() & (torch.arange(W, device=device) >= window).any()


class SymbolicLayout(NamedTuple):
    """The windows of a map cut by tensor operations on its size, which may be symbolic (``torch.export``): the
    same function as :class:`WindowLayout` with pad, roll and reshape/transpose instead of index tables.

    ``shift`` is the cyclic shift of a shifted block (0: W-MSA), applied where ``active`` (bool or 0-dim bool
    tensor, :func:`shift_is_active`); ``mask`` (nW, N, N) additive or None, from :func:`symbolic_mask`.
    """

    window: int
    shift: int
    active: bool | torch.Tensor
    padding: Padding
    mask: torch.Tensor | None

    def partition(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """(B, H, W, C) map -> (B * nW, window^2, C) windows (``window`` is ``self.window``)."""
        if self.padding == "timm":  # shift the unpadded map, then pad
            x = pad_to_multiple(_roll(x, -self.shift, self.active), window, (1, 2))
        else:
            x = _roll(pad_to_multiple(x, window, (1, 2)), -self.shift, self.active)
        return window_partition(x, window)

    def merge(self, windows: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """(B * nW, window^2, C) windows -> (B, H, W, C) map (padding dropped, shift undone)."""
        M, C = self.window, windows.shape[-1]
        nH, nW = (H + M - 1) // M, (W + M - 1) // M
        x = windows.view(B, nH, nW, M, M, C).permute(0, 1, 3, 2, 4, 5)
        # An explicit copy, as in window_partition.
        x = x.clone(memory_format=torch.contiguous_format).view(B, nH * M, nW * M, C)
        if self.padding == "timm":
            return _roll(_crop(x, H, W), self.shift, self.active)
        return _crop(_roll(x, self.shift, self.active), H, W)


def symbolic_mask(
    H: int, W: int, window: int, shift: int, active: bool | torch.Tensor, padding: Padding, device: torch.device
) -> torch.Tensor | None:
    """The additive (nW, N, N) mask of :func:`window_layout`, from the positions of the window slots on the padded
    grid (arithmetic on aranges, no map is partitioned): region ids per axis ``(pos >= Hp - window) + (pos >= Hp -
    shift)`` (the official slices), all equal where the shift is not ``active``; with ``padding="mask"`` also the
    keys that are padding. None where nothing can be masked."""
    M = window
    shifted = bool(shift) and active is not False

    def axis(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(region id, is padding) of each slot, (windows along the axis, M), on an axis of ``size`` tokens."""
        padded = ceil_to(size, M)
        pos = torch.arange((size + M - 1) // M, device=device)[:, None] * M + torch.arange(M, device=device)
        if not shifted:
            return pos * 0, pos >= size
        region = (pos >= padded - M).long() + (pos >= padded - shift).long()
        if active is not True:  # one region, and no roll, where the shift is off
            region = region * active
        rolled = pos + shift * active  # < 2 * padded: wrap by a subtraction (ONNX has no remainder by a symbol)
        return region, rolled - (rolled >= padded).long() * padded >= size

    (region_h, pad_h), (region_w, pad_w) = axis(H), axis(W)
    nH, nW = region_h.shape[0], region_w.shape[0]
    masked = None
    if shifted:
        regions = (region_h[:, None, :, None] * 3 + region_w[None, :, None, :]).reshape(nH * nW, M * M)
        masked = regions[:, :, None] != regions[:, None, :]
    padded = not (statically_known_true(ceil_to(H, M) == H) and statically_known_true(ceil_to(W, M) == W))
    if padding == "mask" and padded:
        keys = (pad_h[:, None, :, None] | pad_w[None, :, None, :]).reshape(nH * nW, 1, M * M)
        masked = keys.expand(nH * nW, M * M, M * M) if masked is None else masked | keys
    if masked is None:
        return None
    return torch.zeros(masked.shape, device=device).masked_fill(masked, MASK_VALUE)


def symbolic_layout(
    H: int, W: int, window: int, shift: int, clip: bool, padding: Padding, device: torch.device | None = None
) -> SymbolicLayout:
    """The :class:`SymbolicLayout` of an H x W map (no smaller than ``window``) for blocks shifted by ``shift``."""
    active = shift_is_active(H, W, window, clip, device) if shift else False
    return SymbolicLayout(window, shift, active, padding, symbolic_mask(H, W, window, shift, active, padding, device))


def log_spaced_offsets(window: int, pretrained_window: int = 0) -> torch.Tensor:
    """((2 * window - 1)^2, 2) Swin V2 log-spaced coordinates of every offset (dy, dx) of a window, in the order of
    :func:`relative_position_index` (with ``table_window=window``).

    Offsets are divided by ``pretrained_window - 1`` (by ``window - 1`` when 0), scaled to [-8, 8] and mapped by
    sign(x) * log2(1 + |x|) / log2(8), so a window larger than the pre-training one extrapolates gently.
    """
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).reshape(-1, 2)
    table = table / max((pretrained_window or window) - 1, 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
