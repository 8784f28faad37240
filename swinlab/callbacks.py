"""Lightning callbacks that swinlab tasks attach themselves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class ClassificationPredictionWriter(BasePredictionWriter):
    """Writes one CSV row per predicted image: ``file, class_1, prob_1, ..., class_k, prob_k`` (top-k, best first).

    ``predict_step`` must return ``{"files": list[str], "probs": (B, k), "indices": (B, k)}``; class names come from
    the data module's ``class_names``. Under DDP every rank holds a part of the files; rank 0 gathers them and
    writes one file, sorted by file name. A relative ``output_file`` is placed in ``trainer.default_root_dir``.
    """

    def __init__(self, output_file: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        class_names = getattr(trainer.datamodule, "class_names", None)
        rows = []
        for batch in predictions:
            for file, probs, indices in zip(batch["files"], batch["probs"].tolist(), batch["indices"].tolist()):
                row: list[Any] = [file]
                for prob, index in zip(probs, indices):
                    row += [class_names[index] if class_names else index, f"{prob:.6f}"]
                rows.append(row)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[list] = [[] for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not trainer.is_global_zero:
            return
        rows.sort(key=lambda row: row[0])
        path = Path(self.output_file)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        path.parent.mkdir(parents=True, exist_ok=True)
        top_k = (len(rows[0]) - 1) // 2 if rows else 0
        header = ["file"] + [f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "prob")]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        rank_zero_info(f"Wrote {len(rows)} predictions to {path}")

