"""Pictures next to the numbers: training curves after ``fit``, evaluation pictures after ``validate``/``test``.

The CLI attaches ``TrainingCurves`` to every run (``swinlab.cli``) and each task its own ``EvaluationPictures``
(``configure_callbacks``); each writes PNGs into the run's log folder
(``trainer.log_dir``: the logger's version folder, or ``trainer.default_root_dir`` without a logger) and says where.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.nn import functional as F
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid, save_image

# The confusion matrix writes each count into its cell only up to this many classes (ImageNet: 1000 would be a
# million labels); above it, colour only.
MAX_ANNOTATED_CLASSES = 30


def _save_figure(figure: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    rank_zero_info(f"Wrote {path}")


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of a ``CSVLogger`` -> ``{metric: [(step, value), ...]}`` over the rows that have the metric."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(name, []).append((step, float(value)))
    return series


def _is_loss(name: str) -> bool:
    return name.split("/")[-1] == "loss"


def _is_lr(name: str) -> bool:
    last = name.split("/")[-1]
    return last == "lr" or last.startswith("lr-")  # the task's ``train/lr`` or LearningRateMonitor's ``lr-AdamW``


def plot_training_curves(metrics_csv: str | Path, output: str | Path, monitor: str | None = None) -> Path | None:
    """One PNG with a panel each for the losses (``*/loss``), the ``monitor`` metric and the learning rate(s)
    against the step. Panels without data are left out; returns None (and writes nothing) if none has any."""
    series = read_metrics_csv(metrics_csv)
    panels = [
        ("loss", [name for name in series if _is_loss(name)]),
        (monitor or "", [monitor] if monitor in series and not _is_loss(monitor) else []),
        ("learning rate", [name for name in series if _is_lr(name)]),
    ]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=name)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    output = Path(output)
    _save_figure(figure, output)
    return output


class TrainingCurves(Callback):
    """After ``fit``: ``curves.png`` (losses, the checkpoint's monitored metric, lr) from the run's ``CSVLogger``."""

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        csv_logger = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
        if csv_logger is None:
            rank_zero_info("No training curves: the run has no CSVLogger")
            return
        csv_logger.save()  # the logger writes its buffer every flush_logs_every_n_steps steps and at the end
        metrics_csv = Path(csv_logger.log_dir) / "metrics.csv"
        if not metrics_csv.is_file():
            return
        checkpoint = trainer.checkpoint_callback
        monitor = getattr(checkpoint, "monitor", None)
        plot_training_curves(metrics_csv, Path(csv_logger.log_dir) / "curves.png", monitor)


def _displayable(image: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) float image (normalised or in [0, 1]) -> uint8 (3, H, W), stretched to its own min..max."""
    image = image.detach().float().cpu()
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    return (image * 255).round().to(torch.uint8)


def _palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Fixed colours per class, so ground truth and prediction panels agree."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.randint(40, 256, (num_classes, 3), generator=generator)
    return [tuple(int(c) for c in colour) for colour in colours]


def _class_name(names: list[str] | None, index: int) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


class EvaluationPictures(Callback):
    """After ``validate`` / ``test`` (not the validation inside ``fit``), pictures of what the model got right and
    wrong, from the predictions the task's ``validation_step`` / ``test_step`` return. Each task returns its own
    subclass from ``configure_callbacks``; the subclass says what it keeps of a batch (``collect``) and what it
    draws (``write``); this base calls them and writes into the run's log folder (``trainer.log_dir``).
    """

    def __init__(self, num_images: int = 8) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images = num_images
        self.reset()

    def reset(self) -> None:
        """Forget what was collected (at the start of every validate / test)."""

    def collect(self, trainer: Trainer, outputs: Any, batch: dict[str, Any]) -> None:
        """Keep what the pictures need of one batch and the task's outputs for it."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called on every process before ``write`` (rank 0 only): the place for collectives."""

    def write(self, trainer: Trainer, folder: Path, stage: str) -> None:
        """Draw the pictures of ``stage`` into ``folder`` (rank 0 only)."""
        raise NotImplementedError

    def _active(self, trainer: Trainer) -> bool:
        return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not trainer.sanity_checking

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.reset()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.reset()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if self._active(trainer):
            self.collect(trainer, outputs, batch)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args) -> None:
        self.collect(trainer, outputs, batch)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active(trainer):
            self._write(trainer, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, "test")

    def _write(self, trainer: Trainer, stage: str) -> None:
        self.finish()
        # ``trainer.log_dir`` broadcasts rank 0's folder (a collective): asked on rank 0 alone, it waits for a
        # broadcast the other ranks never join, or pairs with their next collective.
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self.write(trainer, folder, stage)
        self.reset()


class ClassificationPictures(EvaluationPictures):
    """From the (B, num_classes) logits: ``<stage>_confusion_matrix.png`` (torchmetrics, over the whole split on
    every process) and ``<stage>_worst_predictions.png``, the ``num_images`` misclassified images with the lowest
    probability of their true class (from the first process's share)."""

    def reset(self) -> None:
        self.confusion: MulticlassConfusionMatrix | None = None
        self.confusion_counts: torch.Tensor | None = None
        self.worst: list[tuple[float, torch.Tensor, int, int]] = []  # (p(true class), image, true, predicted)

    def collect(self, trainer: Trainer, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        images, targets = batch["image"], batch["label"]
        if self.confusion is None:
            self.confusion = MulticlassConfusionMatrix(logits.shape[-1]).to(logits.device)
        self.confusion.update(logits, targets)
        probs = logits.detach().float().softmax(dim=-1)
        predicted = probs.argmax(dim=-1)
        true_prob = probs.gather(1, targets[:, None])[:, 0]
        for i in (predicted != targets).nonzero()[:, 0].tolist():
            self.worst.append((float(true_prob[i]), images[i].cpu(), int(targets[i]), int(predicted[i])))
        self.worst = sorted(self.worst, key=lambda item: item[0])[: self.num_images]

    def finish(self) -> None:
        # Every process updated the confusion matrix; computing it is a collective, so all of them do.
        self.confusion_counts = self.confusion.compute() if self.confusion is not None else None

    def write(self, trainer: Trainer, folder: Path, stage: str) -> None:
        if self.confusion_counts is None:
            return
        names = getattr(trainer.datamodule, "class_names", None)
        num_classes = self.confusion_counts.shape[0]
        annotate = num_classes <= MAX_ANNOTATED_CLASSES
        figure, ax = self.confusion.plot(
            self.confusion_counts.cpu(), add_text=annotate, labels=list(names) if annotate and names else None
        )
        side = max(6.0, num_classes * 0.5) if annotate else 10.0
        figure.set_size_inches(side, side)
        ax.set(xlabel="predicted", ylabel="true")
        _save_figure(figure, folder / f"{stage}_confusion_matrix.png")
        if not self.worst:
            return
        columns = min(4, len(self.worst))
        rows = math.ceil(len(self.worst) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (true_prob, image, true, predicted) in zip(axes.flat, self.worst):
            ax.imshow(_displayable(image).permute(1, 2, 0).numpy())
            ax.set_title(
                f"true {_class_name(names, true)} ({true_prob:.2f})\npredicted {_class_name(names, predicted)}",
                fontsize=8,
            )
        _save_figure(figure, folder / f"{stage}_worst_predictions.png")


class PairPictures(EvaluationPictures):
    """``<stage>_predictions.png``: the first ``num_images`` images, ground truth left and prediction right; a
    subclass draws the pair of one image (``draw_pairs``)."""

    def reset(self) -> None:
        self.pairs: list[torch.Tensor] = []  # uint8 (3, H, W) ground truth, then prediction, per image

    def collect(self, trainer: Trainer, outputs: list, batch: dict[str, Any]) -> None:
        if len(self.pairs) < 2 * self.num_images:
            self.pairs += self.draw_pairs(outputs, batch, getattr(trainer.datamodule, "class_names", None))

    def draw_pairs(self, outputs: list, batch: dict[str, Any], names: list[str] | None) -> list[torch.Tensor]:
        """Ground truth, then prediction, for each image of the batch: uint8 (3, H, W) pictures."""
        raise NotImplementedError

    def write(self, trainer: Trainer, folder: Path, stage: str) -> None:
        if not self.pairs:
            return
        path = folder / f"{stage}_predictions.png"
        height = max(image.shape[-2] for image in self.pairs)
        width = max(image.shape[-1] for image in self.pairs)
        padded = [F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])) for image in self.pairs]
        grid = make_grid(torch.stack(padded).float() / 255, nrow=2, padding=4, pad_value=1.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        rank_zero_info(f"Wrote {path} (left: ground truth, right: prediction)")


class DetectionPictures(PairPictures):
    """``PairPictures`` of boxes (and masks) with their class names; detections below ``score_threshold`` are not
    drawn."""

    def __init__(self, num_images: int = 8, score_threshold: float = 0.5) -> None:
        super().__init__(num_images)
        self.score_threshold = score_threshold

    def draw_pairs(self, predictions: list[dict], batch: dict[str, Any], names: list[str] | None) -> list[torch.Tensor]:
        pairs = []
        for image, target, prediction in zip(batch["image"], batch["target"], predictions):
            keep = prediction["scores"] >= self.score_threshold
            kept = {key: value[keep] for key, value in prediction.items() if torch.is_tensor(value)}  # not image_id
            for objects, scores in ((target, None), (kept, prediction["scores"])):
                drawn = _displayable(image)
                if "masks" in objects and len(objects["masks"]):
                    drawn = draw_segmentation_masks(drawn, objects["masks"].bool().cpu(), alpha=0.4)
                labels = [_class_name(names, int(label)) for label in objects["labels"]]
                if scores is not None:
                    labels = [f"{label} {score:.2f}" for label, score in zip(labels, scores[keep].tolist())]
                boxes = objects["boxes"].as_subclass(torch.Tensor).detach().cpu()
                pairs.append(draw_bounding_boxes(drawn, boxes, labels, colors="lime", width=2))
        return pairs


class SegmentationPictures(PairPictures):
    """``PairPictures`` of label maps in fixed class colours over the image."""

    def draw_pairs(
        self, label_maps: list[torch.Tensor], batch: dict[str, Any], names: list[str] | None
    ) -> list[torch.Tensor]:
        num_classes = len(names) if names is not None else int(max(int(m.max()) for m in label_maps)) + 1
        colours = _palette(num_classes)
        classes = torch.arange(num_classes)[:, None, None]
        pairs = []
        for image, mask, predicted in zip(batch["image"], batch["mask"], label_maps):
            # The image was resized to the test scale; masks and predictions are at the original size.
            resized = F.interpolate(image[None].float(), size=mask.shape[-2:], mode="bilinear")[0]
            drawn = _displayable(resized)
            for labels in (mask, predicted):
                pairs.append(draw_segmentation_masks(drawn, labels.cpu() == classes, alpha=0.6, colors=colours))
        return pairs
