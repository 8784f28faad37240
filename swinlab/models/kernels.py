"""How the model's math is executed: the window-attention kernel policy.

None of this changes what the model computes (tests/models/test_compile.py checks both kernels against each
other and against timm); each choice was measured, see docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionKernel = Literal["auto", "sdpa", "explicit"]


def use_explicit_attention(attention: AttentionKernel, device_type: str, needs_grad: bool, compiling: bool) -> bool:
    """Whether window attention runs explicit matmul + softmax rather than SDPA.

    ``"auto"`` takes what measured faster (docs/benchmarks.md): explicit when the bias needs a gradient on CPU
    (SDPA falls back to its math kernel there) and in CUDA inference under ``torch.compile``; SDPA otherwise.
    """
    if attention != "auto":
        return attention == "explicit"
    if needs_grad:
        return device_type == "cpu"
    return device_type == "cuda" and compiling


class WindowAttentionKernel(nn.Module):
    """``softmax(scale * q k^T + bias + mask) v`` over windows, by SDPA or by explicit matmul + softmax.

    q, k, v: (B * nW, heads, N, head_dim); ``bias(window)`` gives the (heads, N, N) position bias or None;
    ``mask`` (nW, N, N) additive or None. ``"sdpa"`` sums bias and mask into one additive mask; ``"explicit"``
    adds the (nW, heads, N, N) sum by broadcasting; ``"auto"`` picks per call (:func:`use_explicit_attention`).
    ``attention`` is checked by :class:`~swinlab.models.swin.SwinOptions`.
    """

    def __init__(self, attention: AttentionKernel = "auto") -> None:
        super().__init__()
        self.attention = attention

    @staticmethod
    def bias_and_mask(bias: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Bias plus window mask, (nW, heads, N, N), or (1, heads, N, N) without a mask; None if neither."""
        if mask is None:
            return None if bias is None else bias.to(dtype)[None]
        return (mask[:, None] if bias is None else bias[None] + mask[:, None]).to(dtype)

    def sdpa_mask(
        self,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        batch: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """The additive mask for SDPA on (B * nW, heads, N, N) logits: (B * nW, heads, N, N), (1, heads, N, N) or None.

        With a window mask it is repeated over the batch: SDPA's fused kernels broadcast a mask only over a
        batch dimension of size 1, and one copy of the mask measured faster on CPU than folding the windows into
        the head axis (which copies q, k and v).
        """
        attn_mask = self.bias_and_mask(bias, mask, dtype)
        if attn_mask is not None:
            if attn_mask.shape[0] > 1:
                nW, heads, N = attn_mask.shape[:3]
                attn_mask = attn_mask.expand(batch, nW, heads, N, N).reshape(batch * nW, heads, N, N)
            # CUDA's fused kernels refuse a mask whose last dimension is strided, as a permuted bias view is;
            # a no-op after the repeat above.
            attn_mask = attn_mask.contiguous()
        return attn_mask

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        mask: torch.Tensor | None,
        bias: Callable[[int], torch.Tensor | None],
        bias_weights: Sequence[torch.Tensor],
        scale: float | None = None,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """(B * nW, heads, N, head_dim) -> same. ``bias_weights`` are the parameters ``bias`` is computed from
        (they decide whether the bias needs a gradient); ``scale`` defaults to ``head_dim ** -0.5``."""
        BnW, heads, N = q.shape[:3]
        needs_grad = torch.is_grad_enabled() and any(w.requires_grad for w in bias_weights)
        compiling = torch.compiler.is_compiling()
        # Exported graphs (ONNX) take the explicit path whatever ``attention`` says: SDPA's mask, repeated over the
        # batch, would fix the batch size in the graph, and the runtimes fuse matmul + softmax themselves.
        exporting = torch.compiler.is_exporting()
        if exporting or use_explicit_attention(self.attention, q.device.type, needs_grad, compiling):
            attn_bias = self.bias_and_mask(bias(window), mask, q.dtype)
            attn = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
            if attn_bias is not None:
                attn = (attn.view(-1, attn_bias.shape[0], heads, N, N) + attn_bias).view(BnW, heads, N, N)
            attn = attn.softmax(dim=-1)
            if dropout:
                attn = F.dropout(attn, dropout)
            return attn @ v
        batch = BnW // (1 if mask is None else mask.shape[0])
        attn_mask = self.sdpa_mask(bias(window), mask, batch, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
