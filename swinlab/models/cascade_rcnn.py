"""Cascade (Mask) R-CNN built from torchvision's detection parts, configured like the official Swin detectors.

The official Swin Cascade Mask R-CNN (mmdetection ``CascadeRoIHead``, Swin configs ``..._giou_4conv1f_...``):

- three stages with IoU thresholds 0.5 / 0.6 / 0.7 and loss weights 1 / 0.5 / 0.25; every stage samples 512 RoIs
  per image, 25% positive, with the ground-truth boxes added as proposals;
- each stage's box head is "4conv1fc" (four 3x3 convs of 256 channels with BatchNorm, SyncBN in the official
  multi-GPU runs, then one fc of 1024) and regresses boxes per class (``reg_class_agnostic=False``) with its own
  target stds (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067); the box loss is a GIoU
  loss (weight 10) on the decoded boxes;
- each stage's refined boxes (detached) are the next stage's proposals;
- each stage has its own mask head (``init_mask_head`` builds one per stage), trained on that stage's positives;
  at test time all of them run on the final boxes and their mask probabilities are averaged;
- at test time the class logits of the three stages are averaged before the softmax; boxes come from the last stage.

Labels follow torchvision: 0 is the background, objects are ``1 .. num_classes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss
from torchvision.ops import boxes as box_ops

STAGE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
STAGE_TARGET_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
BOX_HEAD_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,  # official (SyncBN there: Lightning's sync_batchnorm=True converts it under DDP)
    "group": lambda channels: nn.GroupNorm(32, channels),
}


class CascadeBoxPredictor(nn.Module):
    """RoI features (N, in_features) -> class logits (N, num_classes + 1) and box deltas (N, 4) when class-agnostic
    or (N, 4 * (num_classes + 1)) per class. Initialised like mmdetection's box head (normal std 0.01 / 0.001)."""

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else 4 * (num_classes + 1))
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(features), self.bbox_pred(features)


class CascadeRoIHeads(nn.Module):
    """The cascade of box (and mask) stages; drop-in for torchvision's ``RoIHeads`` inside ``GeneralizedRCNN``.

    Each stage is a torchvision ``RoIHeads`` holding that stage's matcher (its IoU threshold for both positives and
    negatives), sampler, box coder (weights = 1 / target std), box head, predictor and mask head; the cascade
    logic (sampling with GT proposals, GIoU loss, refinement, score averaging) lives here.
    """

    def __init__(
        self,
        stages: Sequence[RoIHeads],
        stage_loss_weights: Sequence[float],
        class_agnostic: bool,
        box_loss_weight: float = 10.0,
    ) -> None:
        super().__init__()
        if len(stages) != len(stage_loss_weights):
            raise ValueError(f"{len(stages)} cascade stages but {len(stage_loss_weights)} stage loss weights")
        self.stages = nn.ModuleList(stages)
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.class_agnostic = class_agnostic
        self.box_loss_weight = box_loss_weight

    @property
    def has_mask(self) -> bool:
        return self.stages[0].has_mask()

    def select_training_samples(
        self, stage_index: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Adds the GT boxes to each image's proposals (P, 4), matches them at the stage's IoU threshold and
        samples RoIs. Returns per image the sampled boxes (S, 4), matched GT index (S,), label (S,; 0 =
        background) and whether the box is a GT box (S,)."""
        stage = self.stages[stage_index]
        gt_boxes = [t["boxes"] for t in targets]
        with_gt = stage.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = stage.assign_targets_to_proposals(with_gt, gt_boxes, [t["labels"] for t in targets])
        sampled = stage.subsample(labels)
        out: tuple[list[Tensor], ...] = ([], [], [], [])
        for image, keep in enumerate(sampled):
            is_gt = torch.arange(len(with_gt[image]), device=keep.device) >= len(proposals[image])
            for column, values in zip(out, (with_gt[image], matched_idxs[image], labels[image], is_gt)):
                column.append(values[keep])
        return out

    def _predict(
        self, stage: RoIHeads, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Class logits (N, C + 1) and box deltas (N, 4 or 4 (C + 1)) for the boxes of all images (N in total)."""
        roi_features = stage.box_head(stage.box_roi_pool(features, boxes, image_shapes))
        return stage.box_predictor(roi_features)

    def _decode(self, stage: RoIHeads, deltas: Tensor, boxes: list[Tensor], labels: Tensor) -> Tensor:
        """Decoded boxes (N, 4): the class ``labels`` (N,) column of per-class deltas, or the class-agnostic one."""
        if not self.class_agnostic:
            # shape[0], not len(): the ONNX tracer records a size but bakes len() in as a constant.
            count = labels.shape[0]
            deltas = deltas.view(count, -1, 4)[torch.arange(count, device=labels.device), labels]
        return stage.box_coder.decode_single(deltas, torch.cat(boxes))

    def _refine(
        self,
        stage: RoIHeads,
        logits: Tensor,
        deltas: Tensor,
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        labels: Tensor | None = None,
    ) -> list[Tensor]:
        """The stage's regressed boxes, clipped to the image and detached: the next stage's proposals. ``labels``
        picks the regression class (assigned labels in training); background and test RoIs take the most likely
        object class, as mmdetection's ``refine_bboxes`` / ``regress_by_class`` do."""
        predicted = logits[:, 1:].argmax(dim=1) + 1
        labels = predicted if labels is None else torch.where(labels > 0, labels, predicted)
        refined = self._decode(stage, deltas, boxes, labels).detach().split([b.shape[0] for b in boxes])
        return [box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(refined, image_shapes)]

    def _mask_logits(
        self, stage: RoIHeads, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Mask logits (N, C + 1, 28, 28) for the boxes of all images."""
        return stage.mask_predictor(stage.mask_head(stage.mask_roi_pool(features, boxes, image_shapes)))

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Features: FPN maps; proposals: per image (P, 4) RPN boxes. Training returns ([], losses), evaluation
        (detections, {}) with per image ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,) and, with masks,
        ``masks`` (D, 1, 28, 28) probabilities (pasted into the image by the transform)."""
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads needs targets in training mode")
            if self.has_mask and any("masks" not in t for t in targets):
                raise ValueError("this Cascade Mask R-CNN has mask heads: every target needs 'masks' (N, H, W)")
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        losses = {}
        for index, (stage, weight) in enumerate(zip(self.stages, self.stage_loss_weights)):
            boxes, matched_idxs, labels, is_gt = self.select_training_samples(index, proposals, targets)
            logits, deltas = self._predict(stage, features, boxes, image_shapes)
            all_labels = torch.cat(labels)
            positives = [label > 0 for label in labels]
            decoded = self._decode(stage, deltas, boxes, all_labels)
            # Positives only: an image without objects has no GT box to index.
            matched_gt = torch.cat([t["boxes"][i[p]] for t, i, p in zip(targets, matched_idxs, positives)])
            # As mmdetection (and torchvision's fastrcnn_loss): summed over positives, divided by all sampled RoIs.
            giou = generalized_box_iou_loss(decoded[all_labels > 0], matched_gt, reduction="sum")
            losses[f"loss_classifier_s{index}"] = weight * F.cross_entropy(logits, all_labels)
            losses[f"loss_box_giou_s{index}"] = weight * self.box_loss_weight * giou / max(len(all_labels), 1)
            if self.has_mask:
                mask_boxes = [b[p] for b, p in zip(boxes, positives)]
                mask_logits = self._mask_logits(stage, features, mask_boxes, image_shapes)
                losses[f"loss_mask_s{index}"] = weight * maskrcnn_loss(
                    mask_logits,
                    mask_boxes,
                    [t["masks"] for t in targets],
                    [t["labels"] for t in targets],
                    [i[p] for i, p in zip(matched_idxs, positives)],
                )
            if index < len(self.stages) - 1:
                refined = self._refine(stage, logits, deltas, boxes, image_shapes, all_labels)
                proposals = [r[~gt] for r, gt in zip(refined, is_gt)]  # the next stage adds the GT boxes again
        return losses

    def _detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        boxes = proposals
        stage_logits = []
        for index, stage in enumerate(self.stages):
            logits, deltas = self._predict(stage, features, boxes, image_shapes)
            stage_logits.append(logits)
            if index < len(self.stages) - 1:
                boxes = self._refine(stage, logits, deltas, boxes, image_shapes)
        last = self.stages[-1]
        if self.class_agnostic:  # postprocess_detections expects one box per class
            deltas = deltas.repeat(1, logits.shape[1])
        mean_logits = torch.stack(stage_logits).mean(dim=0)
        det_boxes, scores, labels = last.postprocess_detections(mean_logits, deltas, boxes, image_shapes)
        detections = [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(det_boxes, scores, labels)]
        if self.has_mask:
            stage_probs = [
                maskrcnn_inference(self._mask_logits(stage, features, det_boxes, image_shapes), labels)
                for stage in self.stages
            ]
            for image, detection in enumerate(detections):
                detection["masks"] = torch.stack([probs[image] for probs in stage_probs]).mean(dim=0)
        return detections


class CascadeRCNN(GeneralizedRCNN):
    """Cascade R-CNN (``masks=False``) or Cascade Mask R-CNN on an FPN backbone, called like torchvision's detectors.

    ``backbone(images)`` gives an OrderedDict of FPN maps with ``backbone.out_channels`` channels;
    ``roi_featmap_names`` are the maps RoIs are pooled from (strides 4..32 in the official setup). ``num_classes``
    counts objects without the background (targets' labels are ``1 .. num_classes``). Training:
    ``model(images, targets)`` -> dict of losses (RPN, then per stage ``*_s0``.. already weighted by the stage
    weights); evaluation: ``model(images)`` -> per image ``boxes`` (D, 4), ``scores``, ``labels`` and, with masks,
    ``masks`` (D, 1, H, W) probabilities. The RPN and test-time settings are torchvision's (they equal the official
    ones); the box heads' convs are ``box_head_channels`` wide, by default the FPN's width as in the official
    config; ``transform_kwargs`` go to ``GeneralizedRCNNTransform`` (e.g. ``size_divisible``, ``_skip_resize``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        rpn_anchor_generator: AnchorGenerator,
        roi_featmap_names: Sequence[str],
        masks: bool = True,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        stage_iou_thresholds: Sequence[float] = STAGE_IOU_THRESHOLDS,
        stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        stage_target_stds: Sequence[Sequence[float]] = STAGE_TARGET_STDS,
        class_agnostic: bool = False,
        box_head_channels: int | None = None,
        box_head_convs: int = 4,
        box_head_dim: int = 1024,
        box_head_norm: str = "batch",
        mask_head_channels: int = 256,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        box_loss_weight: float = 10.0,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        **transform_kwargs: Any,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (object classes, without background), got {num_classes}")
        if not len(stage_iou_thresholds) == len(stage_loss_weights) == len(stage_target_stds):
            raise ValueError(
                "stage_iou_thresholds, stage_loss_weights and stage_target_stds need one entry per stage, got "
                f"{list(stage_iou_thresholds)}, {list(stage_loss_weights)}, {list(stage_target_stds)}"
            )
        if box_head_norm not in BOX_HEAD_NORMS:
            raise ValueError(f"box_head_norm must be one of {sorted(BOX_HEAD_NORMS)}, got {box_head_norm!r}")
        channels = backbone.out_channels
        # The official 4conv1fc heads convolve at the FPN's width (256 = 256); a narrower FPN gets narrower heads.
        box_head_channels = box_head_channels or channels
        rpn = RegionProposalNetwork(
            rpn_anchor_generator,
            RPNHead(channels, rpn_anchor_generator.num_anchors_per_location()[0]),
            rpn_fg_iou_thresh,
            rpn_bg_iou_thresh,
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            rpn_nms_thresh,
        )
        box_roi_pool = MultiScaleRoIAlign(list(roi_featmap_names), output_size=7, sampling_ratio=2)
        mask_roi_pool = MultiScaleRoIAlign(list(roi_featmap_names), output_size=14, sampling_ratio=2) if masks else None
        stages = []
        for iou, stds in zip(stage_iou_thresholds, stage_target_stds):
            stages.append(
                RoIHeads(
                    box_roi_pool,
                    FastRCNNConvFCHead(
                        (channels, 7, 7),
                        [box_head_channels] * box_head_convs,
                        [box_head_dim],
                        norm_layer=BOX_HEAD_NORMS[box_head_norm],
                    ),
                    CascadeBoxPredictor(box_head_dim, num_classes, class_agnostic),
                    fg_iou_thresh=iou,
                    bg_iou_thresh=iou,  # mmdetection's MaxIoUAssigner with pos = neg threshold: nothing is ignored
                    batch_size_per_image=box_batch_size_per_image,
                    positive_fraction=box_positive_fraction,
                    bbox_reg_weights=tuple(1.0 / s for s in stds),
                    score_thresh=box_score_thresh,
                    nms_thresh=box_nms_thresh,
                    detections_per_img=box_detections_per_img,
                    mask_roi_pool=mask_roi_pool,
                    mask_head=MaskRCNNHeads(channels, [mask_head_channels] * 4, 1) if masks else None,
                    mask_predictor=(
                        MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1) if masks else None
                    ),
                )
            )
        roi_heads = CascadeRoIHeads(stages, stage_loss_weights, class_agnostic, box_loss_weight)
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        transform = GeneralizedRCNNTransform(sizes, max_size, list(image_mean), list(image_std), **transform_kwargs)
        super().__init__(backbone, rpn, roi_heads, transform)


__all__ = ["CascadeBoxPredictor", "CascadeRCNN", "CascadeRoIHeads"]
