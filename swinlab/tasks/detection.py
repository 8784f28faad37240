"""Object detection and instance segmentation: torchvision Mask R-CNN (or Faster R-CNN) + FPN on Swin."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from swinlab.optim import param_groups
from swinlab.tasks.base import SwinTask, build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    """Mask R-CNN (``masks=True``) or Faster R-CNN on Swin + FPN, with COCO box and mask AP on validation.

    Targets come from ``swinlab.data.COCODataModule`` with contiguous labels ``0 .. num_classes - 1``; the
    torchvision detector counts the background as class 0, so labels are shifted by one on the way in and out.
    ``min_size`` is the short side: a list gives multi-scale training (one drawn per batch) and its last entry
    is the test size; ``max_size`` caps the long side. ``detector_kwargs`` go to torchvision's ``MaskRCNN`` /
    ``FasterRCNN`` (e.g. ``rpn_batch_size_per_image``, ``box_batch_size_per_image``, ``box_detections_per_img``).
    """

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
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, layer_decay=layer_decay)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (object classes, without background), got {num_classes}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5: strides 4..64), got {list(anchor_sizes)}")
        self.num_classes = num_classes
        self.masks = masks
        kwargs = {"num_classes": 0, "out_indices": (0, 1, 2, 3), **(backbone_kwargs or {})}
        features = SwinFPN(build_backbone(backbone, kwargs, pretrained), fpn_channels)
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        common: dict[str, Any] = dict(
            min_size=sizes,
            max_size=max_size,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
            box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
            **(detector_kwargs or {}),
        )
        if masks:
            self.detector: nn.Module = MaskRCNN(
                features,
                mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
                **common,
            )
        else:
            self.detector = FasterRCNN(features, **common)
        self.val_map = MeanAveragePrecision(iou_type=("bbox", "segm") if masks else "bbox", backend="pycocotools")

    def parameter_groups(self) -> list[dict]:
        if self.layer_decay is None:
            return param_groups(self)
        # Layer ids come from the Swin body; the FPN and heads get the top id (full lr).
        body, prefix = self.detector.backbone.body, "detector.backbone.body."
        top = body.num_lr_layers

        def layer_id(name: str) -> int:
            return body.lr_layer_id(name[len(prefix) :]) if name.startswith(prefix) else top

        return param_groups(self, layer_id=layer_id, num_layers=top, layer_decay=self.layer_decay)

    def _detector_targets(self, targets: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for target in targets:
            item = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"] + 1}
            if self.masks:
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

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.detector(images, self._detector_targets(targets))
        loss = sum(losses.values())
        batch_size = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> None:
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
            if self.masks:
                item["masks"] = target["masks"].as_subclass(torch.Tensor).bool()
            metric_targets.append(item)
        self.val_map.update(predictions, metric_targets)

    def on_validation_epoch_end(self) -> None:
        results = self.val_map.compute()
        self.val_map.reset()
        prefixes = {"bbox": "box", "segm": "mask"} if self.masks else {"": "box"}
        logged = {}
        for source, name in prefixes.items():
            for key in METRIC_KEYS:
                full_key = f"{source}_{key}" if source else key
                logged[f"val/{name}_{key}"] = results[full_key].float()
        self.log("val/box_map_50", logged.pop("val/box_map_50"), prog_bar=True)
        self.log_dict(logged)

    def test_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def predict_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> list[dict[str, Any]]:
        images, targets = batch
        predictions = self(images)
        for prediction, target in zip(predictions, targets):
            prediction["image_id"] = target["image_id"]
        return predictions


class DetectionPredictionWriter(BasePredictionWriter):
    """Writes ``output_dir/results.json`` (COCO results format: original category ids, xywh boxes, RLE masks)
    and ``output_dir/images/<image_id>.png`` with the boxes, masks and labels above ``score_threshold`` drawn.

    Class names and category ids come from the data module (``class_names``, ``category_ids``).
    """

    def __init__(self, output_dir: str = "predictions", score_threshold: float = 0.5, draw: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.score_threshold = score_threshold
        self.draw = draw
        self.results: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.results = []

    def _names(self, trainer: Trainer) -> tuple[list[int], list[str]]:
        datamodule = trainer.datamodule
        category_ids = getattr(datamodule, "category_ids", None)
        class_names = getattr(datamodule, "class_names", None)
        if category_ids is None or class_names is None:
            raise ValueError(
                "DetectionPredictionWriter needs a data module with category_ids and class_names "
                f"(swinlab.data.COCODataModule); got {type(datamodule).__name__}"
            )
        return category_ids, class_names

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        from pycocotools import mask as mask_utils

        category_ids, class_names = self._names(trainer)
        images, _ = batch
        for image, det in zip(images, prediction):
            boxes, scores, labels = det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu()
            masks = det["masks"].cpu() if "masks" in det else None
            for i in range(len(scores)):
                x1, y1, x2, y2 = boxes[i].tolist()
                entry = {
                    "image_id": det["image_id"],
                    "category_id": category_ids[int(labels[i])],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(scores[i]),
                }
                if masks is not None:
                    rle = mask_utils.encode(masks[i].numpy().astype("uint8", order="F"))
                    entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                self.results.append(entry)
            if self.draw:
                self._draw(image.cpu(), boxes, scores, labels, masks, class_names, det["image_id"])

    def _draw(
        self,
        image: torch.Tensor,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None,
        class_names: list[str],
        image_id: int,
    ) -> None:
        from torchvision.io import write_png

        keep = scores >= self.score_threshold
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
        if masks is not None and keep.any():
            canvas = draw_segmentation_masks(canvas, masks[keep], alpha=0.5)
        texts = [f"{class_names[int(label)]} {float(score):.2f}" for label, score in zip(labels[keep], scores[keep])]
        canvas = draw_bounding_boxes(canvas, boxes[keep], labels=texts, colors="yellow", width=2)
        folder = self.output_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(canvas, str(folder / f"{image_id:012d}.png"))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = "results.json" if trainer.world_size == 1 else f"results_rank{trainer.global_rank}.json"
        (self.output_dir / name).write_text(json.dumps(self.results))
