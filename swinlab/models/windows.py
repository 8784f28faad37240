"""Window layouts: where each token of a (padded, shifted) map goes in the window grid, and which pairs are masked.

:class:`~swinlab.models.swin.SwinStage` asks :class:`WindowLayouts` for the layout of its map; the blocks only
gather, attend and scatter. Layouts depend on (map size, window, shift) and the model's ``padding`` alone: those of
the model's ``img_size`` are buffers built at construction, any other size's are built in the forward pass.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

# The official code fills masked attention logits with -100, not -inf: a row that is masked everywhere
# (possible in a window of padding) then stays finite instead of turning into NaN.
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window * window, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


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
