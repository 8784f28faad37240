from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from swinlab.data import SegmentationDataModule
from tests.helpers import REPO, load_script


def test_writes_ade20k_layout_that_the_quickstart_reads(tmp_path: Path) -> None:
    script = load_script("make_shapes_segmentation")
    script.main(["--out", str(tmp_path), "--num-train", "3", "--num-val", "2", "--size", "48", "--seed", "1"])
    for split, count in (("training", 3), ("validation", 2)):
        images = sorted((tmp_path / "images" / split).glob("*.jpg"))
        labels = sorted((tmp_path / "annotations" / split).glob("*.png"))
        assert len(images) == len(labels) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
        for image, label in zip(images, labels):
            label_map = np.asarray(Image.open(label))
            assert Image.open(image).size == (48, 48) and label_map.shape == (48, 48)
            assert set(np.unique(label_map)) <= set(range(len(script.CLASS_NAMES) + 1))
            assert (label_map == 1).any() and (label_map == 0).any()  # background and shape outlines

    config = yaml.safe_load((REPO / "configs" / "segmentation" / "quickstart_shapes.yaml").read_text())
    data_args = config["data"]["init_args"]
    assert data_args["class_names"] == list(script.CLASS_NAMES)
    assert Path(data_args["data_root"]) == script.DEFAULT_OUT
    assert config["data"]["class_path"] == "swinlab.data.SegmentationDataModule"
    module = SegmentationDataModule(
        str(tmp_path),
        class_names=data_args["class_names"],
        reduce_zero_label=data_args["reduce_zero_label"],
        crop_size=32,
        num_workers=0,
    )
    module.setup("fit")
    mask = module.datasets["val"][0]["mask"]
    assert len(module.datasets["train"]) == 3
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255} and (mask == 255).any()  # outlines are ignored


def test_same_seed_same_data(tmp_path: Path) -> None:
    script = load_script("make_shapes_segmentation")
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    image_a, labels_a = script.make_sample(rng_a, 40)
    image_b, labels_b = script.make_sample(rng_b, 40)
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert np.array_equal(np.asarray(labels_a), np.asarray(labels_b))
