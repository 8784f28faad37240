"""Every shipped recipe exports with random weights: ``python -m swinlab export --config RECIPE --output F``.

Recipes that differ only in training settings (optimizer, schedule, stochastic depth, published weights, ...) or in
model size (``swin_t/s/b/l``: width and depth) export graphs of one structure. Each structure is exported in full
at its smallest size (its smallest recipe, with ``swin_t`` or ``swinv2_t`` where that recipe is larger) and checked
against PyTorch; every other recipe is built with random weights, network included.
``SWINLAB_EXPORT_EVERY_RECIPE=1`` exports every recipe in full instead (about a minute each on a 2-core CPU).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from swinlab.config_compose import compose
from swinlab.export import build_task, main, parse_config
from tests.test_configs import CONFIGS, SHIPPED

# Init arguments that shape training only: the exported graph is the same whatever their value.
TRAINING_ONLY = {
    "optimizer", "lr_scheduler", "layer_decay", "pretrained", "label_smoothing", "mixup_alpha", "cutmix_alpha",
    "mixup_prob", "mixup_switch_prob", "ema_decay", "lr_reference_batch", "compile", "compile_kwargs",
    "predictions_file", "predictions_dir", "num_pictures", "aux_loss_weight", "test_scales", "test_flip",
    "test_augmentation", "ms_flip_ratios", "num_classes",
}  # fmt: skip
SIZE_ONLY = {"drop_path_rate", "embed_dim", "depths", "num_heads"}
SIZE_ORDER = "tsbl"


def structure(recipe: Path) -> str:
    """The recipe's model config without training-only and size-only settings, with ``swin_t/s/b/l`` as one name."""
    model = compose(recipe)["model"]
    init_args = {key: value for key, value in model.get("init_args", {}).items() if key not in TRAINING_ONLY}
    backbone_kwargs = init_args.get("backbone_kwargs") or {}
    init_args["backbone_kwargs"] = {key: value for key, value in backbone_kwargs.items() if key not in SIZE_ONLY}
    init_args["backbone"] = re.sub(r"_[tsbl]$", "_*", str(init_args.get("backbone", "")))
    return json.dumps([model["class_path"], init_args], sort_keys=True, default=str)


def size_rank(recipe: Path) -> int:
    """0..3 for a recipe of swin(v2)_t/s/b/l: the smallest of a structure is exported."""
    backbone = compose(recipe)["model"].get("init_args", {}).get("backbone", "")
    match = re.search(r"_([tsbl])$", str(backbone))
    return SIZE_ORDER.index(match.group(1)) if match else 0


EVERY = os.environ.get("SWINLAB_EXPORT_EVERY_RECIPE") == "1"
GROUPS: dict[str, list[Path]] = {}
for path in SHIPPED:
    GROUPS.setdefault(structure(path), []).append(path)
EXPORTED = SHIPPED if EVERY else [min(paths, key=size_rank) for paths in GROUPS.values()]
BUILT = [path for path in SHIPPED if path not in EXPORTED]


def recipe_args(recipe: Path, tmp_path: Path, smallest: bool = False) -> list[str]:
    """Export arguments of ``recipe`` with random weights (published ones would need the Hub); the recipes' data
    folders are relative to the working folder, an empty one here, so num_classes is given. ``smallest``: the
    ``_t`` model of the recipe's family."""
    args = ["--config", str(recipe), "--model.init_args.pretrained=null", f"--output={tmp_path / 'model.onnx'}"]
    if "pretraining" not in recipe.parts:
        args.append("--model.init_args.num_classes=7")
    backbone = str(compose(recipe)["model"]["init_args"].get("backbone", ""))
    if smallest and size_rank(recipe) > 0:
        args.append(f"--model.init_args.backbone={backbone[:-1]}t")
    return args


def test_every_recipe_is_exported_or_shares_an_exported_structure() -> None:
    assert len(GROUPS) < len(SHIPPED) and set(EXPORTED) | set(BUILT) == set(SHIPPED)
    assert all(any(structure(path) == structure(exported) for exported in EXPORTED) for path in BUILT)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", EXPORTED, ids=[str(p.relative_to(CONFIGS)) for p in EXPORTED])
def test_recipe_exports_with_random_weights(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    report = main(recipe_args(recipe, tmp_path, smallest=not EVERY))
    assert Path(report["output"]).is_file()
    # Detection boxes are in pixels of images of up to 1333 pixels.
    assert report["max_abs_diff"] < (1e-2 if "detection" in recipe.parts else 1e-3), report


@pytest.mark.slow
@pytest.mark.parametrize("recipe", BUILT, ids=[str(p.relative_to(CONFIGS)) for p in BUILT])
def test_recipe_of_an_exported_structure_builds(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its task builds from the recipe, random weights and the network to export included."""
    monkeypatch.chdir(tmp_path)
    task = build_task(parse_config(recipe_args(recipe, tmp_path)), None)
    network = task.export_network()
    assert not network.training and sum(p.numel() for p in network.parameters()) > 1e5
