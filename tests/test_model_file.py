"""``predict|validate|test --model_file F``: an exported file (onnxruntime .onnx, OpenVINO .xml) gives the outputs and
metrics of the checkpoint it was exported from, for classification, segmentation and detection.

Each task's file is exported once per module from a checkpoint with its own weights (not the config's seeded
initialisation, which a ``--model_file`` run builds): a run that ignored the file would give other outputs. A copy of
the file with one weight perturbed must change the outputs too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from swinlab.cli import main
from swinlab.deploy.onnx_graph import served_size
from swinlab.deploy.runtime import ExportedModel, write_deployable
from swinlab.export import main as export
from swinlab.tasks import ClassificationTask, DetectionTask, SegmentationTask
from swinlab.validation import ConfigError
from tests.helpers import REPO, TINY_BACKBONE, TINY_SWIN, load_script, write_fashion_mnist, write_images

CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def save_checkpoint(task: torch.nn.Module, path: Path) -> Path:
    """``task``'s weights and hyper-parameters as the CLI's ``fit`` saves them (``--ckpt_path`` reads them)."""
    hparams = {**task.hparams, "_class_path": f"{type(task).__module__}.{type(task).__name__}"}
    version = lightning.__version__
    torch.save(
        {"state_dict": task.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": version}, path
    )
    return path


def perturbed_copy(path: Path, out: Path) -> Path:
    """``path`` (.onnx) with its largest weight tensor scaled by 3: another model, same graph."""
    model = onnx.load(str(path))
    largest = max(model.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
    largest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(largest) * 3, largest.name))
    onnx.save(model, str(out))
    return out


# ---------------------------------------------------------------------------------------------------------- classify

CLASSIFICATION = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"


@pytest.fixture(scope="module")
def classification(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Fashion-MNIST files, images to predict, a tiny classifier's checkpoint and its .onnx and .xml exports."""
    root = tmp_path_factory.mktemp("classification")
    (root / "fashion-mnist").mkdir()
    data = write_fashion_mnist(root / "fashion-mnist")
    rng = np.random.default_rng(1)
    write_images(root / "to_predict", 5, rng, size=36)
    backbone = {**TINY_SWIN, "in_chans": 1}
    torch.manual_seed(123)
    task = ClassificationTask(backbone_kwargs=backbone, num_classes=10).eval()
    with torch.no_grad():  # logits of a trained model's size, so that the top classes are well apart
        task.backbone.head.weight.mul_(30)
    ckpt = save_checkpoint(task, root / "tiny.ckpt")
    args = [
        "--config",
        str(CLASSIFICATION),
        f"--model.init_args.backbone_kwargs={json.dumps(backbone)}",
        f"--data.init_args.data_dir={data}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        f"--data.init_args.predict_dir={root / 'to_predict'}",
    ]
    export([*args, f"--ckpt_path={ckpt}", f"--output={root / 'model.onnx'}"])
    # The OpenVINO IR of the same graph, as ``export --output F.xml`` writes it (without exporting twice).
    write_deployable(root / "model.onnx", root / "model.xml", "openvino", "fp32")
    return SimpleNamespace(
        root=root, args=[*args, *CPU, *QUIET], ckpt=ckpt, onnx=root / "model.onnx", xml=root / "model.xml"
    )


def read_predictions(path: Path) -> tuple[list[list[str]], np.ndarray]:
    """The classification CSV: per row file and top-k classes, and the (rows, k) probabilities."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    k = sum(key.startswith("class_") for key in rows[0])
    names = [[row["file"], *(row[f"class_{i}"] for i in range(1, k + 1))] for row in rows]
    probs = np.array([[float(row[f"prob_{i}"]) for i in range(1, k + 1)] for row in rows])
    return names, probs


def classify(setup: SimpleNamespace, name: str, *source: str) -> tuple[list[list[str]], np.ndarray]:
    out = setup.root / f"{name}.csv"
    main(
        [
            "predict",
            *setup.args,
            f"--trainer.default_root_dir={setup.root / name}",
            *source,
            f"--model.init_args.predictions_file={out}",
        ]
    )
    return read_predictions(out)


@pytest.mark.parametrize("suffix", ["onnx", "xml"])
def test_classification_predict_from_the_file_equals_the_checkpoint(classification, suffix):
    names, probs = classify(classification, "ckpt", f"--ckpt_path={classification.ckpt}")
    file_names, file_probs = classify(classification, suffix, f"--model_file={getattr(classification, suffix)}")
    assert len(names) == 5 and file_names == names
    np.testing.assert_allclose(file_probs, probs, atol=1e-4, rtol=0)
    # Outputs come from the file: a file with other weights predicts otherwise.
    if suffix == "onnx":
        other = perturbed_copy(classification.onnx, classification.root / "perturbed.onnx")
        other_names, other_probs = classify(classification, "perturbed", f"--model_file={other}")
        assert other_names != names or np.abs(other_probs - probs).max() > 1e-2


def test_classification_validate_with_the_file_reports_the_checkpoint_metrics(classification):
    def validate(*source: str) -> dict[str, float]:
        root = f"--trainer.default_root_dir={classification.root / 'val'}"
        cli = main(["validate", *classification.args, root, *source])
        return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}

    expected = validate(f"--ckpt_path={classification.ckpt}")
    assert {"val/top1", "val/loss"} <= expected.keys() and expected["val/loss"] > 0
    assert validate(f"--model_file={classification.xml}") == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------- segment

SEGMENTATION = REPO / "configs" / "segmentation" / "quickstart_shapes.yaml"


def build_task(args: list[str], seed: int) -> torch.nn.Module:
    """The config's task as the CLI builds it, with weights of its own (seeded by ``seed``)."""
    torch.manual_seed(seed)
    cli = main([*args, f"--seed_everything={seed}"], run=False)
    return cli.model.eval()


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Shapes images (48 px, predicted at 40 px), a tiny Swin + UperNet's checkpoint and its .onnx (any size)."""
    root = tmp_path_factory.mktemp("segmentation")
    load_script("make_shapes_segmentation").write_dataset(root / "shapes", num_train=2, num_val=2, size=48, seed=0)
    # clip_window_to_feature false: the 40 px images' last maps are smaller than the window, which a graph of any
    # size serves only without the clipping.
    # img_size 64: the export traces (and checks parity) at 64 px rather than swin_t's 224.
    backbone = {**TINY_BACKBONE, "img_size": 64, "clip_window_to_feature": False, "padding": "mask"}
    args = [
        "--config",
        str(SEGMENTATION),
        *CPU,
        *QUIET,
        f"--model.init_args.backbone_kwargs={json.dumps(backbone)}",
        "--model.init_args.decode_channels=8",
        "--model.init_args.aux_channels=8",
        f"--data.init_args.data_root={root / 'shapes'}",
        "--data.init_args.test_scale=[128, 40]",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
    ]
    task = build_task(args, seed=123)
    assert isinstance(task, SegmentationTask)
    with torch.no_grad():  # logits well apart, so that no pixel's argmax is a near tie
        task.decode_head.classifier.weight.mul_(300)
    ckpt = save_checkpoint(task, root / "tiny.ckpt")
    export([*args, f"--ckpt_path={ckpt}", f"--output={root / 'model.onnx'}"])
    return SimpleNamespace(root=root, args=args, ckpt=ckpt, onnx=root / "model.onnx")


def segment(setup: SimpleNamespace, name: str, *source: str) -> dict[str, np.ndarray]:
    """``predict``'s label maps by image stem."""
    out = setup.root / name
    main(["predict", *setup.args, f"--trainer.default_root_dir={out}", *source])
    return {path.stem: np.asarray(Image.open(path)) for path in sorted((out / "predictions" / "labels").iterdir())}


def test_segmentation_predict_from_the_file_equals_the_checkpoint(segmentation):
    expected = segment(segmentation, "ckpt", f"--ckpt_path={segmentation.ckpt}")
    ours = segment(segmentation, "onnx", f"--model_file={segmentation.onnx}")
    # The graph serves any size whose last map has 2 tokens or more (4 stages of patch 4: from 33 px).
    assert served_size(segmentation.onnx) == {"min_size": (33, 33)}
    assert len(expected) == 2 and ours.keys() == expected.keys()
    for stem, labels in expected.items():
        assert labels.shape == (48, 48) and len(np.unique(labels)) > 1, "a map of one class would hide little"
        np.testing.assert_array_equal(ours[stem], labels)
    other = perturbed_copy(segmentation.onnx, segmentation.root / "perturbed.onnx")
    changed = segment(segmentation, "perturbed", f"--model_file={other}")
    assert any((changed[stem] != labels).any() for stem, labels in expected.items())


def test_segmentation_validate_with_the_file_reports_the_checkpoint_metrics(segmentation):
    def validate(*source: str) -> dict[str, float]:
        cli = main(["validate", *segmentation.args, f"--trainer.default_root_dir={segmentation.root / 'val'}", *source])
        return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}

    expected = validate(f"--ckpt_path={segmentation.ckpt}")
    assert {"val/mIoU", "val/mAcc", "val/aAcc"} <= expected.keys() and 0 < expected["val/mIoU"] < 1
    assert validate(f"--model_file={segmentation.onnx}") == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------- detect

DETECTION = REPO / "configs" / "detection" / "quickstart_shapes.yaml"
SIZE = 64  # every shapes image: the one size the exported detector serves
TINY_HEADS = {"fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 16, "min_size": SIZE, "max_size": SIZE}


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_segmentation_int8_in_both_runtimes_keeps_the_miou(segmentation, suffix):
    """NNCF's transformer scheme fails on UperNet's concatenations: a segmenter's INT8 is written all the same (the
    fallback of ``write_deployable``). (onnxruntime's shape-inference fallback in ``quantize_int8`` is needed by the
    quickstart's full-size graph, not by this one.)"""
    output = segmentation.root / f"int8{suffix}"
    extra = (f"--ckpt_path={segmentation.ckpt}", f"--output={output}", "--precision=int8", "--evaluate")
    report = export([*segmentation.args, *extra, "--calibration_images=2"])
    assert ExportedModel(output).precision == "int8"
    pytorch, int8 = report["pytorch_metrics"]["test/mIoU"], report["exported_metrics"]["test/mIoU"]
    assert 0 < pytorch < 1 and abs(int8 - pytorch) < 0.05


def pseudo_truth(annotations: Path, results: list[dict]) -> None:
    """Rewrite the COCO annotation file with the 1st, 3rd, .., 9th best of ``results`` per image as its objects:
    the checkpoint's AP is then well inside (0, 1) (random weights score 0 on the real shapes), so any other
    box, label, score order or mask moves it."""
    data = json.loads(annotations.read_text())
    objects = []
    for image in data["images"]:
        ranked = sorted((r for r in results if r["image_id"] == image["id"]), key=lambda r: -r["score"])
        for result in ranked[0:10:2]:
            *_, width, height = result["bbox"]
            objects.append(
                {
                    "id": len(objects) + 1,
                    "image_id": image["id"],
                    "category_id": result["category_id"],
                    "bbox": result["bbox"],
                    "area": width * height,
                    "iscrowd": 0,
                    "segmentation": result["segmentation"],
                }
            )
    annotations.write_text(json.dumps({**data, "annotations": objects}))


@pytest.fixture(scope="module")
def detection(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """64 px shapes, a tiny Mask R-CNN's checkpoint (scores spread, threshold 0), its .onnx for 64 x 64 images, the
    checkpoint's predictions, and validation annotations made of some of them."""
    root = tmp_path_factory.mktemp("detection")
    shapes = ["--out", str(root / "shapes"), "--num-train", "1", "--num-val", "3", "--size", str(SIZE)]
    load_script("make_shapes_coco").main([*shapes, "--min-radius", "6", "--max-radius", "14"])
    args = [
        "--config",
        str(DETECTION),
        *CPU,
        *QUIET,
        "--trainer.callbacks=[]",
        f"--model.init_args.backbone_kwargs={json.dumps(TINY_BACKBONE)}",
        *(f"--model.init_args.{key}={value}" for key, value in TINY_HEADS.items()),
        "--model.init_args.detector_kwargs={box_score_thresh: 0.0, box_detections_per_img: 20}",
        f"--data.init_args.root={root / 'shapes'}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
    ]
    task = build_task(args, seed=123)
    assert isinstance(task, DetectionTask)
    with torch.no_grad():  # heads off their init, so that scores differ (near-equal ones have no stable order)
        for name, param in task.detector.named_parameters():
            if not name.startswith("backbone.body."):
                param.add_(0.05 * torch.randn_like(param))
    ckpt = save_checkpoint(task, root / "tiny.ckpt")
    export([*args, f"--ckpt_path={ckpt}", f"--output={root / 'model.onnx'}", f"--input_size=[{SIZE}, {SIZE}]"])
    setup = SimpleNamespace(root=root, args=args, ckpt=ckpt, onnx=root / "model.onnx")
    setup.expected = detect(setup, "ckpt", f"--ckpt_path={ckpt}")
    pseudo_truth(root / "shapes" / "annotations" / "instances_val2017.json", setup.expected)
    return setup


def detect(setup: SimpleNamespace, name: str, *source: str) -> list[dict]:
    """``predict``'s results.json (COCO results of the validation images)."""
    out = setup.root / name
    main(["predict", *setup.args, f"--trainer.default_root_dir={out}", *source])
    return json.loads((out / "predictions" / "results.json").read_text())


def assert_same_detections(ours: list[dict], expected: list[dict]) -> None:
    """The same detections per image. On flat shapes images two boxes can get the same score (equal RoI features):
    where such a tie falls on the per-image cut (``box_detections_per_img``) either may be kept, so detections
    tied with an image's lowest kept score are left out, and tied ones are compared in box order."""
    assert len(ours) == len(expected)
    for image_id in {r["image_id"] for r in expected}:
        cut = min(r["score"] for r in expected if r["image_id"] == image_id) + 1e-4

        mine_kept, theirs_kept = (
            sorted(
                (r for r in results if r["image_id"] == image_id and r["score"] > cut),
                key=lambda r: (-round(r["score"], 4), r["bbox"]),
            )
            for results in (ours, expected)
        )
        assert len(mine_kept) == len(theirs_kept) > 0
        for mine, theirs in zip(mine_kept, theirs_kept):
            assert mine["category_id"] == theirs["category_id"]
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
            np.testing.assert_allclose(mine["bbox"], theirs["bbox"], atol=1e-3 * SIZE, rtol=0)
            assert mine["segmentation"]["size"] == [SIZE, SIZE]


def test_detection_predict_from_the_file_equals_the_checkpoint(detection):
    expected = detection.expected
    assert len({r["image_id"] for r in expected}) == 3 and len(expected) > 10
    assert_same_detections(detect(detection, "onnx", f"--model_file={detection.onnx}"), expected)
    other = perturbed_copy(detection.onnx, detection.root / "perturbed.onnx")
    with pytest.raises(AssertionError):
        assert_same_detections(detect(detection, "perturbed", f"--model_file={other}"), expected)


def test_detection_test_with_the_file_reports_the_checkpoint_metrics(detection):
    def evaluate(*source: str) -> dict[str, float]:
        cli = main(["test", *detection.args, f"--trainer.default_root_dir={detection.root / 'test'}", *source])
        return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}

    expected = evaluate(f"--ckpt_path={detection.ckpt}")
    assert 0.05 < expected["test/box_map"] < 0.95 and 0.05 < expected["test/mask_map"] < 0.95, expected
    assert evaluate(f"--model_file={detection.onnx}") == pytest.approx(expected, abs=0.005)


def test_detection_file_refuses_an_image_of_another_size(detection):
    folder = detection.root / "other_size"
    write_images(folder, 1, np.random.default_rng(0), size=48)
    args = [*detection.args, f"--trainer.default_root_dir={folder}", f"--data.init_args.predict_dir={folder}"]
    with pytest.raises(ConfigError, match=rf"model.onnx was exported for \(3, {SIZE}, {SIZE}\) images.*\(3, 48, 48\)"):
        main(["predict", *args, f"--model_file={detection.onnx}"])


# ----------------------------------------------------------------------------------------------------------- errors


def test_model_file_with_ckpt_path_is_one_config_error(classification):
    args = ["predict", *classification.args, f"--trainer.default_root_dir={classification.root / 'both'}"]
    with pytest.raises(ConfigError, match=r"--model_file .*model.onnx holds the weights: drop --ckpt_path"):
        main([*args, f"--model_file={classification.onnx}", f"--ckpt_path={classification.ckpt}"])


def test_a_missing_model_file_is_named(classification):
    missing = classification.root / "missing.onnx"
    args = ["validate", *classification.args, f"--trainer.default_root_dir={classification.root / 'missing'}"]
    with pytest.raises(FileNotFoundError, match=f"model file {missing} does not exist"):
        main([*args, f"--model_file={missing}"])
