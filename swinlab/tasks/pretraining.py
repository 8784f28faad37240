"""Masked image modelling (SimMIM) pre-training of any Swin on unlabelled images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchvision.utils import make_grid, save_image

from swinlab.models.flops import count_macs
from swinlab.models.simmim import SimMIM, load_simmim_pretrained
from swinlab.tasks.base import SwinTask, build_backbone


class MaskedImageModelingTask(SwinTask):
    """SimMIM (Xie et al., CVPR 2022) around a Swin backbone (``swinlab.models.simmim.SimMIM``).

    Batches are ``{"image": (B, C, H, W), "mask": (B, H / patch, W / patch)}`` (``UnlabeledImageDataModule``, which
    draws the masks); ``task(images, mask)`` returns ``(loss, reconstruction)``. Logs ``train/loss`` and
    ``val/loss``. The fine-tuning tasks load the encoder of its checkpoints with ``pretrained:``.

    Args:
        backbone: a registered Swin (``swin_*``, ``swinv2_*``); built with ``num_classes=0``.
        backbone_kwargs: constructor overrides (``img_size``, ``window_size``, ``drop_path_rate``, ...).
        pretrained: continue pre-training from an official SimMIM release or a swinlab pre-training checkpoint
            (encoder, mask token and decoder), or start the encoder from any Swin checkpoint.
        lr_reference_batch: if set, the configured lr is multiplied by ``global batch / lr_reference_batch``
            (SimMIM: ``lr: 1.0e-4, lr_reference_batch: 512``).
        num_pictures: validation images shown (original / masked / reconstruction) after every validation.
    """

    backbone_path = "model.encoder"
    # num_classes: the CLI's data.num_classes link still hands its value (None here) to the saved init config; a
    # checkpoint must not name it, or ``--ckpt_path`` runs would pass it back to this task.
    hparams_ignore = ("num_pictures", "num_classes")

    def __init__(
        self,
        backbone: str = "swin_b",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        layer_decay: float | None = None,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        lr_reference_batch: int | None = None,
        num_pictures: int = 8,
    ) -> None:
        if lr_reference_batch is not None and lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch must be >= 1 or null, got {lr_reference_batch}")
        if num_pictures < 0:
            raise ValueError(f"num_pictures must be >= 0, got {num_pictures}")
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile, compile_kwargs=compile_kwargs)
        self.num_pictures = num_pictures

    def configure_models(self) -> None:
        hparams = self.hparams
        encoder = build_backbone(hparams.backbone, {**(hparams.backbone_kwargs or {}), "num_classes": 0}, None)
        try:
            self.model = SimMIM(encoder)
        except ValueError as err:
            raise ValueError(f"backbone={hparams.backbone!r}: {err}") from None
        if hparams.pretrained:
            load_simmim_pretrained(self.model, hparams.pretrained)

    def configure_metrics(self) -> None:
        """The loss is the only measure."""

    def configure_model(self) -> None:
        """``compile: true`` compiles the whole SimMIM module: it runs the encoder's parts, not the encoder's call."""
        if self.compile_kwargs is not None and not self._compiled:
            self.model.compile(**self.compile_kwargs)
            self._compiled = True

    @property
    def example_input_array(self) -> Any:
        channels, height, width = self.example_image_shape()
        patch = self.model.patch_size
        return torch.zeros(1, channels, height, width), torch.zeros(
            1, height // patch, width // patch, dtype=torch.long
        )

    def training_flops(self, batch_shape: Sequence[int]) -> int:
        shape = tuple(batch_shape[1:])
        if shape not in self._macs_per_image:
            # Encoder, plus the decoder's 1x1 convolution (num_features x in_chans per output pixel).
            decoder = self.model.encoder.num_features * self.model.in_chans * shape[1] * shape[2]
            self._macs_per_image[shape] = count_macs(self.model.encoder, shape) + decoder
        return super().training_flops(batch_shape)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) images, (B, H / patch, W / patch) mask (1 = masked) -> (loss, reconstruction)."""
        return self.model(images, mask)

    def export_network(self) -> nn.Module:
        """The encoder as a feature extractor: (B, C, H, W) images -> (B, num_features) pooled features."""
        return self.model.encoder.eval()

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        reference = self.hparams.lr_reference_batch
        if reference is not None:
            trainer = self.trainer
            images_per_step = trainer.datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
            rank_zero_info(f"lr scaled by global batch {images_per_step} / {reference}")
            for group in groups:
                group["lr_scale"] = group.get("lr_scale", 1.0) * images_per_step / reference
        return groups

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self(batch["image"], batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss, reconstruction = self(batch["image"], batch["mask"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return {"reconstruction": reconstruction.detach()}

    def configure_callbacks(self) -> list[Callback]:
        return [ReconstructionPictures(self.num_pictures)] if self.num_pictures else []


class ReconstructionPictures(Callback):
    """After every validation (in ``fit`` too), one PNG of the first ``num_images`` validation images (the same
    images and masks every time): rows of original / masked / reconstruction, un-normalised with the data
    module's ``mean`` and ``std``; written to ``<log dir>/reconstructions/step_<global step>.png`` and to
    TensorBoard (``val/reconstructions``) when that logger is on."""

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images
        self.rows: list[torch.Tensor] = []

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        wanted = self.num_images - len(self.rows)
        if trainer.sanity_checking or wanted <= 0 or not isinstance(outputs, dict):
            return
        images, masks = batch["image"][:wanted], batch["mask"][:wanted]
        reconstructions = outputs["reconstruction"][:wanted]
        mean, std = (torch.tensor(getattr(trainer.datamodule, name, (0.0,))).view(-1, 1, 1) for name in ("mean", "std"))
        patch = images.shape[-1] // masks.shape[-1]
        for image, mask, reconstruction in zip(images.cpu(), masks.cpu(), reconstructions.float().cpu()):
            pixels = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[None].float()
            original, rebuilt = ((x.float() * std + mean).clamp(0, 1) for x in (image, reconstruction))
            masked = original * (1 - pixels) + 0.5 * pixels  # masked patches grey
            self.rows.extend(x.expand(3, -1, -1) for x in (original, masked, rebuilt))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.rows:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        grid = make_grid(torch.stack(self.rows), nrow=3, padding=2, pad_value=1.0)
        path = folder / "reconstructions" / f"step_{trainer.global_step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        rank_zero_info(f"Wrote {path} (original / masked / reconstruction)")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/reconstructions", grid, trainer.global_step)
