"""The synthetic shapes set: COCO layout, exact polygon masks, and the path the quickstart reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from swinlab.data.coco import COCODataModule
from tests.helpers import REPO, load_script


def test_writes_coco_layout_with_matching_masks(tmp_path: Path) -> None:
    load_script("make_shapes_coco").main(
        [
            "--out",
            str(tmp_path),
            "--num-train",
            "4",
            "--num-val",
            "3",
            "--size",
            "64",
            "--min-radius",
            "6",
            "--max-radius",
            "14",
            "--seed",
            "1",
        ]
    )
    train = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    val = json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())
    assert len(train["images"]) == 4 and len(val["images"]) == 3
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}, "image ids are unique"
    assert [c["name"] for c in train["categories"]] == ["circle", "rectangle", "triangle"]
    for image in train["images"]:
        assert (tmp_path / "train2017" / image["file_name"]).is_file()

    dm = COCODataModule(str(tmp_path), num_workers=0, flip_prob=0.0)
    assert dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.train_set) == 4
    for index in range(len(dm.val_set)):
        sample = dm.val_set[index]
        image, target = sample["image"], sample["target"]
        masks = target["masks"].as_subclass(torch.Tensor)
        assert image.shape == (3, 64, 64) and len(target["labels"]) >= 1
        assert masks.sum(0).max() == 1, "shapes never overlap"
        # Rasterised polygon areas match the recorded areas up to the boundary pixels.
        pixels = masks.flatten(1).sum(1).float()
        assert torch.allclose(pixels, target["area"], rtol=0.25)
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 64).all()


def test_default_output_is_where_the_quickstart_reads() -> None:
    config = yaml.safe_load((REPO / "configs" / "detection" / "quickstart_shapes.yaml").read_text())
    script = load_script("make_shapes_coco")
    written = []
    script.write_split = lambda out, *args, **kwargs: written.append(out) or 1
    script.main([])
    assert written and all(str(out) == config["data"]["init_args"]["root"] for out in written)


def test_rejects_shapes_larger_than_the_image(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        load_script("make_shapes_coco").main(["--out", str(tmp_path), "--size", "32", "--max-radius", "20"])
