"""Your own backbone in your own module, named from a config as ``my_backbone:tiny_cnn`` (see docs/backbones.md).

    PYTHONPATH=examples python -m swinlab fit --config configs/classification/quickstart_fashion_mnist.yaml \\
        --model.init_args.backbone=my_backbone:tiny_cnn

``create_model("my_backbone:tiny_cnn", ...)`` imports this module, which registers ``tiny_cnn`` with the decorator.
The class implements the backbone contract every task reads: ``forward`` (classification), and with
``out_indices`` ``forward_features`` / ``feature_channels`` / ``feature_strides`` (detection, segmentation), plus
``lr_layer_id`` / ``num_lr_layers`` for layer-wise lr decay.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from swinlab.models import register_model

logger = logging.getLogger(__name__)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """A stride-2 stem and four stride-2 stages: maps at strides 4, 8, 16, 32 with ``width * 2^i`` channels."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width: int = 16, out_indices: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        channels = [width * 2**i for i in range(4)]
        self.stem = conv_bn_relu(in_chans, width, stride=2)
        self.stages = nn.ModuleList(
            conv_bn_relu(c_in, c_out, stride=2) for c_in, c_out in zip([width, *channels[:-1]], channels)
        )
        levels = self.out_indices if self.out_indices is not None else range(4)
        self.feature_channels = [channels[i] for i in levels]
        self.feature_strides = [4 * 2**i for i in levels]
        self.num_features = channels[-1]
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [(B, feature_channels[i], H / feature_strides[i], W / feature_strides[i])]."""
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return [maps[i] for i in (self.out_indices if self.out_indices is not None else range(4))]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C_in, H, W) -> (B, num_classes) logits, or the feature maps when ``out_indices`` is given."""
        if self.out_indices is not None:
            return self.forward_features(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))

    @property
    def num_lr_layers(self) -> int:
        return len(self.stages) + 1

    def lr_layer_id(self, name: str) -> int:
        """Stem = 0, stage i = i + 1, head = the top (full lr)."""
        if name.startswith("stem."):
            return 0
        if name.startswith("stages."):
            return int(name.split(".")[1]) + 1
        return self.num_lr_layers


@register_model
def tiny_cnn(
    num_classes: int = 10,
    in_chans: int = 3,
    width: int = 16,
    out_indices: Sequence[int] | None = None,
    **ignored: Any,
) -> TinyCNN:
    # Accepting the other keys lets a config written for Swin (patch_size, window_size, img_size ...) switch
    # to this backbone by its name alone; say which were ignored.
    if ignored:
        logger.warning("tiny_cnn ignores backbone_kwargs %s", ", ".join(sorted(ignored)))
    return TinyCNN(num_classes=num_classes, in_chans=in_chans, width=width, out_indices=out_indices)
