"""One entry point for the detection frameworks on a Swin + FPN body: ``build_detector(framework, backbone, ...)``.

Every detector is called like torchvision's: ``model(images, targets)`` in training returns a dict of losses,
``model(images)`` in evaluation a list of dicts ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) and, for the
mask frameworks, ``masks`` (N, 1, H, W) probabilities. Images are a list of (3, H, W) floats in [0, 1]; the
detector normalises, resizes (``min_size`` / ``max_size``) and pads them itself. Labels follow torchvision's
two-stage convention for every framework: objects are ``1 .. num_classes`` and 0 is the background (the one-stage
detectors shift them internally), so a task can treat all frameworks alike.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from swinlab.models.cascade_rcnn import CascadeRCNN

Framework = Literal["mask_rcnn", "faster_rcnn", "cascade_mask_rcnn", "cascade_rcnn", "retinanet", "fcos"]
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# RoIs are pooled from the levels up to stride 32 (mmdetection's featmap_strides [4, 8, 16, 32]).
MAX_ROI_STRIDE = 32
# Keyword arguments torchvision's detectors pass on to GeneralizedRCNNTransform.
TRANSFORM_OPTIONS = ("size_divisible", "fixed_size", "_skip_resize")


def feature_strides(backbone: nn.Module, probe_size: int = 256) -> dict[str, int]:
    """Stride of every map ``backbone`` returns (name -> stride), measured on one (1, 3, probe, probe) zero image."""
    reference = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            maps = backbone(torch.zeros(1, 3, probe_size, probe_size, device=reference.device, dtype=reference.dtype))
    finally:
        backbone.train(was_training)
    if not isinstance(maps, dict):
        raise TypeError(f"the detection backbone must return an OrderedDict of FPN maps, got {type(maps).__name__}")
    return {name: probe_size // m.shape[-1] for name, m in maps.items()}


class _OneBasedLabels:
    """torchvision's one-stage detectors count classes from 0; shift so they take and give labels 1 .. C."""

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if targets is not None:
            for target in targets:
                if target["labels"].numel() and int(target["labels"].min()) < 1:
                    raise ValueError(
                        f"{type(self).__name__} labels count from 1 (0 is the background, as for the R-CNNs); "
                        f"got {target['labels'].tolist()}"
                    )
            targets = [{**target, "labels": target["labels"] - 1} for target in targets]
        outputs = super().forward(images, targets)
        if self.training:
            return outputs
        return [{**detection, "labels": detection["labels"] + 1} for detection in outputs]


class OneBasedRetinaNet(_OneBasedLabels, RetinaNet):
    """torchvision ``RetinaNet`` taking and giving labels ``1 .. num_classes``."""


class OneBasedFCOS(_OneBasedLabels, FCOS):
    """torchvision ``FCOS`` taking and giving labels ``1 .. num_classes``."""


def _check_options(framework: str, constructor: Callable, options: dict[str, Any], extra: Sequence[str] = ()) -> None:
    """torchvision forwards unknown keywords to its transform, which ignores them: name any typo here."""
    parameters = inspect.signature(constructor).parameters.values()
    accepted = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}
    accepted |= {*TRANSFORM_OPTIONS, *extra}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"build_detector({framework!r}): unknown options {unknown}; accepted: {', '.join(sorted(accepted))}"
        )


def _rpn_anchors(strides: Sequence[int]) -> AnchorGenerator:
    """One anchor size per level, 8 x stride, three aspect ratios (mmdetection's RPN: scales [8])."""
    return AnchorGenerator(tuple((8 * s,) for s in strides), (ASPECT_RATIOS,) * len(strides))


def _retinanet_anchors(strides: Sequence[int]) -> AnchorGenerator:
    """Three octave scales of 4 x stride per level, three aspect ratios (RetinaNet's octave_base_scale 4)."""
    sizes = tuple(tuple(round(4 * s * 2 ** (i / 3)) for i in range(3)) for s in strides)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(strides))


def _fcos_anchors(strides: Sequence[int]) -> AnchorGenerator:
    """One square anchor per location with the level's stride as size: torchvision's FCOS derives each level's
    regression range (4 to 8 x the size) from it."""
    return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))


def build_detector(
    framework: Framework,
    backbone: nn.Module,
    num_classes: int,
    *,
    strides: Mapping[str, int] | None = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    **options: Any,
) -> nn.Module:
    """A torchvision-style detector on ``backbone`` (images (B, 3, H, W) -> OrderedDict of FPN maps, attribute
    ``out_channels``), e.g. ``SwinFPN``.

    ``num_classes`` counts object classes without the background. ``strides`` maps each backbone level to its
    stride, e.g. ``{"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}`` for ``SwinFPN`` (measured with a small probe
    forward when None). RoIs are pooled from the levels up to stride 32; anchors are sized for exactly the levels
    the backbone gives: RPN 8 x stride, RetinaNet 4 x stride at three octave scales, FCOS the stride. ``min_size``
    (a sequence: one drawn per training batch; the last is the test size) and ``max_size`` set the detector's own
    resize.
    ``options`` go to the framework's constructor (torchvision's ``MaskRCNN`` / ``FasterRCNN`` / ``RetinaNet`` /
    ``FCOS`` or ``CascadeRCNN``), plus ``box_head_dim`` / ``mask_head_channels`` for Mask / Faster R-CNN and the
    transform's ``size_divisible`` / ``_skip_resize`` (resize done by the data pipeline in training).
    """
    if framework not in get_args(Framework):
        raise ValueError(f"unknown detection framework {framework!r}; choose one of {', '.join(get_args(Framework))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object classes, without background), got {num_classes}")
    if strides is None:
        strides = feature_strides(backbone)
    elif not strides or any(s < 1 or math.log2(s) % 1 for s in strides.values()):
        raise ValueError(f"strides must map each backbone level to its stride (a power of two), got {dict(strides)}")
    stride_list = list(strides.values())
    roi_names = [name for name, stride in strides.items() if stride <= MAX_ROI_STRIDE]
    common = dict(min_size=min_size, max_size=max_size, image_mean=image_mean, image_std=image_std)

    if framework in ("retinanet", "fcos"):
        detector_class = OneBasedRetinaNet if framework == "retinanet" else OneBasedFCOS
        _check_options(framework, detector_class.__init__, options)
        anchors = _retinanet_anchors(stride_list) if framework == "retinanet" else _fcos_anchors(stride_list)
        return detector_class(backbone, num_classes, anchor_generator=anchors, **{**common, **options})

    if framework in ("cascade_mask_rcnn", "cascade_rcnn"):
        _check_options(framework, CascadeRCNN.__init__, options)
        cascade = dict(rpn_anchor_generator=_rpn_anchors(stride_list), roi_featmap_names=roi_names, **common)
        return CascadeRCNN(backbone, num_classes, masks=framework == "cascade_mask_rcnn", **{**cascade, **options})

    masks = framework == "mask_rcnn"
    detector_class = MaskRCNN if masks else FasterRCNN
    _check_options(framework, detector_class.__init__, options, extra=("box_head_dim", "mask_head_channels"))
    box_head_dim = options.pop("box_head_dim", 1024)
    mask_head_channels = options.pop("mask_head_channels", 256)
    channels = backbone.out_channels
    kwargs: dict[str, Any] = dict(
        rpn_anchor_generator=_rpn_anchors(stride_list),
        box_roi_pool=MultiScaleRoIAlign(roi_names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        **common,
    )
    if masks:
        kwargs |= dict(
            mask_roi_pool=MultiScaleRoIAlign(roi_names, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(channels, [mask_head_channels] * 4, 1),
            mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
        )
    return detector_class(backbone, None, **{**kwargs, **options})
