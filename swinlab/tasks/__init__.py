"""LightningModules, one per task."""

from swinlab.tasks.base import SwinTask, build_backbone

__all__ = ["SwinTask", "build_backbone"]

from swinlab.tasks.detection import DetectionPredictionWriter, DetectionTask

__all__ += ["DetectionPredictionWriter", "DetectionTask"]

from swinlab.tasks.classification import ClassificationTask  # noqa: E402

__all__ += ["ClassificationTask"]

from swinlab.tasks.segmentation import SegmentationPredictionWriter, SegmentationTask  # noqa: E402

__all__ += ["SegmentationPredictionWriter", "SegmentationTask"]
