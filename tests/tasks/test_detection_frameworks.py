"""DetectionTask with each framework of build_detector, the 3x augmentation of COCODataModule, predict on a folder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from swinlab.cli import main
from swinlab.data.coco import COCODataModule
from swinlab.models.cascade_rcnn import CascadeRCNN
from swinlab.tasks.detection import DetectionTask
from tests.helpers import REPO, TINY_BACKBONE, load_script

QUICKSTART = REPO / "configs" / "detection" / "quickstart_shapes.yaml"
SIZE = 64
TINY_HEADS = {"fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 16, "min_size": SIZE, "max_size": SIZE}
# The 3x augmentation scaled to 64 px images.
SMALL_AUGMENT = {
    "train_sizes": [48, 56, 64],
    "train_max_size": 100,
    "crop_resize_sizes": [40, 48],
    "crop_size": [32, 48],
}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    args = ["--out", str(root), "--num-train", "4", "--num-val", "3", "--size", str(SIZE)]
    load_script("make_shapes_coco").main([*args, "--min-radius", "6", "--max-radius", "14"])
    return root


def tiny_run(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """The quickstart config shrunk to a seconds-long CPU run on the tiny shapes set."""
    return [
        "--config",
        str(QUICKSTART),
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.callbacks=[]",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--model.init_args.backbone_kwargs={json.dumps(TINY_BACKBONE)}",
        *(f"--model.init_args.{key}={value}" for key, value in TINY_HEADS.items()),
        f"--data.init_args.root={data_root}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        *extra,
    ]


def logged(run_dir: Path) -> dict[str, float]:
    """Every metric of the run's metrics.csv, last value of each."""
    (metrics_file,) = run_dir.rglob("metrics.csv")
    values: dict[str, float] = {}
    for row in csv.DictReader(metrics_file.open()):
        values |= {key: float(value) for key, value in row.items() if value not in ("", None)}
    return values


def test_cascade_mask_rcnn_trains_and_evaluates_end_to_end(shapes_root: Path, tmp_path: Path) -> None:
    steps = ["--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", "--trainer.log_every_n_steps=1"]
    cli = main(["fit", *tiny_run(shapes_root, tmp_path, "--model.init_args.framework=cascade_mask_rcnn", *steps)])
    assert isinstance(cli.model.detector, CascadeRCNN) and cli.model.detector.roi_heads.has_mask
    assert cli.trainer.global_step == 4  # 4 training images, batch 2, 2 epochs
    metrics = logged(tmp_path)
    for stage in range(3):  # every cascade stage trains its classifier, GIoU box regression and mask head
        for loss in ("loss_classifier", "loss_box_giou", "loss_mask"):
            assert math.isfinite(metrics[f"train/{loss}_s{stage}"]), (loss, stage)
    for key in ("box_map", "box_map_50", "box_map_75", "mask_map", "mask_map_50"):
        assert -1.0 <= metrics[f"val/{key}"] <= 1.0, key


@pytest.mark.parametrize("framework", ["retinanet", "fcos"])
def test_one_stage_frameworks_train_a_few_steps_in_the_task(
    framework: str, shapes_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cli = main(
        [
            "fit",
            *tiny_run(shapes_root, tmp_path, f"--model.init_args.framework={framework}"),
            "--model.init_args.fpn_channels=64",  # FCOS's GroupNorm(32, channels): 2 channels a group on 1x1 maps
            "--trainer.max_steps=3",
            "--trainer.max_epochs=-1",
            "--trainer.check_val_every_n_epoch=1",
            "--trainer.log_every_n_steps=1",
        ]
    )
    task = cli.model
    assert task.framework == framework and not task.has_masks
    assert cli.trainer.global_step == 3
    # The quickstart's R-CNN detector_kwargs are left out, by name, instead of failing the run.
    assert "rpn_batch_size_per_image" in caplog.text
    metrics = logged(tmp_path)
    assert math.isfinite(metrics["train/classification"]) and math.isfinite(metrics["train/bbox_regression"])
    assert -1.0 <= metrics["val/box_map"] <= 1.0 and "val/mask_map" not in metrics


def test_masks_false_drops_the_mask_head_of_either_mask_framework() -> None:
    plain = DetectionTask(num_classes=2, masks=False, backbone_kwargs=TINY_BACKBONE, **TINY_HEADS)
    assert plain.framework == "faster_rcnn" and plain.detector.roi_heads.mask_head is None
    cascade = DetectionTask(
        num_classes=2, framework="cascade_mask_rcnn", masks=False, backbone_kwargs=TINY_BACKBONE, **TINY_HEADS
    )
    assert cascade.framework == "cascade_rcnn" and not cascade.detector.roi_heads.has_mask


def test_an_unknown_framework_or_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown detection framework 'yolo'"):
        DetectionTask(num_classes=2, framework="yolo", backbone_kwargs=TINY_BACKBONE, **TINY_HEADS)
    with pytest.raises(TypeError, match=r"unknown options \['score_treshold'\]"):
        DetectionTask(
            num_classes=2,
            framework="fcos",
            detector_kwargs={"score_treshold": 0.1, "rpn_batch_size_per_image": 8},
            backbone_kwargs=TINY_BACKBONE,
            **TINY_HEADS,
        )


def test_layer_decay_scales_only_the_swin_body_of_a_cascade() -> None:
    task = DetectionTask(
        num_classes=2, framework="cascade_mask_rcnn", layer_decay=0.5, backbone_kwargs=TINY_BACKBONE, **TINY_HEADS
    )
    scale_of = {name: group["lr_scale"] for group in task.parameter_groups() for name in group["names"]}
    heads = [scale for name, scale in scale_of.items() if name.startswith("detector.roi_heads.stages.")]
    assert heads and set(heads) == {1.0}
    body = [scale for name, scale in scale_of.items() if name.startswith("detector.backbone.body.")]
    assert min(body) < max(body) <= 1.0


def test_multiscale_crop_augmentation_resizes_and_the_detector_does_not_resize_again(
    shapes_root: Path, tmp_path: Path
) -> None:
    dm = COCODataModule(str(shapes_root), num_workers=0, train_augment="multiscale_crop", **SMALL_AUGMENT)
    dm.setup("fit")
    torch.manual_seed(0)
    short_sides = {min(dm.train_set[i]["image"].shape[-2:]) for i in range(len(dm.train_set)) for _ in range(4)}
    assert short_sides <= {32, 40, 48, 56, 64} and short_sides - {SIZE}, short_sides  # never the detector's size
    assert dm.train_resizes and not COCODataModule(str(shapes_root), num_workers=0).train_resizes

    augment = [f"--data.init_args.{key}={json.dumps(value)}" for key, value in SMALL_AUGMENT.items()]
    run = tiny_run(shapes_root, tmp_path, "--data.init_args.train_augment=multiscale_crop", *augment)
    cli = main(["fit", *run, "--trainer.fast_dev_run=1"])
    assert cli.model.detector.transform._skip_resize
    with pytest.raises(ValueError, match="train_augment must be 'flip' or 'multiscale_crop'"):
        COCODataModule(str(shapes_root), train_augment="mosaic")


def write_images(folder: Path, shapes_root: Path) -> list[str]:
    """Three shapes images with a corrupt file in the middle (sorted order): returns the file names."""
    folder.mkdir()
    sources = sorted((shapes_root / "val2017").glob("*.png"))
    Image.open(sources[0]).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png at all")
    (folder / "sub").mkdir()
    Image.open(sources[1]).save(folder / "sub" / "c.jpg", quality=95)
    return ["a.png", "b.png", "sub/c.jpg"]


def test_predict_on_a_folder_marks_an_unreadable_file_and_keeps_the_others_own(
    shapes_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    files = write_images(folder, shapes_root)
    run = tiny_run(
        shapes_root,
        tmp_path / "run",
        f"--data.init_args.predict_dir={folder}",
        "--model.init_args.detector_kwargs={box_score_thresh: 0.0}",
    )
    cli = main(["predict", *run])
    out = tmp_path / "run" / "predictions"
    images = json.loads((out / "images.json").read_text())
    assert [(entry["id"], entry["file_name"]) for entry in images] == list(enumerate(files))
    assert images[0]["error"] == images[2]["error"] == ""
    assert "b.png" in images[1]["error"] and "unreadable" in images[1]["error"]
    assert (images[2]["width"], images[2]["height"]) == (SIZE, SIZE)

    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {0, 2}, "the unreadable file has no detections, the others have"
    assert sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png")) == [
        "a.png",
        "sub/c.png",
    ]
    # Image 2's detections are those of c.jpg itself, not of a neighbour shifted into the corrupt file's place.
    task = cli.model.eval()
    with torch.no_grad():
        (expected,) = task([pil_to_tensor(Image.open(folder / "sub" / "c.jpg").convert("RGB")).float() / 255])
    written = sorted((r["score"], r["bbox"]) for r in results if r["image_id"] == 2)
    ours = sorted(
        (float(s), [b[0], b[1], b[2] - b[0], b[3] - b[1]])
        for s, b in zip(expected["scores"], expected["boxes"].tolist())
    )
    assert len(written) == len(ours) > 0
    np.testing.assert_allclose([s for s, _ in written], [s for s, _ in ours], rtol=1e-5)
    np.testing.assert_allclose([b for _, b in written], [b for _, b in ours], rtol=1e-4, atol=1e-3)
