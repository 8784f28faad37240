"""DetectionTask through the CLI (every config), its COCO metrics against pycocotools, and predict outputs."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from swinlab.cli import main
from swinlab.data.coco import COCODataModule
from swinlab.prediction import DetectionPredictionWriter
from swinlab.tasks.detection import DetectionTask, SwinFPN
from tests.helpers import REPO, TINY_BACKBONE, load_script, write_hub_cache

CONFIGS = sorted((REPO / "configs" / "detection").glob("*.yaml"))
SIZE = 64
# COCOeval.stats[0:6]: AP, AP50, AP75, AP small, AP medium, AP large.
COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
TINY_HEADS = {"fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 16, "min_size": SIZE, "max_size": SIZE}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = load_script("make_shapes_coco")
    root = tmp_path_factory.mktemp("shapes")
    script.main(
        [
            "--out",
            str(root),
            "--num-train",
            "4",
            "--num-val",
            "3",
            "--size",
            str(SIZE),
            "--min-radius",
            "6",
            "--max-radius",
            "14",
        ]
    )
    return root


def tiny_overrides(data_root: Path, run_dir: Path) -> list[str]:
    """Shrink any detection config to a seconds-long CPU run on the tiny shapes set."""
    heads = [f"--model.init_args.{key}={value}" for key, value in TINY_HEADS.items()]
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.callbacks=[]",
        "--model.init_args.pretrained=null",
        f"--model.init_args.backbone_kwargs={json.dumps(TINY_BACKBONE)}",
        *heads,
        f"--data.init_args.root={data_root}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_fits_and_validates(config: Path, shapes_root: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(config), *tiny_overrides(shapes_root, tmp_path), "--trainer.fast_dev_run=1"])
    trainer = cli.trainer
    assert trainer.state.finished and trainer.global_step == 1
    assert trainer.optimizers[0].state, "one optimizer step was taken"
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"]) and "train/loss_rpn_box_reg" in logged
    kinds = ("box", "mask") if cli.model.hparams.masks else ("box",)
    assert {f"val/{kind}_{key}" for kind in kinds for key in COCO_KEYS} <= set(logged)


def test_recipe_trains_from_hub_weights_in_an_offline_cache(
    shapes_root: Path, tmp_path: Path, offline_hub: Path
) -> None:
    """The Swin-T recipe names its weights (``pretrained: swin_tiny_patch4_window7_224``): offline, they resolve to the
    timm copy in a pre-filled Hub cache, load into the backbone, and one training step moves them by at most ~lr."""
    recipe = REPO / "configs" / "detection" / "mask_rcnn_swin_t_fpn_3x_coco.yaml"
    assert (
        "pretrained: swin_tiny_patch4_window7_224" in (recipe.parent / "mask_rcnn_swin_t_fpn_1x_coco.yaml").read_text()
    )
    torch.manual_seed(0)
    shape = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY_BACKBONE.items()}
    published = timm.create_model("swin_tiny_patch4_window7_224", **shape)
    write_hub_cache(offline_hub, "timm/swin_tiny_patch4_window7_224.ms_in1k", published.state_dict())

    overrides = [o for o in tiny_overrides(shapes_root, tmp_path) if not o.startswith("--model.init_args.pretrained")]
    cli = main(["fit", "--config", str(recipe), *overrides, "--trainer.fast_dev_run=1"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    lr = max(group.get("initial_lr", group["lr"]) for group in cli.trainer.optimizers[0].param_groups)
    trained = cli.model.get_submodule(cli.model.backbone_path).state_dict()
    checked = 0
    for key, value in published.state_dict().items():
        if key in trained and value.is_floating_point() and not key.startswith("head"):
            assert (trained[key] - value).abs().max() <= 1.1 * lr, key
            checked += 1
    assert checked >= 20, f"only {checked} backbone tensors matched the cached weights"


def coco_results(predictions: list[dict], category_ids: list[int]) -> list[dict]:
    """Detections in the COCO results format: xywh boxes, dataset category ids, RLE masks."""
    results = []
    for prediction in predictions:
        for box, label, score, mask in zip(
            prediction["boxes"].tolist(), prediction["labels"], prediction["scores"], prediction["masks"]
        ):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            results.append(
                {
                    "image_id": prediction["image_id"],
                    "category_id": category_ids[int(label)],
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": float(score),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
    return results


def test_validate_logs_box_and_mask_ap(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``validate`` through the CLI logs, under each val/{box,mask}_* key, the value COCOeval gives for the same
    detections (the detector's output is replaced by noisy ground truth, so the AP is far from 0 and 1)."""
    dm = COCODataModule(str(shapes_root), num_workers=0, batch_size=2)
    dm.setup("validate")
    rng = np.random.default_rng(0)
    served = [fake_predictions(batch["target"], dm.num_classes, rng) for batch in dm.val_dataloader()]
    batches = iter(served)

    def detections(self: DetectionTask, images: list[torch.Tensor]) -> list[dict]:
        predictions = next(batches)
        assert [p["masks"].shape[-2:] for p in predictions] == [image.shape[-2:] for image in images]
        return predictions

    monkeypatch.setattr(DetectionTask, "forward", detections)
    config = REPO / "configs" / "detection" / "quickstart_shapes.yaml"
    main(["validate", "--config", str(config), *tiny_overrides(shapes_root, tmp_path)])
    assert next(batches, None) is None, "every served batch was scored"
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    row = next(csv.DictReader(metrics_file.open()))

    gt = COCO(str(dm.annotation_file("val2017")))
    results = gt.loadRes(coco_results([p for batch in served for p in batch], dm.category_ids))
    for iou_type, kind in (("bbox", "box"), ("segm", "mask")):
        evaluation = COCOeval(gt, results, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        for index, key in enumerate(COCO_KEYS):
            assert float(row[f"val/{kind}_{key}"]) == pytest.approx(evaluation.stats[index], abs=1e-4), (kind, key)
    assert 0.05 < float(row["val/box_map_50"]) < 1.0 and 0.05 < float(row["val/mask_map"]) < 1.0


def hf_copy_of(coco_root: Path, out: Path) -> None:
    """The shapes set saved with Hugging Face ``datasets``: ``objects`` with xywh ``bbox`` and ``category``."""
    import datasets

    splits = {}
    for coco_split, hf_name in (("train2017", "train"), ("val2017", "validation")):
        coco = COCO(str(coco_root / "annotations" / f"instances_{coco_split}.json"))
        names = [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
        rows = {"image_id": [], "image": [], "objects": []}
        for image_id in sorted(coco.getImgIds()):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            rows["image_id"].append(image_id)
            rows["image"].append(Image.open(coco_root / coco_split / coco.loadImgs(image_id)[0]["file_name"]))
            rows["objects"].append(
                {"bbox": [a["bbox"] for a in anns], "category": [a["category_id"] - 1 for a in anns]}
            )
        features = datasets.Features(
            {
                "image_id": datasets.Value("int64"),
                "image": datasets.Image(),
                "objects": {
                    "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                    "category": datasets.List(datasets.ClassLabel(names=names)),
                },
            }
        )
        splits[hf_name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(out))


def test_faster_rcnn_on_the_hugging_face_source(shapes_root: Path, tmp_path: Path) -> None:
    hf_root = tmp_path / "hf"
    hf_copy_of(shapes_root, hf_root)
    config = REPO / "configs" / "detection" / "quickstart_shapes.yaml"
    main(
        [
            "fit",
            "--config",
            str(config),
            *tiny_overrides(hf_root, tmp_path / "run"),
            "--trainer.fast_dev_run=1",
            "--data.init_args.source=hf",
            "--data.init_args.masks=false",
            "--model.init_args.masks=false",
        ]
    )


def test_masks_on_without_mask_targets_is_a_clear_error() -> None:
    task = DetectionTask(num_classes=2, backbone_kwargs=TINY_BACKBONE, **TINY_HEADS)
    target = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="masks: false"):
        task._detector_targets([target])


def test_fpn_gives_five_levels_with_the_strides_of_the_paper() -> None:
    task = DetectionTask(num_classes=2, backbone_kwargs=TINY_BACKBONE, **TINY_HEADS)
    levels = task.detector.backbone(torch.randn(1, 3, 64, 96))
    assert isinstance(task.detector.backbone, SwinFPN)
    assert [(k, tuple(v.shape)) for k, v in levels.items()] == [
        ("0", (1, 16, 16, 24)),
        ("1", (1, 16, 8, 12)),
        ("2", (1, 16, 4, 6)),
        ("3", (1, 16, 2, 3)),
        ("pool", (1, 16, 1, 2)),
    ]


def test_layer_decay_scales_only_the_swin_body() -> None:
    """lr x decay ** (L - id) on the Swin body, full lr outside it. Official numbering: patch embedding 0, block k of
    all stages k + 1, patch merging with the last block of the stage before it, stage norms top."""
    backbone = {**TINY_BACKBONE, "depths": [1, 2, 1, 1]}  # two blocks in a stage: ids count blocks, not stages
    task = DetectionTask(
        num_classes=2,
        backbone_kwargs=backbone,
        layer_decay=0.5,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        **TINY_HEADS,
    )
    top = 1 + 5  # sum(depths) + 1
    layer_of_prefix = {
        "patch_embed.": 0,
        "layers.0.blocks.0.": 1,
        "layers.1.downsample.": 1,
        "layers.1.blocks.0.": 2,
        "layers.1.blocks.1.": 3,
        "layers.2.downsample.": 3,
        "layers.2.blocks.0.": 4,
        "layers.3.downsample.": 4,
        "layers.3.blocks.0.": 5,
        "norm": top,
    }
    names = {id(param): name for name, param in task.named_parameters()}
    optimizer = task.configure_optimizers()
    lr_of = {names[id(param)]: group["lr"] for group in optimizer.param_groups for param in group["params"]}
    assert set(lr_of) == set(names.values())
    body = "detector.backbone.body."
    assert any(not name.startswith(body) for name in lr_of)
    for name, lr in lr_of.items():
        if not name.startswith(body):  # FPN, RPN and RoI heads
            assert lr == pytest.approx(1e-3), name
            continue
        (layer,) = [layer for prefix, layer in layer_of_prefix.items() if name[len(body) :].startswith(prefix)]
        assert lr == pytest.approx(1e-3 * 0.5 ** (top - layer)), name


def fake_predictions(targets: list[dict], num_classes: int, rng: np.random.Generator) -> list[dict]:
    """Noisy copies of the ground truth (shifted boxes, eroded or grown masks, some wrong labels) plus
    random false positives, with random scores."""
    predictions = []
    for target in targets:
        boxes = target["boxes"].as_subclass(torch.Tensor).clone()
        masks = target["masks"].as_subclass(torch.Tensor).bool().clone()
        labels = target["labels"].clone()
        height, width = masks.shape[-2:]
        boxes += torch.from_numpy(rng.normal(0, 2.0, boxes.shape)).float()
        masks = torch.roll(masks, shifts=int(rng.integers(-2, 3)), dims=-1)
        flip = torch.from_numpy(rng.random(len(labels)) < 0.2)
        labels[flip] = (labels[flip] + 1) % num_classes
        extra = int(rng.integers(0, 3))
        corners = torch.from_numpy(rng.uniform(0, width - 12, (extra, 2))).float()
        extra_boxes = torch.cat([corners, corners + 10], dim=1)
        extra_masks = torch.zeros(extra, height, width, dtype=torch.bool)
        for i, (x, y) in enumerate(corners.long().tolist()):
            extra_masks[i, y : y + 10, x : x + 10] = True
        predictions.append(
            {
                "boxes": torch.cat([boxes, extra_boxes]).clamp(0, width),
                "labels": torch.cat([labels, torch.from_numpy(rng.integers(0, num_classes, extra))]),
                "scores": torch.from_numpy(rng.uniform(0.05, 1.0, len(labels) + extra)).float(),
                "masks": torch.cat([masks, extra_masks]),
                "image_id": target["image_id"],
            }
        )
    return predictions


def test_metrics_match_pycocotools_on_the_written_results(shapes_root: Path, tmp_path: Path) -> None:
    """The task's torchmetrics AP equals COCOeval run directly on the results JSON the writer produces."""
    dm = COCODataModule(str(shapes_root), num_workers=0, batch_size=2)
    dm.setup("validate")
    task = DetectionTask(num_classes=dm.num_classes, backbone_kwargs=TINY_BACKBONE, **TINY_HEADS)
    writer = DetectionPredictionWriter(output_dir=str(tmp_path), score_threshold=0.5)
    trainer = SimpleNamespace(datamodule=dm, world_size=1, global_rank=0)
    rng = np.random.default_rng(0)
    for batch_idx, batch in enumerate(dm.val_dataloader()):
        predictions = fake_predictions(batch["target"], dm.num_classes, rng)
        task.forward = lambda _images, predictions=predictions: predictions
        task.validation_step(batch, batch_idx)
        writer.write_on_batch_end(trainer, task, predictions, None, batch, batch_idx, 0)
    writer.on_predict_epoch_end(trainer, task)
    ours = task.val_metrics.compute()

    gt = COCO(str(dm.annotation_file("val2017")))
    detections = gt.loadRes(str(tmp_path / "results.json"))
    for iou_type, prefix in (("bbox", "bbox_"), ("segm", "segm_")):
        evaluation = COCOeval(gt, detections, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        for index, key in enumerate(COCO_KEYS):
            assert float(ours[prefix + key]) == pytest.approx(evaluation.stats[index], abs=1e-4), (iou_type, key)
    assert 0.05 < float(ours["bbox_map_50"]) < 1.0, "the noisy predictions give a non-trivial AP"
    drawn = sorted((tmp_path / "images").glob("*.png"))
    assert len(drawn) == len(dm.val_set)
    first = gt.loadImgs(int(drawn[0].stem))[0]
    original = np.asarray(Image.open(shapes_root / "val2017" / first["file_name"]).convert("RGB"))
    annotated = np.asarray(Image.open(drawn[0]))
    assert annotated.shape == original.shape and not np.array_equal(annotated, original), "boxes are drawn"


def test_predict_writes_results_json_and_images_into_the_run_folder(shapes_root: Path, tmp_path: Path) -> None:
    """The task attaches its writer itself; by default it writes to ``<trainer.default_root_dir>/predictions``."""
    config = REPO / "configs" / "detection" / "quickstart_shapes.yaml"
    overrides = tiny_overrides(shapes_root, tmp_path)
    main(["predict", "--config", str(config), *overrides, "--model.init_args.detector_kwargs={box_score_thresh: 0.0}"])
    out = tmp_path / "predictions"
    results = json.loads((out / "results.json").read_text())
    gt = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    assert results, "an untrained model with score threshold 0 still proposes boxes"
    assert {r["image_id"] for r in results} <= {i["id"] for i in gt["images"]}
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    first = results[0]
    assert set(first) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert first["segmentation"]["size"] == [SIZE, SIZE]
    assert len(list((out / "images").glob("*.png"))) == len(gt["images"])


def test_predictions_dir_moves_the_output(shapes_root: Path, tmp_path: Path) -> None:
    config = REPO / "configs" / "detection" / "quickstart_shapes.yaml"
    out = tmp_path / "elsewhere"
    main(
        [
            "predict",
            "--config",
            str(config),
            *tiny_overrides(shapes_root, tmp_path / "run"),
            f"--model.init_args.predictions_dir={out}",
        ]
    )
    assert (out / "results.json").is_file() and not (tmp_path / "run" / "predictions").exists()


def test_test_logs_test_keys(shapes_root: Path, tmp_path: Path) -> None:
    """``test`` reports ``test/*`` metrics (it used to log them as ``val/*``)."""
    config = REPO / "configs" / "detection" / "quickstart_shapes.yaml"
    cli = main(["test", "--config", str(config), *tiny_overrides(shapes_root, tmp_path)])
    keys = set(cli.trainer.logged_metrics)
    assert "test/box_map" in keys and "test/mask_map_50" in keys
    assert all(key.startswith("test/") for key in keys), keys


def test_small_medium_and_large_ap_follow_the_annotated_area_not_the_box() -> None:
    """COCO sorts objects into small / medium / large (32², 96²) by their annotated ``area`` (the mask's), not their
    box. Two hollow 40x40 outlines (area 600: small, one found), a 120x120 outline (area 5000: medium, found) and a
    110x110 filled square (large, missed): AP small 0.5, medium 1, large 0. Scored by box area instead, the found
    120x120 outline would be large (AP large 0.5) and medium would hold a found and a missed 40x40 one (0.5)."""
    boxes = torch.tensor([[0, 0, 40, 40], [50, 0, 90, 40], [0, 50, 120, 170], [130, 50, 240, 160]], dtype=torch.float32)
    target = {
        "boxes": boxes,
        "labels": torch.zeros(4, dtype=torch.int64),
        "iscrowd": torch.zeros(4, dtype=torch.int64),
        "area": torch.tensor([600.0, 600.0, 5000.0, 12000.0]),
        "image_id": 1,
    }
    found = {"boxes": boxes[[0, 2]], "scores": torch.tensor([0.9, 0.8]), "labels": torch.zeros(2, dtype=torch.int64)}
    task = DetectionTask(num_classes=1, masks=False, backbone_kwargs=TINY_BACKBONE, **TINY_HEADS)
    task.forward = lambda images: [found]
    task.validation_step({"image": [torch.zeros(3, 300, 300)], "target": [target]}, 0)
    results = task.val_metrics.compute()
    assert float(results["map_small"]) == pytest.approx(0.5, abs=0.01)
    assert float(results["map_medium"]) == pytest.approx(1.0)
    assert float(results["map_large"]) == 0.0
