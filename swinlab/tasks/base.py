"""What every swinlab task shares: backbone spec, ``num_classes``, hyperparameters, parameter groups, schedule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

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


class SwinTask(LightningModule, ABC):
    """Base of every task, in the shape of torchgeo's ``BaseTask``.

    ``SwinTask.__init__`` owns what all tasks share: it checks ``num_classes``, saves the hyperparameters (every
    init argument of the concrete task except the optimizer and scheduler callables and ``hparams_ignore``), keeps
    the backbone spec (``backbone``, ``backbone_kwargs``, ``pretrained``, built by ``create_backbone``), the
    optimizer and scheduler callables and ``layer_decay``, then calls the hooks a task fills in:
    ``configure_models`` (backbone and head), ``configure_losses`` and ``configure_metrics`` (``val_metrics``,
    ``test_metrics``). The hooks read the task's own arguments from ``self.hparams``.

    A task keeps its full, explicit ``__init__`` signature (so LightningCLI lists every argument with its type,
    default and doc), checks its own arguments, and passes the shared ones on to ``SwinTask.__init__``. It logs
    ``train/*``, ``val/*`` and ``test/*`` keys in the matching stage and returns its prediction writer
    (``swinlab.prediction``) from ``configure_callbacks``.

    The optimizer and scheduler arrive as callables from LightningCLI, so the task builds its own parameter
    groups (no weight decay on norms, biases and position tables; optional layer-wise lr decay over the Swin
    blocks) and steps the schedule every iteration.
    """

    #: Where the Swin backbone sits in the task (``get_submodule`` path): layer-wise lr decay scales its blocks.
    backbone_path: ClassVar[str] = "backbone"
    #: Init arguments kept out of the checkpoint's hyperparameters. LightningCLI applies a checkpoint's
    #: hyperparameters over the command line on ``--ckpt_path`` runs, so a run-time option saved there (the
    #: predictions' location, test-time augmentation) could not be changed for evaluation or prediction.
    hparams_ignore: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        backbone: str,
        backbone_kwargs: dict[str, Any] | None,
        pretrained: str | None,
        num_classes: int,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        layer_decay: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # Lightning collects the arguments of every __init__ up the class chain, the concrete task's included.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", *self.hparams_ignore])
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.layer_decay = layer_decay
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    @abstractmethod
    def configure_models(self) -> None:
        """Build the backbone (``create_backbone``) and the task's head."""

    def configure_losses(self) -> None:
        """Build the training losses (none here: e.g. a torchvision detector computes its own)."""

    @abstractmethod
    def configure_metrics(self) -> None:
        """Build ``val_metrics`` and ``test_metrics``."""

    def create_backbone(self, num_classes: int, **defaults: Any) -> nn.Module:
        """The configured backbone: ``create_model(backbone, **{**defaults, **backbone_kwargs})`` with the given
        ``num_classes`` (0: no classifier head), then the ``pretrained`` weights if any."""
        kwargs = {**defaults, **(self.hparams.backbone_kwargs or {}), "num_classes": num_classes}
        return build_backbone(self.hparams.backbone, kwargs, self.hparams.pretrained)

    def parameter_groups(self) -> list[dict]:
        """``swinlab.optim.param_groups`` of the task; with ``layer_decay`` the backbone's layer ids come from the
        backbone at ``backbone_path``, and everything outside it (necks, heads) gets the top id (full lr)."""
        if self.layer_decay is None:
            return param_groups(self)
        backbone, prefix = self.get_submodule(self.backbone_path), f"{self.backbone_path}."
        top = backbone.num_lr_layers

        def layer_id(name: str) -> int:
            return backbone.lr_layer_id(name[len(prefix) :]) if name.startswith(prefix) else top

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
