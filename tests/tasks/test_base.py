"""The shape every task shares (``SwinTask``): stage-prefixed metric keys, num_classes, saved hyperparameters and
the prediction writer each task attaches itself."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer

from swinlab.data import ADE20KDataModule, COCODataModule, FashionMNISTDataModule
from swinlab.prediction import (
    ClassificationPredictionWriter,
    DetectionPredictionWriter,
    SegmentationPredictionWriter,
    output_path,
)
from swinlab.tasks import ClassificationTask, DetectionTask, SegmentationTask, SwinTask
from tests.helpers import TINY_SWIN, load_script

DENSE_BACKBONE = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}
TASKS = ("classification", "detection", "segmentation")
WRITERS = {
    "classification": (ClassificationPredictionWriter, "output_file", "predictions.csv"),
    "detection": (DetectionPredictionWriter, "output_dir", "predictions"),
    "segmentation": (SegmentationPredictionWriter, "output_dir", "predictions"),
}


def tiny_task(name: str, num_classes: int, **kwargs) -> SwinTask:
    torch.manual_seed(0)
    if name == "classification":
        return ClassificationTask(backbone_kwargs={**TINY_SWIN, "in_chans": 1}, num_classes=num_classes, **kwargs)
    if name == "detection":
        heads = {"fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 16, "min_size": 64, "max_size": 64}
        return DetectionTask(num_classes=num_classes, backbone_kwargs=DENSE_BACKBONE, **heads, **kwargs)
    return SegmentationTask(
        num_classes=num_classes, backbone_kwargs=DENSE_BACKBONE, decode_channels=8, aux_channels=8, **kwargs
    )


@pytest.fixture
def task_and_data(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[SwinTask, LightningDataModule]:
    """A tiny task of kind ``request.param`` and its data module on a few generated images."""
    name = request.param
    if name == "classification":
        data: LightningDataModule = FashionMNISTDataModule(
            str(request.getfixturevalue("fashion_mnist_dir")), val_size=8, batch_size=4, num_workers=0
        )
        return tiny_task(name, 10), data
    if name == "detection":
        root = tmp_path / "shapes_coco"
        args = ["--out", str(root), "--num-train", "2", "--num-val", "2", "--size", "64"]
        load_script("make_shapes_coco").main([*args, "--min-radius", "6", "--max-radius", "14"])
        data = COCODataModule(str(root), batch_size=2, num_workers=0)
        data.setup("validate")
        return tiny_task(name, data.num_classes), data
    root = tmp_path / "shapes_segmentation"
    load_script("make_shapes_segmentation").write_dataset(root, num_train=2, num_val=2, size=48, seed=0)
    data = ADE20KDataModule(
        str(root),
        class_names=["a", "b", "c", "d"],
        crop_size=32,
        scale=(128, 32),
        test_scale=(128, 40),
        batch_size=2,
        num_workers=0,
    )
    return tiny_task(name, 4), data


@pytest.mark.parametrize("task_and_data", TASKS, indirect=True)
def test_every_task_logs_train_val_and_test_keys_in_their_stage(task_and_data, tmp_path: Path) -> None:
    task, data = task_and_data
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        limit_test_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    fit_keys = set(trainer.logged_metrics)
    assert "train/loss" in fit_keys and any(key.startswith("val/") for key in fit_keys), fit_keys
    assert all(key.startswith(("train/", "val/")) for key in fit_keys), fit_keys
    (validated,) = trainer.validate(task, datamodule=data)
    (tested,) = trainer.test(task, datamodule=data)
    assert validated and all(key.startswith("val/") for key in validated), validated
    assert tested and all(key.startswith("test/") for key in tested), tested
    assert {key.removeprefix("test/") for key in tested} == {key.removeprefix("val/") for key in validated}


@pytest.mark.parametrize("name", TASKS)
def test_every_task_saves_its_init_arguments_but_the_run_time_options(name: str) -> None:
    """The checkpoint's hyperparameters rebuild the network; the optimizer callables and run-time options (where
    predictions go, test-time augmentation) stay out, so the command line can still set them on ``--ckpt_path``."""
    task = tiny_task(name, 3)
    assert task.num_classes == task.hparams.num_classes == 3
    arguments = set(inspect.signature(type(task)).parameters)
    assert set(task.hparams) == arguments - {"optimizer", "lr_scheduler", *type(task).hparams_ignore}
    assert {"predictions_file", "predictions_dir"} & set(type(task).hparams_ignore)


@pytest.mark.parametrize("name", TASKS)
def test_every_task_attaches_its_writer_into_the_run_folder(name: str, tmp_path: Path) -> None:
    writer_class, attribute, default = WRITERS[name]
    run = SimpleNamespace(default_root_dir=str(tmp_path / "run"))
    (writer,) = tiny_task(name, 3).configure_callbacks()
    assert type(writer) is writer_class and output_path(run, getattr(writer, attribute)) == tmp_path / "run" / default
    argument = "predictions_file" if name == "classification" else "predictions_dir"
    (moved,) = tiny_task(name, 3, **{argument: str(tmp_path / "elsewhere")}).configure_callbacks()
    assert output_path(run, getattr(moved, attribute)) == tmp_path / "elsewhere"


def test_layer_decay_needs_no_head_of_its_own() -> None:
    """``backbone_path`` tells the base where the Swin blocks are; everything else gets the full lr."""
    task = tiny_task("segmentation", 3, layer_decay=0.5)
    scale_of = {name: group["lr_scale"] for group in task.parameter_groups() for name in group["names"]}
    assert scale_of["decode_head.fpn_bottleneck.0.weight"] == 1.0
    assert scale_of["backbone.patch_embed.proj.weight"] == pytest.approx(0.5**task.backbone.num_lr_layers)
