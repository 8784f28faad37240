"""Detection export: every framework's ONNX graph gives PyTorch's detections and COCO AP through the task."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import yaml
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from swinlab.data.coco import COCODataModule
from swinlab.deploy.detection import ExportedDetector, export_detector
from swinlab.tasks.detection import DetectionTask
from swinlab.validation import ConfigError
from tests.helpers import REPO, TINY_BACKBONE, load_script

# 72 px: Swin maps of 18, 9, 5 and 3 tokens, none a multiple of the window (4): padded windows everywhere.
SIZE = 72
FRAMEWORKS = ("mask_rcnn", "faster_rcnn", "cascade_mask_rcnn", "retinanet", "fcos")
# Few detections per image at any score: random weights still detect, and masks and AP stay cheap.
DETECTIONS = {
    "two_stage": {"box_score_thresh": 0.0, "box_detections_per_img": 20},
    "one_stage": {"score_thresh": 0.0, "detections_per_img": 20},
}
HEADS = {"box_head_dim": 32, "mask_head_channels": 16, "min_size": SIZE, "max_size": SIZE}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> COCODataModule:
    root = tmp_path_factory.mktemp("shapes")
    args = ["--out", str(root), "--num-train", "1", "--num-val", "3", "--size", str(SIZE)]
    load_script("make_shapes_coco").main([*args, "--min-radius", "6", "--max-radius", "14"])
    data = COCODataModule(str(root), num_workers=0, batch_size=2)
    data.setup("validate")
    return data


def tiny_task(framework: str, num_classes: int) -> DetectionTask:
    """Random weights, head weights spread out so that scores differ (RetinaNet's prior-initialised head gives
    near-equal scores, whose order no two runtimes need to agree on); one-stage box regression left as initialised
    (spread, it collapses most boxes onto the image border)."""
    torch.manual_seed(0)
    one_stage = framework in ("retinanet", "fcos")
    task = DetectionTask(
        num_classes=num_classes,
        framework=framework,
        backbone_kwargs=TINY_BACKBONE,
        detector_kwargs=DETECTIONS["one_stage" if one_stage else "two_stage"],
        fpn_channels=64 if one_stage else 16,  # the one-stage heads' GroupNorm(32, channels)
        **HEADS,
    )
    with torch.no_grad():
        for name, param in task.detector.named_parameters():
            if not name.startswith(("backbone.body.", "head.regression_head.")):  # spread one-stage boxes collapse
                param.add_(0.05 * torch.randn_like(param))
    return task.eval()


def onnx_runner(path: Path) -> ExportedDetector:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # the traced mask-pasting loop's shape hints warn on every detection
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ExportedDetector(lambda image: session.run(None, {"image": image}), (SIZE, SIZE), name=str(path))


@pytest.fixture(scope="module", params=FRAMEWORKS)
def exported(
    request: pytest.FixtureRequest, shapes: COCODataModule, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DetectionTask, ExportedDetector]:
    task = tiny_task(request.param, shapes.num_classes)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    export_detector(task, path, (SIZE, SIZE))
    return task, onnx_runner(path)


def test_onnx_gives_the_detections_of_pytorch(exported: tuple[DetectionTask, ExportedDetector]) -> None:
    task, runtime = exported
    torch.manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    with torch.no_grad():
        expected = task.detector(images)
    for ours, theirs in zip(runtime(images), expected):
        assert set(ours) == set(theirs) == {"boxes", "labels", "scores"} | ({"masks"} if task.has_masks else set())
        assert len(theirs["scores"]) > 0
        torch.testing.assert_close(ours["labels"], theirs["labels"], rtol=0, atol=0)
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=1e-3 * SIZE)
        if task.has_masks:
            assert ours["masks"].shape == (len(theirs["scores"]), 1, SIZE, SIZE)
            torch.testing.assert_close(ours["masks"], theirs["masks"], rtol=0, atol=1e-4)


def pseudo_truth(task: DetectionTask, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Ground truth from PyTorch's own detections (``forward``): the 1st, 3rd, .., 9th best per image. PyTorch's AP
    is then well inside (0, 1) (its other detections are false positives ranked among the true ones), so any
    difference in boxes, labels, score order or masks moves it (random weights score 0 AP on the real shapes)."""
    with torch.no_grad():
        detections = task(images)
    targets = []
    for detection in detections:
        boxes = detection["boxes"][0:10:2]
        target = {
            "boxes": boxes,
            "labels": detection["labels"][0:10:2],
            "iscrowd": torch.zeros(len(boxes), dtype=torch.long),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        }
        if "masks" in detection:
            target["masks"] = detection["masks"][0:10:2]
        targets.append(target)
    return targets


def coco_ap(task: DetectionTask, batches: list[dict]) -> dict[str, float]:
    """The task's own validation metrics (box and, for mask models, mask AP) over ``batches``."""
    for index, batch in enumerate(batches):
        with torch.no_grad():
            task.validation_step(batch, index)
    results = task.val_metrics.compute()
    task.val_metrics.reset()
    return {key: float(value) for key, value in results.items() if "map" in key}


def test_onnx_gives_the_coco_ap_of_pytorch(
    exported: tuple[DetectionTask, ExportedDetector], shapes: COCODataModule
) -> None:
    task, runtime = exported
    batches = [
        {"image": batch["image"], "target": pseudo_truth(task, batch["image"])} for batch in shapes.val_dataloader()
    ]
    expected = coco_ap(task, batches)
    detector = task.detector
    task.detector = runtime
    try:
        ours = coco_ap(task, batches)
    finally:
        task.detector = detector
    keys = ("bbox_map", "segm_map") if task.has_masks else ("map",)
    assert all(0.05 < expected[key] < 0.95 for key in keys), expected
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=0.005), key


def test_another_image_size_is_refused_with_the_way_to_re_export() -> None:
    runtime = ExportedDetector(lambda image: pytest.fail("ran the graph"), (SIZE, SIZE), name="det.onnx")
    with pytest.raises(
        ConfigError, match=r"det.onnx was exported for \(3, 72, 72\).*\(3, 64, 96\).*image_size=\(64, 96\)"
    ):
        runtime([torch.rand(3, 64, 96)])
    with pytest.raises(ConfigError, match="image_size must be"):
        export_detector(tiny_task("faster_rcnn", 2), "unused.onnx", (64,))


def test_every_quickstart_image_reaches_the_backbone_at_one_size() -> None:
    """The quickstart's 128 x 128 shapes images, resized to min_size / max_size and padded to a multiple of 32, all
    reach the backbone at 128 x 128: a graph exported with image_size (128, 128) serves them exactly."""
    config = yaml.safe_load((REPO / "configs" / "detection" / "quickstart_shapes.yaml").read_text())["model"]
    args = config["init_args"]
    transform = GeneralizedRCNNTransform(args["min_size"], args["max_size"], [0.0] * 3, [1.0] * 3).eval()
    batch, _ = transform([torch.rand(3, 128, 128)])
    assert batch.image_sizes == [(128, 128)] and batch.tensors.shape[-2:] == (128, 128)
