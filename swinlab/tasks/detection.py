"""Object detection and instance segmentation: torchvision Mask R-CNN (or Faster R-CNN) + FPN on Swin."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from swinlab.prediction import DetectionPredictionWriter
from swinlab.tasks.base import SwinTask

# The paper's multi-scale training: short side 480..800 in steps of 32 (the last one is also the test size).
COCO_TRAIN_SIZES = tuple(range(480, 801, 32))
METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
MASK_THRESHOLD = 0.5


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


class DetectionTask(SwinTask):
    """Mask R-CNN (``masks=True``) or Faster R-CNN on Swin + FPN, with COCO box and mask AP on validation and test.

    Targets come from ``swinlab.data.COCODataModule`` with contiguous labels ``0 .. num_classes - 1``; the
    torchvision detector counts the background as class 0, so labels are shifted by one on the way in and out.
    Metrics: ``{val,test}/{box,mask}_{map,map_50,map_75,map_small,map_medium,map_large}`` over the whole split.

    Args:
        num_classes: object classes, without the background (linked from the data module by the CLI).
        backbone: registered model name (``swin_t``, ``swin_s``, ``swin_b``, ``swin_l``).
        backbone_kwargs: constructor overrides (``drop_path_rate``, ...); ``out_indices`` defaults to all 4 stages.
        pretrained: official, timm or swinlab classification checkpoint for the backbone.
        masks: Mask R-CNN (instance masks and mask AP) if true, Faster R-CNN (boxes only) if false.
        fpn_channels: width of the FPN levels and of the RoI heads' input.
        min_size: the short side; a list gives multi-scale training (one drawn per batch) and its last entry is
            the test size.
        max_size: cap on the long side.
        anchor_sizes: one anchor size per FPN level (strides 4, 8, 16, 32, 64), aspect ratios 0.5, 1, 2.
        box_head_dim: width of the two-layer box head.
        mask_head_channels: width of the four-conv mask head.
        detector_kwargs: more arguments of torchvision's ``MaskRCNN`` / ``FasterRCNN`` (e.g.
            ``rpn_batch_size_per_image``, ``box_batch_size_per_image``, ``box_detections_per_img``).
        compile, compile_kwargs: ``torch.compile`` the backbone with these options (e.g. ``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune"}``); run-time options, kept out of the checkpoint's hyperparameters.
        predictions_dir: folder ``predict`` writes ``results.json`` and drawn images to (relative paths land in
            ``trainer.default_root_dir``).
    """

    backbone_path = "detector.backbone.body"
    hparams_ignore = ("predictions_dir",)

    def __init__(
        self,
        num_classes: int,
        backbone: str = "swin_t",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        masks: bool = True,
        fpn_channels: int = 256,
        min_size: int | Sequence[int] = COCO_TRAIN_SIZES,
        max_size: int = 1333,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        box_head_dim: int = 1024,
        mask_head_channels: int = 256,
        detector_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        layer_decay: float | None = None,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        predictions_dir: str = "predictions",
    ) -> None:
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5: strides 4..64), got {list(anchor_sizes)}")
        super().__init__(
            backbone,
            backbone_kwargs,
            pretrained,
            num_classes,
            optimizer,
            lr_scheduler,
            layer_decay,
            compile,
            compile_kwargs,
        )
        self.predictions_dir = predictions_dir

    def configure_models(self) -> None:
        hparams, fpn_channels, num_classes = self.hparams, self.hparams.fpn_channels, self.num_classes
        features = SwinFPN(self.create_backbone(num_classes=0, out_indices=(0, 1, 2, 3)), fpn_channels)
        min_size = hparams.min_size
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        anchor_sizes = hparams.anchor_sizes
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        common: dict[str, Any] = dict(
            min_size=sizes,
            max_size=hparams.max_size,
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
            rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(fpn_channels * 7 * 7, hparams.box_head_dim),
            box_predictor=FastRCNNPredictor(hparams.box_head_dim, num_classes + 1),
            **(hparams.detector_kwargs or {}),
        )
        if hparams.masks:
            mask_channels = hparams.mask_head_channels
            self.detector: nn.Module = MaskRCNN(
                features,
                mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
                **common,
            )
        else:
            self.detector = FasterRCNN(features, **common)

    def configure_metrics(self) -> None:
        iou_type = ("bbox", "segm") if self.hparams.masks else "bbox"
        self.val_metrics = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools")
        self.test_metrics = self.val_metrics.clone()

    def _detector_targets(self, targets: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for target in targets:
            item = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"] + 1}
            if self.hparams.masks:
                if "masks" not in target:
                    raise ValueError(
                        "the task has masks: true but the data gives no masks; set masks: true in the data module "
                        "(COCO JSON source) or masks: false on the task (Faster R-CNN)"
                    )
                item["masks"] = target["masks"].as_subclass(torch.Tensor)
            out.append(item)
        return out

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Images: list of (3, H, W) floats in [0, 1], any sizes. Returns one dict per image with ``boxes``
        (N, 4) xyxy in input pixels, ``scores`` (N,), ``labels`` (N,) in ``0 .. num_classes - 1`` and, with masks,
        ``masks`` (N, H, W) bool."""
        detections = self.detector(images)
        out = []
        for det in detections:
            item = {"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"] - 1}
            if "masks" in det:
                item["masks"] = det["masks"][:, 0] > MASK_THRESHOLD
            out.append(item)
        return out

    @property
    def example_input_array(self) -> tuple[list[torch.Tensor]]:
        """``forward``'s one argument: a list of one (3, S, S) zero image, S the test size (the last ``min_size``)."""
        min_size = self.hparams.min_size
        size = min_size if isinstance(min_size, int) else min_size[-1]
        return ([torch.zeros(3, size, size)],)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.detector(images, self._detector_targets(targets))
        loss = sum(losses.values())
        batch_size = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _evaluate(
        self, batch: tuple[list[torch.Tensor], list[dict]], metrics: MeanAveragePrecision
    ) -> list[dict[str, torch.Tensor]]:
        """Updates ``metrics``; returns the ``forward`` predictions for callbacks (``swinlab.plots``)."""
        images, targets = batch
        predictions = self(images)
        metric_targets = []
        for target in targets:
            item = {
                "boxes": target["boxes"].as_subclass(torch.Tensor),
                "labels": target["labels"],
                "iscrowd": target["iscrowd"],
                "area": target["area"],
            }
            if self.hparams.masks:
                item["masks"] = target["masks"].as_subclass(torch.Tensor).bool()
            metric_targets.append(item)
        metrics.update(predictions, metric_targets)
        return predictions

    def _log_metrics(self, metrics: MeanAveragePrecision, stage: str) -> None:
        results = metrics.compute()
        metrics.reset()
        prefixes = {"bbox": "box", "segm": "mask"} if self.hparams.masks else {"": "box"}
        logged = {}
        for source, name in prefixes.items():
            for key in METRIC_KEYS:
                full_key = f"{source}_{key}" if source else key
                logged[f"{stage}/{name}_{key}"] = results[full_key].float()
        self.log(f"{stage}/box_map_50", logged.pop(f"{stage}/box_map_50"), prog_bar=True)
        self.log_dict(logged)

    def validation_step(
        self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int
    ) -> list[dict[str, torch.Tensor]]:
        return self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> list[dict[str, Any]]:
        images, targets = batch
        predictions = self(images)
        for prediction, target in zip(predictions, targets):
            prediction["image_id"] = target["image_id"]
        return predictions

    def configure_callbacks(self) -> list[Callback]:
        return [DetectionPredictionWriter(self.predictions_dir)]
