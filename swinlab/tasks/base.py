"""What every swinlab task shares: backbone spec, ``num_classes``, hyperparameters, parameter groups, schedule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from swinlab.models import create_model, load_pretrained
from swinlab.models.flops import count_macs
from swinlab.optim import apply_lr_scale, param_groups


def build_backbone(name: str, backbone_kwargs: dict[str, Any] | None, pretrained: str | None) -> nn.Module:
    """``create_model(name, **backbone_kwargs)``, then the pretrained weights (official or timm) if given."""
    model = create_model(name, **(backbone_kwargs or {}))
    if pretrained:
        load_pretrained(model, pretrained)
    return model


class ExportedNetwork(nn.Module):
    """An exported model run by a CPU runtime (``swinlab.deploy.runtime.ExportedModel``: numpy arrays in, a list of
    numpy arrays out) as a module: float tensors in, the output tensor (a tuple of them when several) out, on the
    inputs' device."""

    def __init__(self, model: Callable[..., list[np.ndarray]]) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.model(*(x.detach().float().cpu().numpy() for x in inputs))
        tensors = tuple(torch.from_numpy(output).to(inputs[0].device) for output in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


def batch_size(batch: dict[str, Any]) -> int:
    """Images in a task's batch (``ThroughputMonitor``'s ``batch_size_fn``)."""
    return len(batch["image"])


class SwinTask(LightningModule, ABC):
    """Base of every task, in the shape of torchgeo's ``BaseTask``.

    ``SwinTask.__init__`` owns what all tasks share: it checks ``num_classes``, saves the hyperparameters (every
    init argument of the concrete task except the optimizer and scheduler callables and ``hparams_ignore``), keeps
    the backbone spec (``backbone``, ``backbone_kwargs``, ``pretrained``, built by ``create_backbone``), the
    optimizer and scheduler callables, ``layer_decay`` and ``compile``, then calls the hooks a task fills in:
    ``configure_models`` (backbone and head), ``configure_losses`` and ``configure_metrics`` (``val_metrics``,
    ``test_metrics``). The hooks read the task's own arguments from ``self.hparams``.

    A task keeps its full, explicit ``__init__`` signature (so LightningCLI lists every argument with its type,
    default and doc) and checks its own arguments. ``SwinTask`` reads the shared hyperparameters (``backbone``,
    ``backbone_kwargs``, ``pretrained``, ``num_classes``, ``layer_decay``) from ``self.hparams``; the task passes
    on, by keyword, only what is kept out of them (the optimizer and scheduler callables, ``compile`` and
    ``compile_kwargs``). Every batch is a dict (``image`` plus the task's ``label``, ``target`` or ``mask``). It logs
    ``train/*``, ``val/*`` and ``test/*`` keys in the matching stage and returns its prediction writer
    (``swinlab.prediction``) from ``configure_callbacks``.

    The optimizer and scheduler arrive as callables from LightningCLI, so the task builds its own parameter
    groups (no weight decay on norms, biases and position tables; optional layer-wise lr decay over the Swin
    blocks) and steps the schedule every iteration.

    ``compile: true`` compiles the backbone with ``torch.compile(**compile_kwargs)`` in ``configure_model``.
    ``example_input_array`` (one zero image at the backbone's ``img_size`` / ``in_chans``) lets Lightning's model
    summary count FLOPs; ``flops_per_batch`` (set every training batch of fixed-size images: multiply-adds of
    the task's forward x 2 x 3 for forward and backward) feeds ``ThroughputMonitor``'s FLOP rate.
    """

    #: Where the Swin backbone sits in the task (``get_submodule`` path): layer-wise lr decay scales its blocks.
    backbone_path: ClassVar[str] = "backbone"
    #: Init arguments kept out of the checkpoint's hyperparameters. LightningCLI applies a checkpoint's
    #: hyperparameters over the command line on ``--ckpt_path`` runs, so a run-time option saved there (the
    #: predictions' location, test-time augmentation) could not be changed for evaluation or prediction.
    hparams_ignore: ClassVar[tuple[str, ...]] = ()
    #: Whether a training batch's ``image`` is one (B, C, H, W) tensor; False: a list of images of their own sizes,
    #: whose FLOPs are not counted.
    fixed_size_images: ClassVar[bool] = True
    #: Run-time options of every task, kept out of the hyperparameters for the same reason.
    shared_run_time_options: ClassVar[tuple[str, ...]] = ("compile", "compile_kwargs")

    def __init__(
        self,
        *,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Lightning collects the arguments of every __init__ up the class chain, the concrete task's included.
        self.save_hyperparameters(
            ignore=["optimizer", "lr_scheduler", *self.shared_run_time_options, *self.hparams_ignore]
        )
        # A task without classes (pre-training) has no num_classes argument.
        self.num_classes: int | None = self.hparams.get("num_classes")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.compile_kwargs = dict(compile_kwargs or {}) if compile else None
        self._compiled = False
        #: Training FLOPs of the current batch, read by ``ThroughputMonitor`` (None: not counted).
        self.flops_per_batch: int | None = None
        #: (C, H, W) of the last training batch of fixed-size images (None before one, or with lists of images).
        self.train_image_shape: tuple[int, ...] | None = None
        self._macs_per_image: dict[tuple[int, ...], int] = {}
        #: An exported model that validate, test and predict run in place of the network (``use_exported``).
        self.exported_network: nn.Module | None = None
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

    @abstractmethod
    def export_network(self) -> nn.Module:
        """What ``export`` writes: an eval-mode module from this task's input to its output (each task says which)."""

    def use_exported(self, model: Callable[..., list[np.ndarray]]) -> None:
        """Run ``model`` (an exported copy of :meth:`export_network`, loaded by a CPU runtime) in validate, test and
        predict instead of the PyTorch network: ``--model_file``."""
        self.exported_network = ExportedNetwork(model)

    def configure_model(self) -> None:
        """Compile the backbone once (Lightning calls this hook at the start of every run)."""
        if self.compile_kwargs is None or self._compiled:
            return
        backbone = self.get_submodule(self.backbone_path)
        # ``Module.compile`` wraps ``__call__`` in place: the state_dict keys (and so checkpoints) stay those of the
        # eager model, without ``_orig_mod.``. Dense tasks call ``forward_features`` directly, which that wrapper
        # does not reach, so it is compiled as well.
        backbone.compile(**self.compile_kwargs)
        if hasattr(backbone, "forward_features"):
            backbone.forward_features = torch.compile(backbone.forward_features, **self.compile_kwargs)
        self._compiled = True

    def example_image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image: the backbone's ``img_size`` and ``in_chans`` (defaults 224 and 3)."""
        backbone = self.get_submodule(self.backbone_path)
        kwargs = self.hparams.backbone_kwargs or {}
        size = getattr(backbone, "img_size", None) or kwargs.get("img_size") or 224
        height, width = (size, size) if isinstance(size, int) else size
        return kwargs.get("in_chans", 3), height, width

    @property
    def example_input_array(self) -> Any:
        """(1, C, H, W) zeros at ``example_image_shape``: Lightning's model summary runs it to count FLOPs."""
        return torch.zeros(1, *self.example_image_shape())

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The largest group's lr: with layer decay the head's, the schedule's own value.
        lr = max(group["lr"] for group in self.trainer.optimizers[0].param_groups)
        images = batch["image"]
        self.log("train/lr", lr, batch_size=batch_size(batch))
        if self.fixed_size_images:
            self.train_image_shape = tuple(images.shape[1:])
            self.flops_per_batch = self.training_flops(images.shape)
        else:
            self.flops_per_batch = None

    def training_flops(self, batch_shape: Sequence[int]) -> int:
        """FLOPs of a training step on a (B, C, H, W) batch: multiply-adds of ``forward`` x 2 (FLOPs per MAC) x 3
        (the backward pass costs about twice the forward). Counted once per image shape, on one image."""
        image_shape = tuple(batch_shape[1:])
        if image_shape not in self._macs_per_image:
            self._macs_per_image[image_shape] = count_macs(self, image_shape)
        return self._macs_per_image[image_shape] * 2 * 3 * batch_shape[0]

    def parameter_groups(self) -> list[dict]:
        """``swinlab.optim.param_groups`` of the task; with ``layer_decay`` the backbone's layer ids come from the
        backbone at ``backbone_path``, and everything outside it (necks, heads) gets the top id (full lr)."""
        layer_decay = self.hparams.layer_decay
        if layer_decay is None:
            return param_groups(self)
        backbone, prefix = self.get_submodule(self.backbone_path), f"{self.backbone_path}."
        top = backbone.num_lr_layers

        def layer_id(name: str) -> int:
            return backbone.lr_layer_id(name[len(prefix) :]) if name.startswith(prefix) else top

        return param_groups(self, layer_id=layer_id, num_layers=top, layer_decay=layer_decay)

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
