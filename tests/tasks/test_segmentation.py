import csv
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from PIL import Image

from swinlab.cli import main
from swinlab.data.ade20k import ADE20KDataModule
from swinlab.optim import WarmupLR
from swinlab.prediction import label_palette
from swinlab.tasks.segmentation import SegmentationMetrics, SegmentationTask
from tests.helpers import REPO, TINY_BACKBONE, load_script

CONFIGS = sorted((REPO / "configs" / "segmentation").glob("*.yaml"))


def tiny_task(**kwargs) -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=4, backbone_kwargs=TINY_BACKBONE, decode_channels=8, aux_channels=8, **kwargs)


def reference_metrics(preds, targets, num_classes: int, ignore_index: int = 255) -> tuple[float, float, float]:
    """mmseg's total_intersect_and_union + nanmean, from one confusion matrix over all images."""
    hist = np.zeros((num_classes, num_classes))
    for pred, target in zip(preds, targets):
        keep = target != ignore_index
        hist += np.bincount(num_classes * target[keep] + pred[keep], minlength=num_classes**2).reshape(num_classes, -1)
    intersect = np.diag(hist)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersect / (hist.sum(0) + hist.sum(1) - intersect)
        accuracy = intersect / hist.sum(1)
    return float(np.nanmean(iou)), float(np.nanmean(accuracy)), float(intersect.sum() / hist.sum())


def test_metrics_match_confusion_matrix_over_the_whole_set() -> None:
    rng = np.random.default_rng(0)
    # Class 3 is predicted but never in the ground truth (IoU 0, no accuracy); class 4 appears nowhere.
    targets = [rng.choice([0, 1, 2, 255], size=shape, p=[0.5, 0.3, 0.1, 0.1]) for shape in [(7, 9), (12, 5), (4, 4)]]
    preds = [
        np.where(rng.random(t.shape) < 0.6, np.where(t == 255, 0, t), rng.integers(0, 4, t.shape)) for t in targets
    ]
    metrics = SegmentationMetrics(num_classes=5)
    for pred, target in zip(preds, targets):
        metrics.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None])
    result = metrics.compute()
    miou, macc, aacc = reference_metrics(preds, targets, num_classes=5)
    assert result["mIoU"].item() == pytest.approx(miou, abs=1e-6)
    assert result["mAcc"].item() == pytest.approx(macc, abs=1e-6)
    assert result["aAcc"].item() == pytest.approx(aacc, abs=1e-6)
    per_image = np.mean([reference_metrics([p], [t], 5)[0] for p, t in zip(preds, targets)])
    assert abs(per_image - miou) > 1e-3  # the data makes a per-image average distinguishable


def test_slide_equals_whole_when_the_image_fits_one_window() -> None:
    task = tiny_task(inference_mode="slide", crop_size=64, stride=43).eval()
    images = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(task.slide_inference(images), task(images))
        assert torch.equal(task.infer(images, (48, 40)), task(images))


def test_slide_windows_cover_every_pixel_once_averaged(monkeypatch: pytest.MonkeyPatch) -> None:
    task = tiny_task(inference_mode="slide", crop_size=(32, 24), stride=(20, 15)).eval()
    seen = []

    def fake_forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return torch.ones(x.shape[0], 4, *x.shape[-2:])

    monkeypatch.setattr(task, "forward", fake_forward)
    logits = task.slide_inference(torch.randn(2, 3, 70, 50))
    assert logits.shape == (2, 4, 70, 50)
    assert torch.allclose(logits, torch.ones_like(logits))
    assert set(seen) == {(32, 24)} and len(seen) == 3 * 3  # rows at 0, 20, 38 (= 70 - 32); columns at 0, 15, 26


def test_multi_scale_flip_scores_at_output_size() -> None:
    """Softmax scores averaged over every scale and its mirror (flipped back), each resized to the output size."""
    scales, output_size = (0.75, 1.0, 1.5), (83, 117)
    task = tiny_task(test_scales=scales, test_flip=True).eval()
    with torch.no_grad():
        task.decode_head.classifier.weight.mul_(1000)  # confident logits: an untrained head gives ~uniform scores
    images = torch.randn(1, 3, 40, 56)

    def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        scores = task.infer(images, output_size=output_size)
        passes = []
        for scale in scales:
            # mmseg's rescale: round half up.
            scaled = bilinear(images, (int(40 * scale + 0.5), int(56 * scale + 0.5)))
            passes.append(bilinear(task(scaled), output_size).softmax(dim=1))
            passes.append(bilinear(torch.flip(task(torch.flip(scaled, [3])), [3]), output_size).softmax(dim=1))
        expected = torch.stack(passes).mean(dim=0)
        single = bilinear(task(images), output_size).softmax(dim=1)
    assert scores.shape == (1, 4, 83, 117)
    torch.testing.assert_close(scores, expected)
    assert (scores - single).abs().max() > 0.1, "the scales and flips change the scores"


def test_training_step_trains_both_heads() -> None:
    """Decode and auxiliary heads both get gradients; the auxiliary gradient is ``aux_loss_weight`` times its loss's."""
    masks = torch.randint(0, 4, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    masks[:, :4] = 255
    batch = {"image": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), "mask": masks}
    grads = {}
    for weight in (0.4, 0.8):
        task = tiny_task(aux_loss_weight=weight)  # same initial weights (seeded)
        torch.manual_seed(3)  # same dropout and stochastic depth
        loss = task.training_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss)
        grads[weight] = {
            "decode": task.decode_head.classifier.weight.grad.clone(),
            "aux": task.aux_head.classifier.weight.grad.clone(),
            "backbone": task.backbone.patch_embed.proj.weight.grad.clone(),
        }
    for name in ("decode", "aux", "backbone"):
        assert grads[0.4][name].abs().sum() > 0, name
    # The decode head never sees the auxiliary loss; the auxiliary head sees only it, scaled by its weight.
    torch.testing.assert_close(grads[0.8]["decode"], grads[0.4]["decode"])
    torch.testing.assert_close(grads[0.8]["aux"], 2 * grads[0.4]["aux"])
    assert not torch.allclose(grads[0.8]["backbone"], grads[0.4]["backbone"])


def test_training_batch_of_one_image_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="batch of 1 image.*data.batch_size >= 2"):
        tiny_task().training_step({"image": torch.randn(1, 3, 32, 32), "mask": torch.zeros(1, 32, 32).long()}, 0)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="aux_in_index 5"):
        tiny_task(aux_in_index=5)
    with pytest.raises(ValueError, match="inference_mode"):
        tiny_task(inference_mode="sliding")


def test_palette_colours_are_distinct() -> None:
    palette = label_palette(150)
    assert len({tuple(c) for c in palette}) == 150 and not (palette == 0).all(axis=1).any()


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    load_script("make_shapes_segmentation").write_dataset(root, num_train=4, num_val=2, size=48, seed=0)
    return root


def _override(tmp_path: Path, data_root: Path) -> Path:
    override = tmp_path / "tiny.yaml"
    override.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 1
  default_root_dir: {tmp_path / "run"}
model:
  init_args:
    backbone_kwargs: {TINY_BACKBONE}
    pretrained: null  # the paper recipes name hub weights; tests never download
    decode_channels: 8
    aux_channels: 8
    crop_size: 32
    stride: 21
data:
  init_args:
    data_root: {data_root}
    crop_size: 32
    scale: [128, 32]
    test_scale: [128, 40]
    batch_size: 2
    num_workers: 0
"""
    )
    return override


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_cli_fit_and_validate_every_config(config: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    override = _override(tmp_path, tiny_shapes)
    common = ["--config", str(config), "--config", str(override), "--trainer.fast_dev_run=1"]
    fit = main(["fit", *common])
    assert fit.trainer.state.finished and fit.trainer.global_step == 1
    assert fit.trainer.optimizers[0].state, "one optimizer step was taken"
    logged = fit.trainer.callback_metrics
    assert {"train/loss", "train/decode_loss", "val/mIoU", "val/mAcc", "val/aAcc"} <= set(logged)
    assert torch.isfinite(logged["train/loss"])
    validate = main(["validate", *common, "--model.init_args.inference_mode=slide"])
    assert validate.trainer.state.finished and validate.model.inference_mode == "slide"
    scores = validate.trainer.callback_metrics
    assert all(0.0 <= float(scores[f"val/{key}"]) <= 1.0 for key in ("mIoU", "mAcc", "aAcc"))


def test_cli_predict_writes_label_maps_and_overlays_into_the_run_folder(tiny_shapes: Path, tmp_path: Path) -> None:
    override = _override(tmp_path, tiny_shapes)
    config = REPO / "configs" / "segmentation" / "quickstart_shapes.yaml"
    main(["predict", "--config", str(config), "--config", str(override), "--data.init_args.eval_batch_size=2"])
    out = tmp_path / "run" / "predictions"  # <trainer.default_root_dir>/predictions: the task's default
    for split_image in sorted((tiny_shapes / "images" / "validation").iterdir()):
        size = Image.open(split_image).size
        labels = Image.open(out / "labels" / f"{split_image.stem}.png")
        overlay = Image.open(out / "overlays" / f"{split_image.stem}.png")
        assert labels.size == overlay.size == size
        assert labels.mode == "L" and np.asarray(labels).max() < 4 and overlay.mode == "RGB"


def test_cli_predict_lists_unreadable_images_as_failed(tiny_shapes: Path, tmp_path: Path) -> None:
    images = tmp_path / "to_predict"
    images.mkdir()
    for source in sorted((tiny_shapes / "images" / "validation").iterdir()):
        (images / source.name).write_bytes(source.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    override = _override(tmp_path, tiny_shapes)
    config = REPO / "configs" / "segmentation" / "quickstart_shapes.yaml"
    args = ["--data.init_args.eval_batch_size=3", f"--data.init_args.predict_dir={images}"]
    main(["predict", "--config", str(config), "--config", str(override), *args])
    out = tmp_path / "run" / "predictions"
    readable = sorted(p.stem for p in images.iterdir() if p.name != "broken.jpg")
    assert sorted(p.stem for p in (out / "labels").iterdir()) == readable
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == readable
    with open(out / "failed.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["file"] == "broken.jpg" and "broken.jpg" in row["error"] and "unreadable image" in row["error"]


class _StopAtStart(Callback):
    def on_train_start(self, trainer: Trainer, pl_module: SegmentationTask) -> None:
        trainer.should_stop = True


def test_iteration_schedule_follows_max_steps(tiny_shapes: Path, tmp_path: Path) -> None:
    """The paper's schedule: 1500 warm-up iterations from 1e-6 x lr, poly decay to 0 at max_steps (not epochs)."""
    task = tiny_task(
        optimizer=lambda params: torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01),
        lr_scheduler=partial(WarmupLR, decay="poly", power=1.0, warmup_iters=1500, warmup_factor=1e-6),
    )
    data = ADE20KDataModule(
        str(tiny_shapes), class_names=["a", "b", "c", "d"], crop_size=32, batch_size=2, num_workers=0
    )
    trainer = Trainer(
        max_steps=160_000,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        val_check_interval=16_000,
        callbacks=[_StopAtStart()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 160_000 and scheduler.warmup_steps == 1500
    assert [scheduler.factor(step) for step in (0, 1500, 80_750, 160_000)] == pytest.approx([1e-6, 1.0, 0.5, 0.0])
    decays = {g["weight_decay"] for g in trainer.optimizers[0].param_groups}
    assert decays == {0.0, 0.01}


def test_test_time_options_stay_out_of_checkpoint_hparams() -> None:
    # LightningCLI applies checkpoint hyperparameters over the command line for --ckpt_path runs.
    task = tiny_task(inference_mode="slide", test_flip=True, predictions_dir="out")
    assert task.hparams.num_classes == task.num_classes == 4
    assert not {"inference_mode", "crop_size", "stride", "test_scales", "test_flip", "predictions_dir"} & set(
        task.hparams
    )
