"""COCO JSON and Hugging Face detection sources: masks, crowd, empty images, id mapping, flips, collation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from swinlab.data.coco import COCODataModule, detection_transforms

# Non-contiguous ids on purpose: labels must come out 0, 1, 2 in id order.
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 11, "name": "bird"}]
HEIGHT, WIDTH = 24, 32


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def dog_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[10:20, 20:30] = 1
    return mask


def bird_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[0:6, 0:8] = 1
    return mask


def write_coco(root: Path, split: str) -> None:
    """Images: 1 = cat polygon + dog (uncompressed RLE) + bird crowd (compressed RLE) + a zero-width box;
    2 = no annotation; 3 = a crowd region only."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id in (1, 2, 3):
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / split / name)
        images.append({"id": image_id, "file_name": name, "height": HEIGHT, "width": WIDTH})
    crowd_rle = mask_utils.encode(np.asfortranarray(bird_mask()))
    crowd_rle["counts"] = crowd_rle["counts"].decode("ascii")
    annotations = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "area": 48.0,
            "bbox": [2.0, 8.0, 8.0, 12.0],
            "segmentation": [[2.0, 8.0, 10.0, 8.0, 10.0, 20.0, 2.0, 20.0]],
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "area": 100.0,
            "bbox": [20.0, 10.0, 10.0, 10.0],
            "segmentation": rle_uncompressed(dog_mask()),
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 11,
            "iscrowd": 1,
            "area": 48.0,
            "bbox": [0.0, 0.0, 8.0, 6.0],
            "segmentation": crowd_rle,
        },
        {
            "id": 4,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "area": 0.0,
            "bbox": [5.0, 5.0, 0.0, 4.0],
            "segmentation": [[5.0, 5.0, 5.0, 9.0, 5.0, 9.0]],
        },
        {
            "id": 5,
            "image_id": 3,
            "category_id": 11,
            "iscrowd": 1,
            "area": 48.0,
            "bbox": [0.0, 0.0, 8.0, 6.0],
            "segmentation": crowd_rle,
        },
    ]
    payload = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    for split in ("train2017", "val2017"):
        write_coco(tmp_path, split)
    return tmp_path


def datamodule(root: Path, **kwargs) -> COCODataModule:
    kwargs.setdefault("num_workers", 0)
    return COCODataModule(str(root), flip_prob=0.0, **kwargs)


def test_category_ids_map_to_contiguous_labels_and_back(coco_root: Path) -> None:
    dm = datamodule(coco_root)
    assert dm.num_classes == 3
    assert dm.class_names == ["cat", "dog", "bird"]
    assert dm.category_ids == [3, 7, 11]
    dm.setup("validate")
    target = dm.val_set[0]["target"]
    assert [dm.category_ids[label] for label in target["labels"].tolist()] == [3, 7, 11]


def test_polygon_rle_and_crowd_masks_decode(coco_root: Path) -> None:
    dm = datamodule(coco_root)
    dm.setup("validate")
    sample = dm.val_set[0]
    image, target = sample["image"], sample["target"]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    # The zero-width box is dropped; the crowd region stays for evaluation.
    assert target["labels"].tolist() == [0, 1, 2]
    assert target["iscrowd"].tolist() == [0, 0, 1]
    assert target["area"].tolist() == [48.0, 100.0, 48.0]
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor),
        torch.tensor([[2.0, 8.0, 10.0, 20.0], [20.0, 10.0, 30.0, 20.0], [0.0, 0.0, 8.0, 6.0]]),
    )
    masks = target["masks"].as_subclass(torch.Tensor)
    assert masks.shape == (3, HEIGHT, WIDTH) and masks.dtype == torch.uint8
    polygon = masks[0].nonzero()
    assert polygon[:, 0].min() == 8 and polygon[:, 0].max() in (19, 20) and polygon[:, 1].min() == 2
    assert torch.equal(masks[1], torch.from_numpy(dog_mask()))
    assert torch.equal(masks[2], torch.from_numpy(bird_mask()))


def test_training_drops_crowd_and_empty_images(coco_root: Path) -> None:
    dm = datamodule(coco_root)
    dm.setup("fit")
    assert len(dm.train_set) == 1, "image 2 (no annotations) and 3 (crowd only) are left out of training"
    assert len(dm.val_set) == 3
    target = dm.train_set[0]["target"]
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["masks"].shape[0] == 2
    empty = dm.val_set[1]["target"]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, HEIGHT, WIDTH)


def test_boxes_only_without_masks(coco_root: Path) -> None:
    dm = datamodule(coco_root, masks=False)
    dm.setup("validate")
    target = dm.val_set[0]["target"]
    assert "masks" not in target and target["boxes"].shape == (3, 4)


def test_flip_moves_boxes_and_masks(coco_root: Path) -> None:
    dm = datamodule(coco_root)
    dm.setup("validate")
    sample = dm.val_set[0]
    image, target = sample["image"], sample["target"]
    pil = Image.open(coco_root / "val2017" / "000000000001.jpg")
    flipped_image, flipped = detection_transforms(train=True, flip_prob=1.0)(pil, _to_plain(dm.val_set, 0))
    torch.testing.assert_close(flipped_image, image.flip(-1))
    boxes = target["boxes"].as_subclass(torch.Tensor)
    expected = torch.stack([WIDTH - boxes[:, 2], boxes[:, 1], WIDTH - boxes[:, 0], boxes[:, 3]], dim=1)
    torch.testing.assert_close(flipped["boxes"].as_subclass(torch.Tensor), expected)
    assert torch.equal(flipped["masks"].as_subclass(torch.Tensor), target["masks"].as_subclass(torch.Tensor).flip(-1))
    assert torch.equal(flipped["labels"], target["labels"])


def _to_plain(dataset, index: int) -> dict:
    """The raw target of a sample, before any transform."""
    transforms, dataset.transforms = dataset.transforms, None
    try:
        return dataset[index]["target"]
    finally:
        dataset.transforms = transforms


def test_loader_batches_are_dicts_of_lists(coco_root: Path) -> None:
    dm = datamodule(coco_root, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch.keys() == {"image", "target", "file"}
    assert len(batch["image"]) == 2 and len(batch["target"]) == 2
    assert batch["file"] == ["000000000001.jpg", "000000000002.jpg"]


def test_missing_annotation_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        COCODataModule(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make_shapes_coco"):
        COCODataModule(str(tmp_path / "absent"))


def test_unknown_category_id_is_reported(coco_root: Path) -> None:
    path = coco_root / "annotations" / "instances_val2017.json"
    payload = json.loads(path.read_text())
    payload["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(payload))
    dm = datamodule(coco_root)
    with pytest.raises(ValueError, match=r"instances_val2017.json: annotation 1 has category_id 99"):
        dm.setup("validate")


# ---- Hugging Face `datasets` source -------------------------------------------------------------------------


def hf_split(num_empty: int):
    import datasets

    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=["cat", "dog"])),
            },
        }
    )
    rng = np.random.default_rng(0)
    rows = {"image_id": [], "image": [], "objects": []}
    for i in range(2 + num_empty):
        rows["image_id"].append(100 + i)
        rows["image"].append(Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)))
        objects = {"bbox": [[2.0, 3.0, 10.0, 5.0], [20.0, 10.0, 10.0, 10.0]], "category": [1, 0]}
        rows["objects"].append(objects if i < 2 else {"bbox": [], "category": []})
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_source_gives_boxes_and_labels(tmp_path: Path, layout: str) -> None:
    import datasets

    splits = {"train": hf_split(num_empty=1), "validation": hf_split(num_empty=1)}
    if layout == "save_to_disk":
        datasets.DatasetDict(splits).save_to_disk(str(tmp_path))
    else:
        for name, split in splits.items():
            split.to_parquet(str(tmp_path / f"{name}.parquet"))
    dm = COCODataModule(str(tmp_path), source="hf", masks=False, num_workers=0, flip_prob=0.0)
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    assert len(dm.train_set) == 2, "the image without objects is left out of training"
    assert len(dm.val_set) == 3
    sample = dm.val_set[0]
    image, target = sample["image"], sample["target"]
    assert image.shape == (3, HEIGHT, WIDTH)
    assert target["image_id"] == 100
    assert target["labels"].tolist() == [1, 0]
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[2.0, 3.0, 12.0, 8.0], [20.0, 10.0, 30.0, 20.0]])
    )
    torch.testing.assert_close(target["area"], torch.tensor([50.0, 100.0]))


def test_hf_source_refuses_masks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boxes only"):
        COCODataModule(str(tmp_path), source="hf", masks=True)
