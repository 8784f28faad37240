"""Image classification with a Swin backbone: the paper's ImageNet-1K recipe, and small-scale recipes."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from swinlab.data.bad_samples import READ_ERROR_KEY
from swinlab.plots import ClassificationPictures
from swinlab.prediction import ClassificationPredictionWriter
from swinlab.tasks.base import SwinTask


class ClassificationTask(SwinTask):
    """A registered Swin backbone with its linear head, trained with cross-entropy (optionally Mixup/CutMix).

    Args:
        backbone: registered model name (``swin_t``, ``swin_s``, ``swin_b``, ``swin_l``).
        backbone_kwargs: constructor overrides (``img_size``, ``window_size``, ``drop_path_rate``, ...).
        pretrained: official, timm or swinlab checkpoint; tables are interpolated to a new window or image size,
            a head of another size is left newly initialised.
        num_classes: linked from the data module by the CLI.
        lr_reference_batch: if set, the configured lr (and so warm-up and minimum lr) is multiplied by
            ``global batch / lr_reference_batch``, global batch = batch size x devices x nodes x accumulation
            (the paper: lr 1e-3 at 1024, so ``lr: 1.0e-3, lr_reference_batch: 1024``).
        label_smoothing: applied to the hard targets, or folded into the Mixup/CutMix soft targets.
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: timm ``Mixup``; off when both alphas are 0.
        ema_decay: keep a timm ``ModelEmaV3`` of the backbone with this decay; validation, test and predict then
            use the averaged weights.
        compile, compile_kwargs: ``torch.compile`` the backbone with these options (e.g. ``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune"}``); run-time options, kept out of the checkpoint's hyperparameters.
        predictions_file: CSV written by ``predict`` (relative paths land in ``trainer.default_root_dir``).
    """

    hparams_ignore = ("predictions_file",)

    def __init__(
        self,
        backbone: str = "swin_t",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        num_classes: int = 1000,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        layer_decay: float | None = None,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        lr_reference_batch: int | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        predictions_file: str = "predictions.csv",
    ) -> None:
        if lr_reference_batch is not None and lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch must be >= 1 or null, got {lr_reference_batch}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile, compile_kwargs=compile_kwargs)
        self.predictions_file = predictions_file

    def configure_models(self) -> None:
        self.backbone = self.create_backbone(num_classes=self.num_classes)
        self.ema: ModelEmaV3 | None = None
        if self.hparams.ema_decay is not None:
            self.ema = ModelEmaV3(self.backbone, decay=self.hparams.ema_decay)
            # The average is not trained: keep it out of the optimizer's parameter groups and DDP's gradients.
            self.ema.requires_grad_(False)

    def configure_losses(self) -> None:
        hparams = self.hparams
        self.mixup: Mixup | None = None
        if hparams.mixup_alpha > 0 or hparams.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=hparams.mixup_alpha,
                cutmix_alpha=hparams.cutmix_alpha,
                prob=hparams.mixup_prob,
                switch_prob=hparams.mixup_switch_prob,
                label_smoothing=hparams.label_smoothing,
                num_classes=self.num_classes,
            )
            self.train_loss: nn.Module = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=hparams.label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        metrics = {"top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:  # top-5 of five or fewer classes is always 1
            metrics["top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    @property
    def eval_network(self) -> nn.Module:
        """What validation, test and predict run: an exported model when one is in use (``use_exported``), else
        the EMA weights when enabled, else the trained ones."""
        if self.exported_network is not None:
            return self.exported_network
        return self.ema.module if self.ema is not None else self.backbone

    def export_network(self) -> nn.Module:
        """(B, C, H, W) images -> (B, num_classes) logits of the evaluation weights (the EMA when enabled)."""
        return (self.ema.module if self.ema is not None else self.backbone).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits of the trained (not averaged) weights."""
        return self.backbone(images)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        reference = self.hparams.lr_reference_batch
        if reference is not None:
            global_batch = self.global_batch_size()
            scale = global_batch / reference
            rank_zero_info(f"lr scaled by global batch {global_batch} / {reference} = {scale:g}")
            for group in groups:
                group["lr_scale"] = group.get("lr_scale", 1.0) * scale
        return groups

    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes: batch size x world size x gradient accumulation."""
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if not isinstance(batch_size, int):
            raise ValueError(
                "lr_reference_batch needs the data module's batch_size attribute to scale the lr; set "
                "model.init_args.lr_reference_batch to null and give the final lr instead"
            )
        return batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def on_fit_start(self) -> None:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if self.mixup is not None and isinstance(batch_size, int) and batch_size % 2:
            raise ValueError(
                f"Mixup/CutMix pairs images within a batch: data batch_size must be even, got {batch_size}"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self(images), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # NonFiniteLossGuard drops every gradient of a step it skips: then the weights did not move, nor does the EMA.
        stepped = any(param.grad is not None for param in self.backbone.parameters())
        if self.ema is not None and stepped:
            # Lightning counts this step in global_step only after the hook returns; timm expects the count
            # including it (the first update copies the weights).
            self.ema.update(self.backbone, step=self.global_step + 1)

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, stage: str) -> torch.Tensor:
        """Logs loss and metrics; returns the (B, num_classes) logits for ``ClassificationPictures``."""
        targets = batch["label"]
        logits = self.eval_network(batch["image"])
        self.log(f"{stage}/loss", self.eval_loss(logits, targets), sync_dist=True)
        metrics.update(logits, targets)
        self.log_dict(metrics, prog_bar=stage == "val")
        return logits.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``{"image": (B, C, H, W), "file": [B], "error": [B]}`` -> ``{"files": [n], "probs": (n, k), "indices":
        (n, k), "failed": [(file, reason), ...]}``: the top k = min(5, C) classes of the n readable images; an image
        whose ``error`` is set (unreadable file, placeholder pixels) is not predicted, only listed in ``failed``."""
        errors = batch[READ_ERROR_KEY]
        readable = [row for row, error in enumerate(errors) if not error]
        k = min(5, self.num_classes)
        probs, indices = torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        if readable:
            top = self.eval_network(batch["image"][readable]).float().softmax(dim=-1).topk(k, dim=-1)
            probs, indices = top.values.cpu(), top.indices.cpu()
        return {
            "files": [batch["file"][row] for row in readable],
            "probs": probs,
            "indices": indices,
            "failed": [(file, error) for file, error in zip(batch["file"], errors) if error],
        }

    def configure_callbacks(self) -> list[Callback]:
        return [ClassificationPredictionWriter(self.predictions_file), ClassificationPictures()]
