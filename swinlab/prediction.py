"""Prediction writers, one per task; every task attaches its own in ``configure_callbacks``.

Each writer takes its output location from a task init argument (``predictions_file`` for classification,
``predictions_dir`` for detection and segmentation); a relative path lands in ``trainer.default_root_dir``, so by
default predictions go next to the run's checkpoints and logs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from swinlab.data.bad_samples import READ_ERROR_KEY


def output_path(trainer: Trainer, path: str | Path) -> Path:
    """``path`` itself if absolute, else ``path`` inside ``trainer.default_root_dir`` (the run's folder)."""
    path = Path(path)
    return path if path.is_absolute() else Path(trainer.default_root_dir) / path


def gather_rows(trainer: Trainer, rows: list) -> list:
    """Every rank's ``rows`` in one list (rank order), on every rank; ``rows`` itself outside DDP."""
    if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
        gathered: list[list] = [[] for _ in range(trainer.world_size)]
        dist.all_gather_object(gathered, rows)
        return [row for part in gathered for row in part]
    return rows


class ClassificationPredictionWriter(BasePredictionWriter):
    """Writes one CSV row per image: ``file, class_1, prob_1, ..., class_k, prob_k, error`` (top-k, best first).

    ``predict_step`` must return ``{"files": list[str], "probs": (n, k), "indices": (n, k), "failed": [(file,
    reason), ...]}``; a failed file (one that could not be read) gets a row with empty classes and the reason in
    ``error``, which is empty for every other row. Class names come from the data module's ``class_names``. Under DDP
    every rank holds a part of the files; rank 0 gathers them and writes one file, sorted by file name. A relative
    ``output_file`` is placed in ``trainer.default_root_dir``.
    """

    def __init__(self, output_file: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        class_names = getattr(trainer.datamodule, "class_names", None)
        top_k = max((batch["probs"].shape[-1] for batch in predictions), default=0)
        rows = []
        for batch in predictions:
            for file, probs, indices in zip(batch["files"], batch["probs"].tolist(), batch["indices"].tolist()):
                row: list[Any] = [file]
                for prob, index in zip(probs, indices):
                    row += [class_names[index] if class_names else index, f"{prob:.6f}"]
                rows.append([*row, ""])
            rows += [[file, *[""] * (2 * top_k), reason] for file, reason in batch["failed"]]
        rows = gather_rows(trainer, rows)
        if not trainer.is_global_zero:
            return
        rows.sort(key=lambda row: row[0])
        path = output_path(trainer, self.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = ["file"] + [f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "prob")]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*header, "error"])
            writer.writerows(rows)
        failed = sum(1 for row in rows if row[-1])
        rank_zero_info(f"Wrote {len(rows)} predictions to {path}" + (f" ({failed} failed)" if failed else ""))


class DetectionPredictionWriter(BasePredictionWriter):
    """Writes ``output_dir/results.json`` (COCO results format: original category ids, xywh boxes, RLE masks),
    ``output_dir/images.json`` (one entry per predicted image: ``id``, ``file_name``, ``width``, ``height`` and
    ``error``, "" or why its file could not be read) and, per readable image, ``output_dir/images/<file>.png``
    (``<file_name>`` with a .png suffix, or ``<image_id>.png`` without a file name) with the boxes, masks and
    labels above ``score_threshold`` drawn. An unreadable image has an ``images.json`` entry with its error and
    nothing else.

    Predictions are ``DetectionTask.predict_step``'s. Class names and category ids come from the data module
    (``class_names``, ``category_ids``). A relative ``output_dir`` is placed in ``trainer.default_root_dir``; under
    DDP each rank writes ``results_rank<r>.json`` and ``images_rank<r>.json``.
    """

    def __init__(self, output_dir: str = "predictions", score_threshold: float = 0.5, draw: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.score_threshold = score_threshold
        self.draw = draw
        self.results: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.results, self.images = [], []

    def _names(self, trainer: Trainer) -> tuple[list[int], list[str]]:
        datamodule = trainer.datamodule
        category_ids = getattr(datamodule, "category_ids", None)
        class_names = getattr(datamodule, "class_names", None)
        if category_ids is None or class_names is None:
            raise ValueError(
                "DetectionPredictionWriter needs a data module with category_ids and class_names "
                f"(swinlab.data.COCODataModule); got {type(datamodule).__name__}"
            )
        return category_ids, class_names

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        from pycocotools import mask as mask_utils

        category_ids, class_names = self._names(trainer)
        for image, det in zip(batch["image"], prediction):
            file_name, error = det.get("file_name"), det.get(READ_ERROR_KEY, "")
            height, width = image.shape[-2:]
            self.images.append(
                {"id": det["image_id"], "file_name": file_name, "width": width, "height": height, "error": error}
            )
            if error:
                continue
            boxes, scores, labels = det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu()
            masks = det["masks"].cpu() if "masks" in det else None
            for i in range(len(scores)):
                x1, y1, x2, y2 = boxes[i].tolist()
                entry = {
                    "image_id": det["image_id"],
                    "category_id": category_ids[int(labels[i])],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(scores[i]),
                }
                if masks is not None:
                    rle = mask_utils.encode(masks[i].numpy().astype("uint8", order="F"))
                    entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                self.results.append(entry)
            if self.draw:
                name = Path(file_name).with_suffix(".png") if file_name else Path(f"{det['image_id']:012d}.png")
                path = output_path(trainer, self.output_dir) / "images" / name
                self._draw(image.cpu(), boxes, scores, labels, masks, class_names, path)

    def _draw(
        self,
        image: torch.Tensor,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None,
        class_names: list[str],
        path: Path,
    ) -> None:
        from torchvision.io import write_png

        keep = scores >= self.score_threshold
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
        if masks is not None and keep.any():
            canvas = draw_segmentation_masks(canvas, masks[keep], alpha=0.5)
        texts = [f"{class_names[int(label)]} {float(score):.2f}" for label, score in zip(labels[keep], scores[keep])]
        canvas = draw_bounding_boxes(canvas, boxes[keep], labels=texts, colors="yellow", width=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(canvas, str(path))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = output_path(trainer, self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "" if trainer.world_size == 1 else f"_rank{trainer.global_rank}"
        (folder / f"results{suffix}.json").write_text(json.dumps(self.results))
        (folder / f"images{suffix}.json").write_text(json.dumps(self.images, indent=1))
        failed = sum(bool(image["error"]) for image in self.images)
        rank_zero_info(
            f"Wrote {len(self.results)} detections on {len(self.images) - failed} images to "
            f"{folder / f'results{suffix}.json'}; {failed} unreadable images listed with their error in "
            f"{folder / f'images{suffix}.json'}"
        )


def label_palette(num_classes: int) -> np.ndarray:
    """Distinct colours (num_classes, 3) uint8: the PASCAL VOC bit-interleaving palette, skipping black."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        label, colour = index + 1, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((label >> channel) & 1) << (7 - bit)
            label >>= 3
        palette[index] = colour
    return palette


class SegmentationPredictionWriter(BasePredictionWriter):
    """Writes, for every predicted image, ``<output_dir>/labels/<stem>.png`` (the label map, 8-bit, class
    index + ``label_offset``; 1 gives ADE20K's annotation numbering) and ``<output_dir>/overlays/<stem>.png``
    (the image blended with the class colours, ``alpha`` = colour weight), and ``<output_dir>/failed.csv``
    (``file, error``: the images that could not be read, header only when none). A relative ``output_dir`` is
    placed in ``trainer.default_root_dir``.

    ``predict_step`` must return, per image, ``{"file", "labels": (H, W) int64, "raw_image": (3, H, W) uint8}``, or
    ``{"file", "error"}`` for an image that could not be read.
    """

    def __init__(self, output_dir: str = "predictions", alpha: float = 0.5, label_offset: int = 0) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir, self.alpha, self.label_offset = output_dir, alpha, label_offset
        self.failed: list[tuple[str, str]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.failed = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        num_classes = pl_module.num_classes
        if num_classes + self.label_offset > 256:
            raise ValueError(
                f"8-bit label PNGs hold 256 values; num_classes {num_classes} + "
                f"label_offset {self.label_offset} is more"
            )
        palette = label_palette(num_classes)
        folder = output_path(trainer, self.output_dir)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        (folder / "overlays").mkdir(parents=True, exist_ok=True)
        for item in prediction:
            if item.get("error"):
                self.failed.append((item["file"], item["error"]))
                continue
            labels = item["labels"].numpy()
            stem = Path(item["file"]).stem
            Image.fromarray((labels + self.label_offset).astype(np.uint8)).save(folder / "labels" / f"{stem}.png")
            image = item["raw_image"].permute(1, 2, 0).numpy().astype(np.float32)
            overlay = (1 - self.alpha) * image + self.alpha * palette[labels].astype(np.float32)
            Image.fromarray(overlay.round().astype(np.uint8)).save(folder / "overlays" / f"{stem}.png")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        failed = sorted(gather_rows(trainer, self.failed))
        if not trainer.is_global_zero:
            return
        path = output_path(trainer, self.output_dir) / "failed.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "error"])
            writer.writerows(failed)
        if failed:
            rank_zero_info(f"{len(failed)} images could not be read, listed in {path}")
