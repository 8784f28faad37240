"""The detection neck: Swin stage maps through torchvision's feature pyramid network."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class SwinFPN(nn.Module):
    """Swin stage maps through an FPN: images (B, 3, H, W) -> OrderedDict of ``out_channels`` maps at strides
    4, 8, 16, 32 (keys ``"0"``..``"3"``) plus a max-pooled stride-64 level ``"pool"``."""

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        if len(getattr(body, "feature_channels", ())) != 4:
            raise ValueError(
                "the detection backbone must give the four Swin stage maps: create it with "
                "out_indices=(0, 1, 2, 3) and num_classes=0"
            )
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.feature_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_features(images)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
