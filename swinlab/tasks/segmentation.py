"""Semantic segmentation: Swin backbone + UperNet head + FCN auxiliary head (the paper's ADE20K setting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from swinlab.models.upernet import FCNHead, UperNetHead
from swinlab.tasks.base import SwinTask, build_backbone


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationMetrics(MulticlassJaccardIndex):
    """mIoU, mean class accuracy and pixel accuracy over a whole data set, as mmsegmentation reports them.

    One confusion matrix accumulates over every image (``update(preds, target)`` with integer maps of any
    shape); ``ignore_index`` pixels are dropped. mIoU averages the per-class IoU over the classes present in
    the prediction or the ground truth (torchmetrics gives the others weight 0, as mmseg's nan + nanmean);
    mAcc averages per-class recall over the classes present in the ground truth; aAcc is pixel accuracy.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, average="macro", validate_args=False)

    def compute(self) -> dict[str, torch.Tensor]:
        confmat = self.confmat.double()  # rows: ground truth, columns: prediction
        correct, support = confmat.diag(), confmat.sum(1)
        class_accuracy = correct[support > 0] / support[support > 0]
        return {
            "mIoU": super().compute(),
            "mAcc": class_accuracy.mean().float() if len(class_accuracy) else torch.tensor(0.0),
            "aAcc": (correct.sum() / confmat.sum().clamp(min=1)).float(),
        }


class SegmentationTask(SwinTask):
    """Swin + UperNet for semantic segmentation.

    Training: cross-entropy (``ignore_index`` not scored) on the UperNet logits upsampled to the crop, plus
    ``aux_loss_weight`` times the same loss on an FCN head over feature map ``aux_in_index`` (stage 3).
    Evaluation: ``inference_mode`` ``whole`` (one pass over the image) or ``slide`` (``crop_size`` windows
    every ``stride`` pixels, overlapping logits averaged); ``test_scales`` (factors on the data module's
    test size) and ``test_flip`` average softmax scores; scores are resized to the original image before
    the argmax. Metrics: ``{val,test}/{mIoU,mAcc,aAcc}`` over the whole split.

    Args:
        num_classes: output classes (linked from the data module by the CLI).
        backbone, backbone_kwargs, pretrained: the Swin backbone (``out_indices`` defaults to all 4 stages).
        decode_channels, pool_scales, dropout: UperNet width (512), pyramid pooling grids and dropout.
        aux_channels, aux_loss_weight, aux_in_index: FCN auxiliary head; weight 0 drops it.
        ignore_index: label value that is neither trained on nor scored.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "swin_t",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        decode_channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_channels: int = 256,
        aux_loss_weight: float = 0.4,
        aux_in_index: int = 2,
        ignore_index: int = 255,
        inference_mode: Literal["whole", "slide"] = "whole",
        crop_size: int | Sequence[int] = 512,
        stride: int | Sequence[int] = 341,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        layer_decay: float | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, layer_decay=layer_decay)
        # Test-time options stay out of the checkpoint's hyperparameters: LightningCLI applies those over the
        # command line when --ckpt_path is given, which would silently ignore e.g. --model.init_args.test_flip.
        self.save_hyperparameters(
            ignore=["optimizer", "lr_scheduler", "inference_mode", "crop_size", "stride", "test_scales", "test_flip"]
        )
        if inference_mode not in ("whole", "slide"):
            raise ValueError(f"inference_mode must be 'whole' or 'slide', got {inference_mode!r}")
        if not test_scales or min(test_scales) <= 0:
            raise ValueError(f"test_scales must be positive factors, got {test_scales!r}")
        self.crop_size, self.stride = _pair(crop_size, "crop_size"), _pair(stride, "stride")
        self.inference_mode, self.test_scales, self.test_flip = inference_mode, tuple(test_scales), test_flip
        self.ignore_index, self.aux_loss_weight, self.aux_in_index = ignore_index, aux_loss_weight, aux_in_index

        kwargs = {"out_indices": (0, 1, 2, 3), **(backbone_kwargs or {}), "num_classes": 0}
        self.backbone = build_backbone(backbone, kwargs, pretrained)
        channels = list(self.backbone.feature_channels)
        if aux_loss_weight > 0 and not 0 <= aux_in_index < len(channels):
            raise ValueError(
                f"aux_in_index {aux_in_index} is not one of the backbone's {len(channels)} feature maps "
                f"(backbone_kwargs.out_indices); set it in 0..{len(channels) - 1} or aux_loss_weight: 0"
            )
        self.decode_head = UperNetHead(channels, num_classes, decode_channels, pool_scales, dropout)
        self.aux_head = (
            FCNHead(channels[aux_in_index], num_classes, aux_channels, dropout=dropout) if aux_loss_weight > 0 else None
        )
        self.criterion = nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.test_metrics = SegmentationMetrics(num_classes, ignore_index)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> UperNet logits (B, num_classes, H, W)."""
        return _resize(self.decode_head(self.backbone.forward_features(images)), images.shape[-2:])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, masks = batch["image"], batch["mask"]
        if images.shape[0] == 1 and not self._batchnorm_spans_processes():
            raise ValueError(
                "SegmentationTask got a training batch of 1 image: UperNet's pyramid pooling branch pools to 1x1, "
                "and its BatchNorm needs more than one value per channel. Set data.batch_size >= 2 per device, or "
                "train on several devices with trainer.sync_batchnorm=true (the official recipe: 2 images per GPU "
                "on 8 GPUs with SyncBN)."
            )
        features = self.backbone.forward_features(images)
        decode_loss = self.criterion(_resize(self.decode_head(features), masks.shape[-2:]), masks)
        loss = decode_loss
        batch_size = images.shape[0]
        if self.aux_head is not None:
            aux_loss = self.criterion(_resize(self.aux_head(features[self.aux_in_index]), masks.shape[-2:]), masks)
            loss = loss + self.aux_loss_weight * aux_loss
            self.log("train/aux_loss", aux_loss, batch_size=batch_size)
        self.log("train/decode_loss", decode_loss, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _batchnorm_spans_processes(self) -> bool:
        """True when the head's BatchNorm is synchronised over more than one process (Lightning's sync_batchnorm)."""
        synced = any(isinstance(module, nn.SyncBatchNorm) for module in self.decode_head.modules())
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return synced and distributed and torch.distributed.get_world_size() > 1

    def slide_inference(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes, H, W) averaged over ``crop_size`` windows every ``stride``
        pixels (mmseg ``slide``: the last window in each direction is aligned to the border)."""
        (crop_h, crop_w), (stride_h, stride_w) = self.crop_size, self.stride
        height, width = images.shape[-2:]
        rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
        cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
        logits = images.new_zeros(images.shape[0], self.hparams.num_classes, height, width)
        counts = images.new_zeros(1, 1, height, width)
        for row in range(rows):
            for col in range(cols):
                bottom, right = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
                top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
                logits[..., top:bottom, left:right] += self(images[..., top:bottom, left:right])
                counts[..., top:bottom, left:right] += 1
        return logits / counts

    def infer(self, images: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """(B, 3, h, w) -> class scores (B, num_classes, H, W) at ``output_size``: logits for one pass,
        softmax averaged over ``test_scales`` x flips otherwise."""
        height, width = images.shape[-2:]
        passes = [
            (scale, flip) for scale in self.test_scales for flip in ((False, True) if self.test_flip else (False,))
        ]
        total = None
        for scale, flip in passes:
            x = images if scale == 1.0 else _resize(images, (int(height * scale + 0.5), int(width * scale + 0.5)))
            x = x.flip(-1) if flip else x
            logits = self.slide_inference(x) if self.inference_mode == "slide" else self(x)
            scores = _resize(logits.flip(-1) if flip else logits, output_size)
            if len(passes) > 1:
                scores = scores.softmax(dim=1)
            total = scores if total is None else total + scores
        return total / len(passes)

    def _predict_labels(self, image: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """One image (3, h, w) -> label map (H, W) at ``output_size``."""
        return self.infer(image[None], output_size)[0].argmax(dim=0)

    def _evaluate(self, batch: dict[str, list], metrics: SegmentationMetrics) -> None:
        for image, mask in zip(batch["image"], batch["mask"]):
            metrics.update(self._predict_labels(image, mask.shape)[None], mask[None])

    def _log_metrics(self, metrics: SegmentationMetrics, prefix: str) -> None:
        results = metrics.compute()
        metrics.reset()
        self.log_dict({f"{prefix}/{name}": value for name, value in results.items()}, prog_bar=True)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``name``, ``labels`` (H, W) int64 at the original size, ``raw_image`` uint8 (3, H, W)."""
        return [
            {"name": name, "labels": self._predict_labels(image, raw.shape[-2:]).cpu(), "raw_image": raw.cpu()}
            for name, image, raw in zip(batch["name"], batch["image"], batch["raw_image"])
        ]


def label_palette(num_classes: int) -> np.ndarray:
    """Distinct colours (num_classes, 3) uint8: the PASCAL VOC bit-interleaving palette, skipping black."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        label, colour = index + 1, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((label >> channel) & 1) << (7 - bit)
            label >>= 3
        palette[index] = colour
    return palette


class SegmentationPredictionWriter(BasePredictionWriter):
    """Writes, for every predicted image, ``<output_dir>/labels/<stem>.png`` (the label map, 8-bit, class
    index + ``label_offset``; 1 gives ADE20K's annotation numbering) and ``<output_dir>/overlays/<stem>.png``
    (the image blended with the class colours, ``alpha`` = colour weight)."""

    def __init__(self, output_dir: str, alpha: float = 0.5, label_offset: int = 0) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir, self.alpha, self.label_offset = Path(output_dir), alpha, label_offset

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
        num_classes = pl_module.hparams.num_classes
        if num_classes + self.label_offset > 256:
            raise ValueError(
                f"8-bit label PNGs hold 256 values; num_classes {num_classes} + "
                f"label_offset {self.label_offset} is more"
            )
        palette = label_palette(num_classes)
        (self.output_dir / "labels").mkdir(parents=True, exist_ok=True)
        (self.output_dir / "overlays").mkdir(parents=True, exist_ok=True)
        for item in prediction:
            labels = item["labels"].numpy()
            stem = Path(item["name"]).stem
            Image.fromarray((labels + self.label_offset).astype(np.uint8)).save(
                self.output_dir / "labels" / f"{stem}.png"
            )
            image = item["raw_image"].permute(1, 2, 0).numpy().astype(np.float32)
            overlay = (1 - self.alpha) * image + self.alpha * palette[labels].astype(np.float32)
            Image.fromarray(overlay.round().astype(np.uint8)).save(self.output_dir / "overlays" / f"{stem}.png")
