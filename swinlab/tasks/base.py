"""What every swinlab task shares: building the backbone from a spec, parameter groups and the schedule."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from swinlab.models import create_model, load_pretrained
from swinlab.optim import apply_lr_scale, param_groups


def build_backbone(name: str, backbone_kwargs: dict[str, Any] | None, pretrained: str | None) -> nn.Module:
    """``create_model(name, **backbone_kwargs)``, then the pretrained weights (official or timm) if given."""
    model = create_model(name, **(backbone_kwargs or {}))
    if pretrained:
        load_pretrained(model, pretrained)
    return model


class SwinTask(LightningModule):
    """Base LightningModule: owns optimizer and schedule; subclasses build the backbone and head.

    The optimizer and scheduler arrive as callables from LightningCLI, so the task builds its own parameter
    groups (no weight decay on norms, biases and position tables; optional layer-wise lr decay) and steps
    the schedule every iteration.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        layer_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.layer_decay = layer_decay

    def parameter_groups(self) -> list[dict]:
        backbone = getattr(self, "backbone", None)
        if self.layer_decay is None or backbone is None or not hasattr(backbone, "lr_layer_id"):
            return param_groups(self)
        # Layer ids come from the backbone; heads outside it get the top id (full lr).
        top = backbone.num_lr_layers

        def layer_id(name: str) -> int:
            return backbone.lr_layer_id(name[len("backbone.") :]) if name.startswith("backbone.") else top

        return param_groups(self, layer_id=layer_id, num_layers=top, layer_decay=self.layer_decay)

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        for group in groups:
            group.pop("names")
        optimizer = self.optimizer_factory(groups)
        apply_lr_scale(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, total_steps // max_epochs)
        scheduler = self.lr_scheduler_factory(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
