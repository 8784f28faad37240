"""Default loggers and pictures: TensorBoard + CSV in one version folder, curves after fit, evaluation pictures."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from PIL import Image

from swinlab.cli import main
from swinlab.plots import (
    ClassificationPictures,
    DetectionPictures,
    SegmentationPictures,
    plot_training_curves,
    read_metrics_csv,
)
from tests.helpers import REPO, TINY_SWIN
from tests.tasks.test_base import TASKS, task_and_data  # noqa: F401  (fixture)

QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


def quickstart_args(fashion_mnist_dir: Path, root: Path) -> list[str]:
    return [
        "--config",
        str(QUICKSTART),
        *CPU,
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        f"--model.init_args.backbone_kwargs={json.dumps({**TINY_SWIN, 'in_chans': 1})}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
    ]


def test_fit_logs_tensorboard_and_csv_into_one_folder_and_draws_the_curves(fashion_mnist_dir, tmp_path, caplog):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exists and is not empty")
        main(["fit", *quickstart_args(fashion_mnist_dir, tmp_path)])
    (version,) = (tmp_path / "lightning_logs").iterdir()
    assert list(version.glob("events.out.tfevents.*")), "no TensorBoard event file"
    series = read_metrics_csv(version / "metrics.csv")
    assert {"train/loss", "val/loss", "val/top1", "train/lr"} <= set(series)
    with Image.open(version / "curves.png") as image:
        # Three panels side by side: losses, the monitored val/top1, the learning rate.
        assert image.width > 2.5 * image.height
    assert f"Wrote {version / 'curves.png'}" in caplog.messages


def test_read_metrics_csv_keeps_each_metric_at_its_steps(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/top1,train/lr\n0,0,2.5,,0.001\n0,1,2.0,,0.002\n0,1,,0.25,\n")
    assert read_metrics_csv(path) == {
        "train/loss": [(0, 2.5), (1, 2.0)],
        "train/lr": [(0, 0.001), (1, 0.002)],
        "val/top1": [(1, 0.25)],
    }


def test_curves_panels_follow_the_metrics_present(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/top1\n0,0,2.5,\n0,1,,0.25\n")
    two = Image.open(plot_training_curves(path, tmp_path / "two.png", monitor="val/top1"))
    one = Image.open(plot_training_curves(path, tmp_path / "one.png", monitor=None))
    assert two.width > 1.7 * one.width  # loss and val/top1 panels; then loss only (no lr column)
    path.write_text("epoch,step,val/box_map\n0,0,0.1\n")
    assert plot_training_curves(path, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_worst_predictions_are_the_misclassified_with_the_lowest_true_probability():
    pictures = ClassificationPictures(num_images=2)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    targets = torch.tensor([0, 1, 0, 1])
    # Predicted 0, 0, 1, 0: right; wrong with p(true) 0.27; wrong with p(true) ~ 0; wrong with p(true) 0.5.
    logits = torch.tensor([[5.0, 0.0], [1.0, 0.0], [-9.0, 9.0], [0.0, 0.0]])
    pictures.collect(None, logits, {"image": images, "label": targets})
    assert [(item[2], item[3]) for item in pictures.worst] == [(0, 1), (1, 0)]
    assert [float(item[1][0, 0, 0]) for item in pictures.worst] == [2.0, 1.0]
    assert pictures.worst[0][0] == pytest.approx(torch.tensor([-9.0, 9.0]).softmax(0)[0].item())
    torch.testing.assert_close(pictures.confusion.compute(), torch.tensor([[1, 1], [2, 0]]))


@pytest.mark.parametrize("task_and_data", TASKS, indirect=True)
def test_validate_and_test_write_evaluation_pictures(task_and_data, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    task, data = task_and_data
    name = task_and_data_name(task)
    pictures = {
        "classification": ClassificationPictures(num_images=2),
        "detection": DetectionPictures(num_images=2, score_threshold=0.0),
        "segmentation": SegmentationPictures(num_images=2),
    }[name]
    monkeypatch.setattr(task, "configure_callbacks", list)  # the task's own pictures would replace these
    trainer = Trainer(
        accelerator="cpu",
        limit_val_batches=2,  # segmentation evaluates one image per batch, detection two
        limit_test_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[pictures],
    )
    trainer.validate(task, datamodule=data)
    trainer.test(task, datamodule=data)
    for stage in ("val", "test"):
        if name == "classification":
            assert (tmp_path / f"{stage}_confusion_matrix.png").stat().st_size > 0
            # Random weights on random pixels: some of the 4 images are wrong.
            assert (tmp_path / f"{stage}_worst_predictions.png").stat().st_size > 0
        else:
            with Image.open(tmp_path / f"{stage}_predictions.png") as grid:
                # Two images, ground truth | prediction: 2 rows x 2 columns with 4 px padding.
                sample = data.val_dataloader().dataset[0]
                # Segmentation draws at the label map's size, detection at the image's.
                height, width = sample["mask" if name == "segmentation" else "image"].shape[-2:]
                assert (grid.width, grid.height) == (2 * width + 12, 2 * height + 12)


def task_and_data_name(task) -> str:
    return type(task).__name__.removesuffix("Task").lower()


@pytest.mark.parametrize(
    ("class_path", "option", "value"),
    [
        ("lightning.pytorch.loggers.MLFlowLogger", "tracking_uri", "file:./mlruns"),
        ("lightning.pytorch.loggers.WandbLogger", "offline", True),
    ],
    ids=["mlflow", "wandb-offline"],
)
def test_another_tracker_is_one_config_line_away(class_path, option, value, capsys):
    """The config resolves without the tracker installed (it is imported when the run starts)."""
    args = [f"--trainer.logger={class_path}", f"--trainer.logger.{option}={json.dumps(value).strip(chr(34))}"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICKSTART), *args, "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
    assert resolved["class_path"] == class_path and resolved["init_args"][option] == value
