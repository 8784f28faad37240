"""The backbone comparison grids (configs/ablations/backbones*.yaml): every point resolves on its base config to
exactly its own backbone and kwargs, builds, trains one step, and is matched in size to the Swin point."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from swinlab import sweep
from swinlab.cli import main as cli_main
from swinlab.models import create_model
from swinlab.models.flops import count_macs
from swinlab.models.timm_backbone import TimmBackbone
from tests.helpers import REPO, load_script

ABLATIONS = REPO / "configs" / "ablations"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
BACKBONES = ["swin_t", "swinv2_t", "timm/resnet50", "timm/convnext_tiny"]
# (grid, base, task kwargs of the backbone, input (C, H, W) its size is compared at)
GRIDS = {
    "fashion_mnist": ("backbones.yaml", "fashion_mnist_base.yaml", {"num_classes": 10}, (1, 32, 32)),
    "shapes": (
        "backbones_shapes_segmentation.yaml",
        "shapes_segmentation_base.yaml",
        {"num_classes": 0, "out_indices": (0, 1, 2, 3)},
        (3, 96, 96),
    ),
}


def resolved_points(grid_name: str, tmp_path: Path) -> list[tuple[dict, dict]]:
    """(point overrides, the model section of the sweep's merged config) for every point of a grid."""
    grid, base, _, _ = GRIDS[grid_name]
    points, seeds = sweep.load_grid(ABLATIONS / grid)
    assert seeds == [0, 1, 2]
    resolved = []
    for index, point in enumerate(points):
        run_dir = tmp_path / str(index)
        run_dir.mkdir()
        config = sweep.point_config([ABLATIONS / base], point, 0, run_dir)
        # The CLI resolves ${...} (img_size: ${data.init_args.image_size}); so does this.
        resolved.append((point, OmegaConf.to_container(OmegaConf.load(config), resolve=True)["model"]["init_args"]))
    return resolved


def point_kwargs(point: dict) -> dict:
    """The backbone_kwargs a timm point sets (its dotted keys under backbone_kwargs)."""
    prefix = "model.init_args.backbone_kwargs."
    return {key.removeprefix(prefix): value for key, value in point.items() if key.startswith(prefix)}


@pytest.mark.parametrize("grid_name", GRIDS)
def test_grid_resolves_each_backbone_with_only_its_own_kwargs(grid_name, tmp_path):
    resolved = resolved_points(grid_name, tmp_path)
    assert [model["backbone"] for _, model in resolved] == BACKBONES
    base_kwargs = resolved[0][1]["backbone_kwargs"]
    assert "window_size" in base_kwargs  # the base's Swin kwargs ...
    assert resolved[1][1]["backbone_kwargs"] == base_kwargs  # ... which Swin V2 keeps
    for point, model in resolved[2:]:  # the timm points replace them: no Swin-only key reaches timm
        assert model["backbone_kwargs"] == point_kwargs(point)


def backbone_size(backbone: str, kwargs: dict, grid_name: str) -> tuple[int, int]:
    """(parameters, multiply-adds) of a point's backbone as its task builds it, at the grid's input size."""
    _, _, task_kwargs, input_size = GRIDS[grid_name]
    model = create_model(backbone, **task_kwargs, **kwargs)
    return sum(p.numel() for p in model.parameters()), count_macs(model, input_size)


@pytest.mark.parametrize("grid_name", GRIDS)
def test_convnets_are_matched_in_size_to_swin(grid_name, tmp_path):
    """Within 40% of Swin-T's parameters and multiply-adds (the numbers docs/backbones.md states)."""
    resolved = resolved_points(grid_name, tmp_path)
    swin_params, swin_macs = backbone_size("swin_t", resolved[0][1]["backbone_kwargs"], grid_name)
    for _, model in resolved[1:]:
        params, macs = backbone_size(model["backbone"], model["backbone_kwargs"], grid_name)
        assert 0.6 < params / swin_params < 1.4 and 0.6 < macs / swin_macs < 1.4, model


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training and one validation image of the synthetic shapes set."""
    root = tmp_path_factory.mktemp("shapes_segmentation")
    load_script("make_shapes_segmentation").main(["--out", str(root), "--num-train", "2", "--num-val", "1"])
    return root


def tiny_data_args(grid_name: str, fashion_mnist_dir: Path, shapes_root: Path) -> list[str]:
    if grid_name == "fashion_mnist":
        return [
            f"--data.init_args.data_dir={fashion_mnist_dir}",
            "--data.init_args.val_size=8",
            "--data.init_args.persistent_workers=false",
        ]
    return [f"--data.init_args.data_root={shapes_root}"]


@pytest.mark.parametrize("grid_name", GRIDS)
@pytest.mark.parametrize("index", range(len(BACKBONES)), ids=BACKBONES)
def test_every_point_builds_and_trains_one_step(grid_name, index, tmp_path, fashion_mnist_dir, shapes_root):
    grid, base, _, _ = GRIDS[grid_name]
    points, _ = sweep.load_grid(ABLATIONS / grid)
    config = sweep.point_config([ABLATIONS / base], points[index], 0, tmp_path)
    cli = cli_main(
        [
            "--config",
            str(config),
            *CPU,
            *tiny_data_args(grid_name, fashion_mnist_dir, shapes_root),
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
        ],
        run=False,
    )
    backbone = cli.model.backbone
    assert isinstance(backbone, TimmBackbone) == (index >= 2)
    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    changed = [name for name, p in backbone.named_parameters() if not torch.equal(p, before[name])]
    assert changed, f"no backbone parameter of {points[index]} changed in one training step"
