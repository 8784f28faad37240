"""LightningModules, one per task."""

from swinlab.tasks.base import SwinTask, build_backbone

__all__ = ["SwinTask", "build_backbone"]
