"""timm models as backbones (``timm/<name>``): levels, loading a timm state dict, layer decay, all three tasks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch import LightningModule, Trainer
from timm.optim import param_groups_layer_decay
from torch.utils.data import DataLoader

from swinlab.data.base import collate_as_lists
from swinlab.models import create_model, load_pretrained
from swinlab.tasks import ClassificationTask, DetectionTask, SegmentationTask

TINY_HEADS = {"fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 16, "min_size": 64, "max_size": 64}


@pytest.mark.parametrize(
    ("name", "channels"), [("resnet18", [64, 128, 256, 512]), ("convnext_atto", [40, 80, 160, 320])]
)
def test_features_give_four_levels_at_strides_4_to_32(name: str, channels: list[int]) -> None:
    model = create_model(f"timm/{name}", num_classes=0, out_indices=(0, 1, 2, 3), img_size=64)
    assert model.feature_channels == channels and model.feature_strides == [4, 8, 16, 32]
    maps = model.forward_features(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // s, 96 // s) for c, s in zip(channels, [4, 8, 16, 32])]
    later = create_model(f"timm/{name}", num_classes=0, out_indices=(1, 3))
    assert later.feature_channels == channels[1::2] and later.feature_strides == [8, 32]


def test_classifier_takes_in_chans_and_img_size_where_the_model_does() -> None:
    resnet = create_model("timm/resnet18", num_classes=10, in_chans=1, img_size=32)  # img_size dropped
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert [m.shape[1:] for m in resnet.forward_features(torch.randn(2, 1, 32, 32))] == [
        (64, 8, 8),
        (128, 4, 4),
        (256, 2, 2),
        (512, 1, 1),
    ]
    deit = create_model("timm/deit_tiny_patch16_224", num_classes=3, img_size=32, depth=2)
    assert deit.model.patch_embed.img_size == (32, 32)
    assert deit(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_model_without_four_levels_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'deit_tiny_patch16_224' has no feature levels at strides \(4, 8, 16, 32\)"):
        create_model("timm/deit_tiny_patch16_224", num_classes=0, out_indices=(0, 1, 2, 3))
    with pytest.raises(ValueError, match="out_indices=\\(4,\\) must name levels in 0..3"):
        create_model("timm/resnet18", out_indices=(4,))
    with pytest.raises(ValueError, match="unknown timm model 'resnet_18'"):
        create_model("timm/resnet_18")
    with pytest.raises(TypeError, match="timm/resnet18.*window_size"):
        create_model("timm/resnet18", window_size=7)


def test_timm_state_dict_loads_into_features_model_as_timm_loads_it(tmp_path: Path) -> None:
    # convnext's features model renames modules (stages.0 -> stages_0); timm's own loader is the reference.
    torch.manual_seed(0)
    path = tmp_path / "convnext_atto.pth"
    state = timm.create_model("convnext_atto").state_dict()
    torch.save(state, path)
    model = create_model("timm/convnext_atto", num_classes=0, out_indices=(0, 1, 2, 3))
    result = load_pretrained(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert {"head.fc.weight", "head.norm.weight"} <= set(result.skipped_keys)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, state[model.full_key(key)]), key
    reference = timm.create_model(
        "convnext_atto", features_only=True, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(model.eval()(images), reference.eval()(images)):
            assert torch.equal(ours, theirs)


def test_classifier_loads_with_another_head_and_one_input_channel(tmp_path: Path, caplog) -> None:
    path = tmp_path / "resnet18.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18").state_dict(), str(path))
    model = create_model("timm/resnet18", num_classes=10, in_chans=1)
    with caplog.at_level(logging.WARNING):
        result = load_pretrained(model, path)
    assert result.skipped_keys == ["fc.weight", "fc.bias"] and "num_classes differs" in caplog.text
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    reference = timm.create_model(
        "resnet18", num_classes=10, in_chans=1, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).state_dict()
    for key, value in model.model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, reference[key]), key  # conv1 summed over RGB as timm adapts it


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "convnext_femto.pth"
    torch.save(timm.create_model("convnext_femto").state_dict(), path)  # wider than atto: 48 channels, not 40
    with pytest.raises(ValueError, match=r"convnext_femto.pth: tensor 'stem.0.weight' has shape \(48, 3, 4, 4\)"):
        load_pretrained(create_model("timm/convnext_atto", num_classes=0, out_indices=(0, 1, 2, 3)), path)
    torch.save({"encoder_weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="none of its tensors fits timm model 'resnet18'"):
        load_pretrained(create_model("timm/resnet18"), path)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_layer_ids_give_the_scales_of_timm_layer_decay(name: str) -> None:
    model = create_model(f"timm/{name}", num_classes=10)
    groups = param_groups_layer_decay(model.model, layer_decay=0.5)
    timm_scale = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    for param_name, param in model.named_parameters():
        ours = 0.5 ** (model.num_lr_layers - model.lr_layer_id(param_name))
        assert ours == timm_scale[id(param)], param_name
    # A features model names its modules differently but gives each parameter the layer of the classifier's.
    features = create_model(f"timm/{name}", num_classes=0, out_indices=(0, 1, 2, 3))
    assert features.num_lr_layers == model.num_lr_layers
    for param_name, _ in features.named_parameters():
        full = features.full_key(param_name.removeprefix("model."))
        assert features.lr_layer_id(param_name) == model.lr_layer_id(f"model.{full}"), param_name


def fit_steps(task: LightningModule, loader: DataLoader, steps: int = 2) -> None:
    """Train ``steps`` optimizer steps on CPU, no validation, and assert that the backbone moved."""
    before = {k: v.clone() for k, v in task.state_dict().items() if "model." in k and v.is_floating_point()}
    Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(task, loader)
    after = task.state_dict()
    assert before and any(not torch.equal(v, after[k]) for k, v in before.items())


def test_classification_task_trains_a_timm_classifier_with_layer_decay() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(
        backbone="timm/resnet18", backbone_kwargs={"in_chans": 1, "img_size": 32}, num_classes=3, layer_decay=0.5
    )
    scales = {group["lr_scale"] for group in task.parameter_groups()}
    assert min(scales) < max(scales) == 1.0
    data = [{"image": torch.randn(1, 32, 32), "label": i % 3} for i in range(8)]
    fit_steps(task, DataLoader(data, batch_size=4))


def test_detection_task_trains_on_timm_features() -> None:
    torch.manual_seed(0)
    task = DetectionTask(num_classes=2, backbone="timm/resnet18", layer_decay=0.5, **TINY_HEADS)
    scale_of = {name: group["lr_scale"] for group in task.parameter_groups() for name in group["names"]}
    assert (
        scale_of["detector.backbone.body.model.conv1.weight"]
        < scale_of["detector.backbone.fpn.layer_blocks.0.0.weight"]
    )
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 10:40], masks[1, 30:60, 20:50] = 1, 1
    target = {
        "boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0], [20.0, 30.0, 50.0, 60.0]]),
        "labels": torch.tensor([0, 1]),
    }
    data = [{"image": torch.rand(3, 64, 64), "target": {**target, "masks": masks}} for _ in range(4)]
    fit_steps(task, DataLoader(data, batch_size=2, collate_fn=collate_as_lists))


def test_segmentation_task_trains_on_timm_features() -> None:
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=4, backbone="timm/convnext_atto", decode_channels=8, aux_channels=8)
    assert task.backbone.feature_channels == [40, 80, 160, 320]
    data = [{"image": torch.randn(3, 32, 32), "mask": torch.randint(0, 4, (32, 32))} for _ in range(4)]
    fit_steps(task, DataLoader(data, batch_size=2))
