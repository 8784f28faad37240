"""LightningModules, one per task, on the shared ``SwinTask`` base."""

from swinlab.tasks.base import SwinTask, build_backbone
from swinlab.tasks.classification import ClassificationTask
from swinlab.tasks.detection import DetectionTask
from swinlab.tasks.pretraining import MaskedImageModelingTask
from swinlab.tasks.segmentation import SegmentationTask

__all__ = [
    "ClassificationTask",
    "DetectionTask",
    "MaskedImageModelingTask",
    "SegmentationTask",
    "SwinTask",
    "build_backbone",
]
