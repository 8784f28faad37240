"""The shape every task shares (``SwinTask``): stage-prefixed metric keys, num_classes, saved hyperparameters and
the prediction writer each task attaches itself."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.utilities.model_summary import ModelSummary

from swinlab.cli import main
from swinlab.data import COCODataModule, FashionMNISTDataModule, SegmentationDataModule
from swinlab.models import create_model
from swinlab.models.flops import count_macs
from swinlab.plots import ClassificationPictures, DetectionPictures, SegmentationPictures, read_metrics_csv
from swinlab.prediction import (
    ClassificationPredictionWriter,
    DetectionPredictionWriter,
    SegmentationPredictionWriter,
    output_path,
)
from swinlab.tasks import ClassificationTask, DetectionTask, SegmentationTask, SwinTask
from tests.helpers import REPO, TINY_SWIN, load_script

DENSE_BACKBONE = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}
TASKS = ("classification", "detection", "segmentation")
WRITERS = {
    "classification": (ClassificationPredictionWriter, "output_file", "predictions.csv"),
    "detection": (DetectionPredictionWriter, "output_dir", "predictions"),
    "segmentation": (SegmentationPredictionWriter, "output_dir", "predictions"),
}
PICTURES = {
    "classification": ClassificationPictures,
    "detection": DetectionPictures,
    "segmentation": SegmentationPictures,
}
# The picture each task draws after validate and test (besides the confusion matrix of classification).
PICTURE_FILES = {
    "classification": "confusion_matrix.png",
    "detection": "predictions.png",
    "segmentation": "predictions.png",
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
    data = SegmentationDataModule(
        str(root),
        class_names=["a", "b", "c", "d"],
        reduce_zero_label=True,
        crop_size=32,
        scale=(128, 32),
        test_scale=(128, 40),
        batch_size=2,
        num_workers=0,
    )
    return tiny_task(name, 4), data


@pytest.mark.parametrize("task_and_data", TASKS, indirect=True)
def test_every_task_logs_train_val_and_test_keys_in_their_stage(task_and_data, request, tmp_path: Path) -> None:
    """... and its own pictures after validate and test (``configure_callbacks``), none after fit's validation."""
    task, data = task_and_data
    picture = PICTURE_FILES[request.node.callspec.params["task_and_data"]]
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
    # Every task logs the step's lr (the curves picture draws it): at most the schedule's peak.
    peak = max(group.get("initial_lr", group["lr"]) for group in trainer.optimizers[0].param_groups)
    assert 0 < trainer.logged_metrics["train/lr"] <= peak
    assert all(key.startswith(("train/", "val/")) for key in fit_keys), fit_keys
    assert not list(tmp_path.glob("*.png")), "no pictures from the validation inside fit"
    (validated,) = trainer.validate(task, datamodule=data)
    (tested,) = trainer.test(task, datamodule=data)
    assert (tmp_path / f"val_{picture}").is_file() and (tmp_path / f"test_{picture}").is_file()
    assert validated and all(key.startswith("val/") for key in validated), validated
    assert tested and all(key.startswith("test/") for key in tested), tested
    assert {key.removeprefix("test/") for key in tested} == {key.removeprefix("val/") for key in validated}


def test_shared_arguments_are_keyword_only_and_read_from_the_hyperparameters() -> None:
    """A task passes SwinTask only what stays out of the hyperparameters, by keyword; the rest SwinTask reads from
    ``hparams``, which Lightning collects from the task's own signature."""
    parameters = inspect.signature(SwinTask.__init__).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters if p.name != "self")
    task = tiny_task("classification", 3, layer_decay=0.5)
    assert task.hparams.layer_decay == 0.5 and task.hparams.backbone == "swin_t"
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        tiny_task("classification", 0)


@pytest.mark.parametrize("name", TASKS)
def test_every_task_saves_its_init_arguments_but_the_run_time_options(name: str) -> None:
    """The checkpoint's hyperparameters rebuild the network; the optimizer callables and run-time options (where
    predictions go, test-time augmentation) stay out, so the command line can still set them on ``--ckpt_path``."""
    task = tiny_task(name, 3)
    assert task.num_classes == task.hparams.num_classes == 3
    arguments = set(inspect.signature(type(task)).parameters)
    run_time = {*type(task).hparams_ignore, *type(task).shared_run_time_options}
    assert set(task.hparams) == arguments - {"optimizer", "lr_scheduler", *run_time}
    assert {"predictions_file", "predictions_dir"} & set(type(task).hparams_ignore)


@pytest.mark.parametrize("name", TASKS)
def test_every_task_attaches_its_writer_into_the_run_folder_and_its_pictures(name: str, tmp_path: Path) -> None:
    writer_class, attribute, default = WRITERS[name]
    run = SimpleNamespace(default_root_dir=str(tmp_path / "run"))
    writer, pictures = tiny_task(name, 3).configure_callbacks()
    assert type(writer) is writer_class and output_path(run, getattr(writer, attribute)) == tmp_path / "run" / default
    assert type(pictures) is PICTURES[name]
    argument = "predictions_file" if name == "classification" else "predictions_dir"
    moved, _ = tiny_task(name, 3, **{argument: str(tmp_path / "elsewhere")}).configure_callbacks()
    assert output_path(run, getattr(moved, attribute)) == tmp_path / "elsewhere"


def test_layer_decay_needs_no_head_of_its_own() -> None:
    """``backbone_path`` tells the base where the Swin blocks are; everything else gets the full lr."""
    task = tiny_task("segmentation", 3, layer_decay=0.5)
    scale_of = {name: group["lr_scale"] for group in task.parameter_groups() for name in group["names"]}
    assert scale_of["decode_head.fpn_bottleneck.0.weight"] == 1.0
    assert scale_of["backbone.patch_embed.proj.weight"] == pytest.approx(0.5**task.backbone.num_lr_layers)


@pytest.mark.parametrize("name", TASKS)
def test_model_summary_counts_flops_from_the_example_input(name: str) -> None:
    """Lightning's summary runs ``example_input_array``; its FLOPs are at most 2 x our multiply-adds (Lightning's
    counter misses the CPU attention kernel that ``count_macs`` adds) and far from 0."""
    task = tiny_task(name, 3)
    flops = ModelSummary(task).total_flops
    if name == "detection":
        assert flops > 0
    else:
        macs = count_macs(task, task.example_image_shape())
        assert 0.5 * 2 * macs < flops <= 2 * macs


def test_compiled_task_trains_and_logs_throughput(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    """``compile: true`` (aot_eager: dynamo and AOTAutograd without inductor's C++ build) trains through the CLI,
    whose ThroughputMonitor logs images/s and FLOP/s = 6 x the multiply-adds of one image x images/s."""
    backbone_kwargs = {**TINY_SWIN, "in_chans": 1}
    args = [
        "fit",
        "--config",
        str(REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        f"--model.init_args.backbone_kwargs={json.dumps(backbone_kwargs)}",
        "--model.init_args.compile=true",
        '--model.init_args.compile_kwargs={"backend": "aot_eager"}',
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_model_summary=false",
        "--test_after_fit=false",
    ]
    cli = main(args)
    backbone = cli.model.backbone
    assert backbone._compiled_call_impl is not None and "compile" not in cli.model.hparams
    rows = read_metrics_csv(next(tmp_path.glob("lightning_logs/version_*/metrics.csv")))
    samples_per_sec = dict(rows["train/device/samples_per_sec"])
    flops_per_sec = dict(rows["train/device/flops_per_sec"])
    step = max(samples_per_sec)
    macs = count_macs(create_model("swin_t", num_classes=10, **backbone_kwargs), (1, 32, 32))
    assert flops_per_sec[step] == pytest.approx(6 * macs * samples_per_sec[step], rel=1e-6)
