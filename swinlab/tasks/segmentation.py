"""Semantic segmentation: Swin backbone + UperNet head + FCN auxiliary head (the paper's ADE20K setting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

# One definition each: the data pipeline's size check and the heads' bilinear resize (still private there).
from swinlab.data.bad_samples import READ_ERROR_KEY
from swinlab.data.segmentation_transforms import IGNORE_INDEX, to_pair
from swinlab.models.upernet import FCNHead, UperNetHead
from swinlab.models.upernet import resize_logits as _resize
from swinlab.plots import SegmentationPictures
from swinlab.prediction import SegmentationPredictionWriter
from swinlab.tasks.base import SwinTask

# The official multi-scale test (mmseg ``img_ratios``), each scale also flipped.
MS_FLIP_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


class SegmentationMetrics(MulticlassJaccardIndex):
    """mIoU, mean class accuracy and pixel accuracy over a whole data set, as mmsegmentation reports them.

    One confusion matrix accumulates over every image (``update(preds, target)`` with integer maps of any
    shape); ``ignore_index`` pixels are dropped. mIoU averages the per-class IoU over the classes present in
    the prediction or the ground truth (torchmetrics gives the others weight 0, as mmseg's nan + nanmean);
    mAcc averages per-class recall over the classes present in the ground truth; aAcc is pixel accuracy.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
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

    ``test_augmentation="ms_flip"`` is the official multi-scale + flip test: every image is also evaluated at
    ``ms_flip_ratios`` (0.5 .. 1.75 of the test size) and the flipped copy of each; each pass's logits are flipped
    back, resized to the original image and turned into softmax scores, and the 12 score maps are averaged (as
    mmseg's ``aug_test``). Validation and test then log those metrics beside the single-pass ones
    (``val/mIoU_ms_flip`` next to ``val/mIoU``, ...); ``predict`` writes the ms+flip labels.

    Args:
        num_classes: output classes (linked from the data module by the CLI).
        backbone, backbone_kwargs, pretrained: the Swin backbone (``out_indices`` defaults to all 4 stages).
        decode_channels, pool_scales, dropout: UperNet width (512), pyramid pooling grids and dropout.
        aux_channels, aux_loss_weight, aux_in_index: FCN auxiliary head; weight 0 drops it.
        ignore_index: label value that is neither trained on nor scored.
        inference_mode, crop_size, stride, test_scales, test_flip: evaluation and prediction as above (kept out
            of the checkpoint's hyperparameters, so they can be changed when evaluating a checkpoint).
        test_augmentation, ms_flip_ratios: ``none`` or ``ms_flip`` (multi-scale + flip, above) and its scales
            (also kept out of the hyperparameters).
        compile, compile_kwargs: ``torch.compile`` the backbone with these options (e.g. ``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune"}``); run-time options, kept out of the checkpoint's hyperparameters.
        predictions_dir: folder ``predict`` writes ``labels/`` and ``overlays/`` to (relative paths land in
            ``trainer.default_root_dir``).
    """

    hparams_ignore = (
        "inference_mode",
        "crop_size",
        "stride",
        "test_scales",
        "test_flip",
        "test_augmentation",
        "ms_flip_ratios",
        "predictions_dir",
    )

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
        ignore_index: int = IGNORE_INDEX,
        inference_mode: Literal["whole", "slide"] = "whole",
        crop_size: int | Sequence[int] = 512,
        stride: int | Sequence[int] = 341,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
        test_augmentation: Literal["none", "ms_flip"] = "none",
        ms_flip_ratios: Sequence[float] = MS_FLIP_RATIOS,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        layer_decay: float | None = None,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        predictions_dir: str = "predictions",
    ) -> None:
        if inference_mode not in ("whole", "slide"):
            raise ValueError(f"inference_mode must be 'whole' or 'slide', got {inference_mode!r}")
        if not test_scales or min(test_scales) <= 0:
            raise ValueError(f"test_scales must be positive factors, got {test_scales!r}")
        if test_augmentation not in ("none", "ms_flip"):
            raise ValueError(f"test_augmentation must be 'none' or 'ms_flip', got {test_augmentation!r}")
        if not ms_flip_ratios or min(ms_flip_ratios) <= 0:
            raise ValueError(f"ms_flip_ratios must be positive factors, got {ms_flip_ratios!r}")
        crop_size, stride = to_pair(crop_size, "crop_size"), to_pair(stride, "stride")
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile, compile_kwargs=compile_kwargs)
        self.crop_size, self.stride = crop_size, stride
        self.inference_mode, self.test_scales, self.test_flip = inference_mode, tuple(test_scales), test_flip
        self.test_augmentation, self.ms_flip_ratios = test_augmentation, tuple(ms_flip_ratios)
        self.predictions_dir = predictions_dir

    def configure_models(self) -> None:
        hparams = self.hparams
        self.backbone = self.create_backbone(num_classes=0, out_indices=(0, 1, 2, 3))
        channels = list(self.backbone.feature_channels)
        if hparams.aux_loss_weight > 0 and not 0 <= hparams.aux_in_index < len(channels):
            raise ValueError(
                f"aux_in_index {hparams.aux_in_index} is not one of the backbone's {len(channels)} feature maps "
                f"(backbone_kwargs.out_indices); set it in 0..{len(channels) - 1} or aux_loss_weight: 0"
            )
        self.decode_head = UperNetHead(
            channels, self.num_classes, hparams.decode_channels, hparams.pool_scales, hparams.dropout
        )
        self.aux_head = (
            FCNHead(channels[hparams.aux_in_index], self.num_classes, hparams.aux_channels, dropout=hparams.dropout)
            if hparams.aux_loss_weight > 0
            else None
        )

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(ignore_index=self.hparams.ignore_index)

    def configure_metrics(self) -> None:
        self.val_metrics = SegmentationMetrics(self.num_classes, self.hparams.ignore_index)
        self.test_metrics = SegmentationMetrics(self.num_classes, self.hparams.ignore_index)
        # Used with test_augmentation="ms_flip" (a run-time option, set after this hook runs).
        self.val_metrics_ms_flip = SegmentationMetrics(self.num_classes, self.hparams.ignore_index)
        self.test_metrics_ms_flip = SegmentationMetrics(self.num_classes, self.hparams.ignore_index)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> UperNet logits (B, num_classes, H, W), from the exported model when one
        is in use (``use_exported``)."""
        if self.exported_network is not None:
            return self.exported_network(images)
        return _resize(self.decode_head(self.backbone.forward_features(images)), images.shape[-2:])

    def export_network(self) -> nn.Module:
        """The task itself: (B, 3, H, W) normalised images -> UperNet logits (B, num_classes, H, W)."""
        return self.eval()

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
            aux_logits = self.aux_head(features[self.hparams.aux_in_index])
            aux_loss = self.criterion(_resize(aux_logits, masks.shape[-2:]), masks)
            loss = loss + self.hparams.aux_loss_weight * aux_loss
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
        logits = images.new_zeros(images.shape[0], self.num_classes, height, width)
        counts = images.new_zeros(1, 1, height, width)
        for row in range(rows):
            for col in range(cols):
                bottom, right = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
                top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
                logits[..., top:bottom, left:right] += self(images[..., top:bottom, left:right])
                counts[..., top:bottom, left:right] += 1
        return logits / counts

    def infer(
        self,
        images: torch.Tensor,
        output_size: Sequence[int],
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
    ) -> torch.Tensor:
        """(B, 3, h, w) -> class scores (B, num_classes, H, W) at ``output_size``: logits for one pass,
        softmax averaged over ``scales`` x flips otherwise (default ``test_scales`` and ``test_flip``). A flipped
        pass is flipped back before the resize to ``output_size``."""
        scales = self.test_scales if scales is None else scales
        flip = self.test_flip if flip is None else flip
        height, width = images.shape[-2:]
        passes = [(scale, flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]
        total = None
        for scale, flipped in passes:
            x = images if scale == 1.0 else _resize(images, (int(height * scale + 0.5), int(width * scale + 0.5)))
            x = x.flip(-1) if flipped else x
            logits = self.slide_inference(x) if self.inference_mode == "slide" else self(x)
            scores = _resize(logits.flip(-1) if flipped else logits, output_size)
            if len(passes) > 1:
                scores = scores.softmax(dim=1)
            total = scores if total is None else total + scores
        return total / len(passes)

    def infer_ms_flip(self, images: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """(B, 3, h, w) -> softmax scores (B, num_classes, H, W) averaged over ``ms_flip_ratios`` x flip."""
        return self.infer(images, output_size, self.ms_flip_ratios, True)

    def _predict_labels(self, image: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """One image (3, h, w) -> label map (H, W) at ``output_size`` (ms+flip with ``test_augmentation=ms_flip``)."""
        infer = self.infer_ms_flip if self.test_augmentation == "ms_flip" else self.infer
        return infer(image[None], output_size)[0].argmax(dim=0)

    def _evaluate(
        self, batch: dict[str, list], metrics: SegmentationMetrics, ms_flip_metrics: SegmentationMetrics
    ) -> list[torch.Tensor]:
        """Updates the metrics; returns each image's single-pass (H, W) label map for ``SegmentationPictures``."""
        label_maps = []
        for image, mask in zip(batch["image"], batch["mask"]):
            labels = self.infer(image[None], mask.shape).argmax(dim=1)
            metrics.update(labels, mask[None])
            label_maps.append(labels[0])
            if self.test_augmentation == "ms_flip":
                ms_flip_metrics.update(self.infer_ms_flip(image[None], mask.shape).argmax(dim=1), mask[None])
        return label_maps

    def _log_metrics(self, metrics: SegmentationMetrics, ms_flip_metrics: SegmentationMetrics, prefix: str) -> None:
        results = {f"{prefix}/{name}": value for name, value in metrics.compute().items()}
        metrics.reset()
        if self.test_augmentation == "ms_flip":
            results |= {f"{prefix}/{name}_ms_flip": value for name, value in ms_flip_metrics.compute().items()}
            ms_flip_metrics.reset()
        self.log_dict(results, prog_bar=True)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> list[torch.Tensor]:
        return self._evaluate(batch, self.val_metrics, self.val_metrics_ms_flip)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, self.val_metrics_ms_flip, "val")

    def test_step(self, batch: dict[str, list], batch_idx: int) -> list[torch.Tensor]:
        return self._evaluate(batch, self.test_metrics, self.test_metrics_ms_flip)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, self.test_metrics_ms_flip, "test")

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``file``, ``labels`` (H, W) int64 at the original size, ``raw_image`` uint8 (3, H, W); an image
        whose ``error`` is set (unreadable file, placeholder pixels) is not predicted: ``{"file", "error"}``."""
        return [
            {"file": file, "error": error}
            if error
            else {"file": file, "labels": self._predict_labels(image, raw.shape[-2:]).cpu(), "raw_image": raw.cpu()}
            for file, image, raw, error in zip(batch["file"], batch["image"], batch["raw_image"], batch[READ_ERROR_KEY])
        ]

    def configure_callbacks(self) -> list[Callback]:
        return [SegmentationPredictionWriter(self.predictions_dir), SegmentationPictures()]
