"""UperNet decode head and FCN auxiliary head (Xiao et al. 2018), as configured for Swin in mmsegmentation.

Pure PyTorch: the heads take the backbone's list of NCHW feature maps and return logits at the resolution of
the finest map (stride 4 for Swin); the task upsamples them to the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    # mmseg's ConvModule(conv, BN, ReLU); the conv has no bias because BN follows.
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    # mmseg's BaseDecodeHead init: small normal weights so the first logits are near uniform.
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def resize_logits(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), bilinear without corner alignment (mmseg's ``resize``)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def pooling_matrix(size: int, bins: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(bins, size) weights of adaptive average pooling along one axis: bin i averages
    [floor(i * size / bins), ceil((i + 1) * size / bins)), as ``nn.AdaptiveAvgPool2d``; from aranges, so that
    ``size`` may be symbolic."""
    i, j = torch.arange(bins, device=device)[:, None], torch.arange(size, device=device)[None, :]
    inside = (j >= i * size // bins) & (j < ((i + 1) * size + bins - 1) // bins)
    return inside.to(dtype) / inside.sum(1, keepdim=True).to(dtype)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, bins, bins), ``F.adaptive_avg_pool2d`` as two matmuls: torch.onnx exports the
    adaptive pool with the example's bin edges fixed, this for any H and W."""
    H, W = x.shape[-2:]
    return pooling_matrix(H, bins, x.device, x.dtype) @ x @ pooling_matrix(W, bins, x.device, x.dtype).T


class PyramidPoolingModule(nn.Module):
    """PSPNet pooling: average-pool to each ``scale x scale`` grid, 1x1 conv, upsample back and concatenate."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_bn_relu(in_channels, channels, 1)) for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_in + len(pool_scales) * channels, H, W)."""
        size = x.shape[-2:]
        if torch.compiler.is_exporting():
            pooled = [conv(adaptive_avg_pool(x, pool.output_size)) for pool, conv in self.stages]
        else:
            pooled = [stage(x) for stage in self.stages]
        return torch.cat([x] + [resize_logits(p, size) for p in pooled], dim=1)


class UperNetHead(nn.Module):
    """UperNet: pyramid pooling on the last map, FPN lateral + top-down path, fusion of all levels.

    Args:
        in_channels: channels of each input map, finest first (``backbone.feature_channels``).
        num_classes: output classes.
        channels: width of every internal conv (512 in the paper's setting).
        pool_scales: grid sizes of the pyramid pooling module.
        dropout: ``Dropout2d`` probability before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"UperNetHead needs at least 2 feature maps, got in_channels={list(in_channels)}")
        *lateral_channels, top_channels = in_channels
        self.ppm = PyramidPoolingModule(top_channels, channels, pool_scales)
        self.ppm_bottleneck = _conv_bn_relu(top_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in lateral_channels)
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in lateral_channels)
        self.fpn_bottleneck = _conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: maps (B, C_i, H_i, W_i), finest first -> logits (B, num_classes, H_0, W_0)."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.ppm_bottleneck(self.ppm(features[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add each coarser level to the next finer one
            laterals[i - 1] = laterals[i - 1] + resize_logits(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize_logits(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: ``num_convs`` 3x3 conv-BN-ReLU layers, dropout, 1x1 classifier (mmseg ``FCNHead``)."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead num_convs must be >= 1, got {num_convs}")
        self.convs = nn.Sequential(
            *(_conv_bn_relu(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> logits (B, num_classes, H, W)."""
        return self.classifier(self.dropout(self.convs(x)))
