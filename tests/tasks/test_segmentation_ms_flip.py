"""SegmentationTask ``test_augmentation=ms_flip`` (official multi-scale + flip test) against a hand-computed average."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swinlab.cli import main
from swinlab.tasks.segmentation import MS_FLIP_RATIOS, SegmentationTask
from tests.helpers import REPO, TINY_BACKBONE, load_script

IMAGE_SIZE, OUTPUT_SIZE = (40, 56), (51, 67)


def tiny_task(**kwargs) -> SegmentationTask:
    """A deterministic tiny Swin + UperNet (fixed seed, eval mode: no dropout) whose classifier is scaled up, so its
    softmax scores are far from uniform and differ between positions, scales and flips."""
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=4, backbone_kwargs=TINY_BACKBONE, decode_channels=8, aux_channels=8, **kwargs)
    with torch.no_grad():
        task.decode_head.classifier.weight *= 200
    return task.eval()


def hand_average(task: SegmentationTask, image: torch.Tensor, ratios=MS_FLIP_RATIOS, unflip: bool = True):
    """Softmax of the model's logits for every ratio and its flipped copy (flipped back, resized bilinearly to
    OUTPUT_SIZE), averaged. ``unflip=False`` or fewer ``ratios`` give what a broken implementation would."""
    height, width = image.shape[-2:]
    model = task.slide_inference if task.inference_mode == "slide" else task
    total = torch.zeros(1, 4, *OUTPUT_SIZE)
    for ratio in ratios:
        scaled = F.interpolate(image, (int(height * ratio + 0.5), int(width * ratio + 0.5)), mode="bilinear")
        for flip in (False, True):
            logits = model(scaled.flip(-1)) if flip else model(scaled)
            if flip and unflip:
                logits = logits.flip(-1)
            total += F.interpolate(logits, OUTPUT_SIZE, mode="bilinear").softmax(dim=1)
    return total / (2 * len(ratios))


@pytest.mark.parametrize("inference_mode", ["whole", "slide"])
def test_ms_flip_averages_every_scale_and_its_unflipped_copy(inference_mode: str) -> None:
    task = tiny_task(test_augmentation="ms_flip", inference_mode=inference_mode, crop_size=32, stride=20)
    image = torch.randn(1, 3, *IMAGE_SIZE)
    with torch.no_grad():
        ours = task.infer_ms_flip(image, OUTPUT_SIZE)
        expected = hand_average(task, image)
        # The reference tells a missing un-flip or a missing scale apart from the right answer.
        assert (hand_average(task, image, unflip=False) - expected).abs().max() > 0.01
        assert (hand_average(task, image, ratios=MS_FLIP_RATIOS[:-1]) - expected).abs().max() > 0.01
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
        # The prediction (predict writes it) is the argmax of the ms+flip scores.
        assert torch.equal(task._predict_labels(image[0], OUTPUT_SIZE), expected[0].argmax(dim=0))


def test_ms_flip_runs_the_model_at_every_ratio_each_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    task = tiny_task(test_augmentation="ms_flip")
    seen = []
    forward = task.forward
    monkeypatch.setattr(task, "forward", lambda x: seen.append(tuple(x.shape[-2:])) or forward(x))
    with torch.no_grad():
        task.infer_ms_flip(torch.randn(1, 3, *IMAGE_SIZE), OUTPUT_SIZE)
    expected = [(int(IMAGE_SIZE[0] * r + 0.5), int(IMAGE_SIZE[1] * r + 0.5)) for r in MS_FLIP_RATIOS for _ in "ab"]
    assert seen == expected


def test_test_augmentation_is_a_run_time_option_with_a_clear_error() -> None:
    task = tiny_task(test_augmentation="ms_flip", ms_flip_ratios=(1.0, 2.0))
    assert {"test_augmentation", "ms_flip_ratios"}.isdisjoint(task.hparams)
    assert task.ms_flip_ratios == (1.0, 2.0)
    with pytest.raises(ValueError, match="test_augmentation must be 'none' or 'ms_flip', got 'tta'"):
        tiny_task(test_augmentation="tta")


@pytest.mark.parametrize("augmentation", ["none", "ms_flip"])
def test_validate_logs_single_scale_and_ms_flip_side_by_side(
    augmentation: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_root = tmp_path_factory.mktemp("shapes")
    load_script("make_shapes_segmentation").write_dataset(data_root, num_train=2, num_val=2, size=48, seed=0)
    config = REPO / "configs" / "segmentation" / "quickstart_shapes.yaml"
    main(
        [
            "validate",
            "--config",
            str(config),
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.backbone_kwargs={TINY_BACKBONE}",
            "--model.init_args.decode_channels=8",
            "--model.init_args.aux_channels=8",
            f"--model.init_args.test_augmentation={augmentation}",
            f"--data.init_args.data_root={data_root}",
            "--data.init_args.test_scale=[128, 40]",
            "--data.init_args.num_workers=0",
        ]
    )
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    row = next(csv.DictReader(metrics_file.open()))
    single = {"val/mIoU", "val/mAcc", "val/aAcc"}
    ms_flip = {f"{key}_ms_flip" for key in single}
    assert single <= set(row)
    assert (ms_flip <= set(row)) == (augmentation == "ms_flip") and (ms_flip & set(row) == set()) != (
        augmentation == "ms_flip"
    )
    assert all(0.0 <= float(row[key]) <= 1.0 for key in single | (ms_flip & set(row)))
