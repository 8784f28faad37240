"""Detection and instance segmentation on Swin + FPN: Mask / Faster R-CNN, Cascade (Mask) R-CNN, RetinaNet, FCOS."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.anchor_utils import AnchorGenerator

from swinlab.data.bad_samples import READ_ERROR_KEY
from swinlab.deploy.detection import DetectorGraph, ExportedDetector
from swinlab.models.detectors import Framework, build_detector
from swinlab.models.fpn import SwinFPN
from swinlab.plots import DetectionPictures
from swinlab.prediction import DetectionPredictionWriter
from swinlab.tasks.base import SwinTask

logger = logging.getLogger(__name__)

# The paper's multi-scale training: short side 480..800 in steps of 32 (the last one is also the test size).
COCO_TRAIN_SIZES = tuple(range(480, 801, 32))
METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
MASK_THRESHOLD = 0.5
# What ``masks: false`` turns a mask framework into.
BOX_ONLY = {"mask_rcnn": "faster_rcnn", "cascade_mask_rcnn": "cascade_rcnn"}
TWO_STAGE = ("mask_rcnn", "faster_rcnn", "cascade_mask_rcnn", "cascade_rcnn")
# detector_kwargs of the two-stage frameworks (RPN and RoI-head settings) that the one-stage ones do not have.
TWO_STAGE_OPTION_PREFIXES = ("rpn_", "box_")


class DetectionTask(SwinTask):
    """A detector of ``swinlab.models.build_detector`` on Swin + FPN, with COCO box (and mask) AP on validation and
    test: ``framework`` ``mask_rcnn`` (default), ``faster_rcnn``, ``cascade_mask_rcnn``, ``cascade_rcnn``,
    ``retinanet`` or ``fcos``.

    Targets come from ``swinlab.data.COCODataModule`` with contiguous labels ``0 .. num_classes - 1``; the
    detectors count the background as class 0, so labels are shifted by one on the way in and out.
    Metrics: ``{val,test}/{box,mask}_{map,map_50,map_75,map_small,map_medium,map_large}`` over the whole split
    (``mask_*`` for the mask frameworks only). When the data module resizes training images itself
    (``train_resizes``: the 3x ``multiscale_crop`` augmentation), the detector's own training resize is turned off.

    Args:
        num_classes: object classes, without the background (linked from the data module by the CLI).
        framework: the detector (see above).
        backbone: registered model name (``swin_t``, ``swin_s``, ``swin_b``, ``swin_l``).
        backbone_kwargs: constructor overrides (``drop_path_rate``, ...); ``out_indices`` defaults to all 4 stages.
        pretrained: official, timm or swinlab classification checkpoint for the backbone.
        masks: instance masks (and mask AP) for the mask frameworks; false turns ``mask_rcnn`` into Faster R-CNN
            and ``cascade_mask_rcnn`` into Cascade R-CNN. RetinaNet and FCOS give boxes only either way.
        fpn_channels: width of the FPN levels and of the heads' input.
        min_size: the short side; a list gives multi-scale training (one drawn per batch) and its last entry is
            the test size.
        max_size: cap on the long side.
        anchor_sizes: the RPN's anchor size per FPN level (strides 4, 8, 16, 32, 64), aspect ratios 0.5, 1, 2
            (two-stage frameworks; RetinaNet and FCOS size their anchors from the strides, see ``build_detector``).
        box_head_dim: width of the box head's last layer (two-stage frameworks).
        mask_head_channels: width of the four-conv mask head.
        detector_kwargs: more arguments of the framework's constructor (torchvision's ``MaskRCNN`` /
            ``FasterRCNN`` / ``RetinaNet`` / ``FCOS``, swinlab's ``CascadeRCNN``), e.g.
            ``rpn_batch_size_per_image``, ``box_detections_per_img``, ``score_thresh``. The two-stage ``rpn_*`` and
            ``box_*`` options are left out (with a warning) for RetinaNet and FCOS, so one config serves every
            framework; any other unknown key is an error.
        compile, compile_kwargs: ``torch.compile`` the backbone with these options (e.g. ``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune"}``); run-time options, kept out of the checkpoint's hyperparameters.
        predictions_dir: folder ``predict`` writes ``results.json``, ``images.json`` and drawn images to
            (relative paths land in ``trainer.default_root_dir``).
    """

    backbone_path = "detector.backbone.body"
    fixed_size_images = False
    hparams_ignore = ("predictions_dir",)

    def __init__(
        self,
        num_classes: int,
        framework: Framework = "mask_rcnn",
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
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile, compile_kwargs=compile_kwargs)
        self.predictions_dir = predictions_dir

    @property
    def framework(self) -> str:
        """The detector actually built: ``hparams.framework``, without its mask head when ``masks`` is off."""
        framework = self.hparams.framework
        return framework if self.hparams.masks else BOX_ONLY.get(framework, framework)

    @property
    def has_masks(self) -> bool:
        return self.framework in ("mask_rcnn", "cascade_mask_rcnn")

    def _framework_options(self) -> dict[str, Any]:
        """The constructor options of ``build_detector`` for this framework, from the task's arguments."""
        hparams = self.hparams
        options = dict(hparams.detector_kwargs or {})
        if self.framework in TWO_STAGE:
            anchor_sizes = hparams.anchor_sizes
            anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
            return dict(
                rpn_anchor_generator=anchors,
                box_head_dim=hparams.box_head_dim,
                mask_head_channels=hparams.mask_head_channels,
                **options,
            )
        two_stage = sorted(key for key in options if key.startswith(TWO_STAGE_OPTION_PREFIXES))
        if two_stage:
            logger.warning("%s has no RPN or RoI heads: detector_kwargs %s left out", self.framework, two_stage)
        return {key: value for key, value in options.items() if key not in two_stage}

    def configure_models(self) -> None:
        hparams = self.hparams
        features = SwinFPN(self.create_backbone(num_classes=0, out_indices=(0, 1, 2, 3)), hparams.fpn_channels)
        self.detector: nn.Module = build_detector(
            self.framework,
            features,
            self.num_classes,
            min_size=hparams.min_size if isinstance(hparams.min_size, int) else tuple(hparams.min_size),
            max_size=hparams.max_size,
            **self._framework_options(),
        )

    def setup(self, stage: str) -> None:
        """Turn the detector's training resize off when the data module resizes training images itself."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and getattr(datamodule, "train_resizes", False):
            self.detector.transform._skip_resize = True

    def configure_metrics(self) -> None:
        iou_type = ("bbox", "segm") if self.has_masks else "bbox"
        self.val_metrics = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools")
        self.test_metrics = self.val_metrics.clone()

    def _detector_targets(self, targets: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for target in targets:
            item = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"] + 1}
            if self.has_masks:
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
        detections = (self.detector if self.exported_network is None else self.exported_network)(images)
        out = []
        for det in detections:
            item = {"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"] - 1}
            if "masks" in det:
                item["masks"] = det["masks"][:, 0] > MASK_THRESHOLD
            out.append(item)
        return out

    def export_network(self) -> nn.Module:
        """What is exported (``swinlab.deploy.detection.export_detector``): the detector on one (3, H, W) image,
        giving its evaluation output as a tuple (``DetectorGraph``); its runtime stand-in for ``self.detector`` is
        ``swinlab.deploy.detection.ExportedDetector``."""
        return DetectorGraph(self.detector, masks=self.has_masks)

    def use_exported(self, model: Any) -> None:
        """Run ``model`` (an exported ``export_network``, ``swinlab.deploy.runtime.ExportedModel``) in place of the
        detector in validate, test and predict; it serves the one image size it was exported for."""
        _, height, width = model.input_shapes[0]
        self.exported_network = ExportedDetector(model, (height, width), str(model.path))

    def example_image_shape(self) -> tuple[int, int, int]:
        """(3, S, S), S the test size (the last ``min_size``)."""
        min_size = self.hparams.min_size
        size = min_size if isinstance(min_size, int) else min_size[-1]
        return 3, size, size

    @property
    def example_input_array(self) -> tuple[list[torch.Tensor]]:
        """``forward``'s one argument: a list of one zero image of ``example_image_shape``."""
        return ([torch.zeros(*self.example_image_shape())],)

    def training_step(self, batch: dict[str, list], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        losses = self.detector(images, self._detector_targets(batch["target"]))
        loss = sum(losses.values())
        batch_size = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: dict[str, list], metrics: MeanAveragePrecision) -> list[dict[str, torch.Tensor]]:
        """Updates ``metrics``; returns the ``forward`` predictions for ``DetectionPictures``."""
        predictions = self(batch["image"])
        metric_targets = []
        for target in batch["target"]:
            item = {
                "boxes": target["boxes"].as_subclass(torch.Tensor),
                "labels": target["labels"],
                "iscrowd": target["iscrowd"],
                "area": target["area"],
            }
            if self.has_masks:
                item["masks"] = target["masks"].as_subclass(torch.Tensor).bool()
            metric_targets.append(item)
        metrics.update(predictions, metric_targets)
        return predictions

    def _log_metrics(self, metrics: MeanAveragePrecision, stage: str) -> None:
        results = metrics.compute()
        metrics.reset()
        prefixes = {"bbox": "box", "segm": "mask"} if self.has_masks else {"": "box"}
        logged = {}
        for source, name in prefixes.items():
            for key in METRIC_KEYS:
                full_key = f"{source}_{key}" if source else key
                logged[f"{stage}/{name}_{key}"] = results[full_key].float()
        self.log(f"{stage}/box_map_50", logged.pop(f"{stage}/box_map_50"), prog_bar=True)
        self.log_dict(logged)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        """Per image, in batch order: the ``forward`` detections plus ``image_id``, ``file_name`` and
        ``READ_ERROR_KEY``; an image whose file could not be read (a placeholder) is not run and has no detections."""
        images = batch["image"]
        files = batch.get("file") or [None] * len(images)
        errors = batch.get(READ_ERROR_KEY) or [""] * len(images)
        readable = [i for i, error in enumerate(errors) if not error]
        detections = dict(zip(readable, self([images[i] for i in readable]))) if readable else {}
        return [
            {
                **detections.get(i, {}),
                "image_id": target["image_id"],
                "file_name": file,
                READ_ERROR_KEY: error,
            }
            for i, (target, file, error) in enumerate(zip(batch["target"], files, errors))
        ]

    def configure_callbacks(self) -> list[Callback]:
        return [DetectionPredictionWriter(self.predictions_dir), DetectionPictures()]
