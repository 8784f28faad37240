"""swinlab.models.pretrained: position-table resizing against the official formulas, key-prefix stripping."""

import pytest
import torch
import torch.nn.functional as F

from swinlab.models import create_model, load_pretrained
from swinlab.models.pretrained import resize_absolute_pos_embed, resize_relative_bias_table

SMALL = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=3)


def official_resized_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """microsoft/Swin-Transformer utils.py load_pretrained: ((2M'-1)^2, nH) -> ((2M-1)^2, nH), bicubic."""
    L1, nH = table.shape
    S1, S2 = int(L1**0.5), 2 * window - 1
    resized = F.interpolate(table.permute(1, 0).view(1, nH, S1, S1), size=(S2, S2), mode="bicubic")
    return resized.view(nH, S2 * S2).permute(1, 0)


def official_resized_pos_embed(pos: torch.Tensor, side: int) -> torch.Tensor:
    """microsoft/Swin-Transformer utils.py load_pretrained: (1, L1, C) -> (1, side * side, C), bicubic."""
    _, L1, C = pos.shape
    S1 = int(L1**0.5)
    grid = pos.reshape(-1, S1, S1, C).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(side, side), mode="bicubic").permute(0, 2, 3, 1).flatten(1, 2)


@pytest.mark.parametrize("window", [4, 12])
def test_resize_relative_bias_table_equals_official_bicubic(window):
    torch.manual_seed(0)
    table = torch.randn(13 * 13, 3)  # window 7, three heads
    resized = resize_relative_bias_table(table, window)
    assert resized.shape == ((2 * window - 1) ** 2, 3)
    torch.testing.assert_close(resized, official_resized_bias_table(table, window), atol=1e-6, rtol=0)


def test_resize_absolute_pos_embed_equals_official_bicubic():
    torch.manual_seed(0)
    pos = torch.randn(1, 8 * 8, 5)  # the official (1, L, C) layout
    resized = resize_absolute_pos_embed(pos, (12, 12))
    assert resized.shape == (1, 12, 12, 5)
    torch.testing.assert_close(resized.flatten(1, 2), official_resized_pos_embed(pos, 12), atol=1e-6, rtol=0)


def test_load_pretrained_resizes_both_tables_as_the_official_loader(tmp_path):
    """A window-7, 32-pixel checkpoint in the official layout loaded into a window-4, 48-pixel model."""
    torch.manual_seed(0)
    source = create_model("swin_t", window_size=7, position_bias="relative+absolute", **SMALL)
    state = source.state_dict()
    state["absolute_pos_embed"] = state["absolute_pos_embed"].flatten(1, 2)  # official (1, L, C)
    torch.save({"model": state}, tmp_path / "official.pth")
    target = create_model("swin_t", window_size=4, position_bias="relative+absolute", **{**SMALL, "img_size": 48})
    result = load_pretrained(target, tmp_path / "official.pth")
    assert not result.missing_keys and not result.unexpected_keys
    loaded = target.state_dict()
    tables = [key for key in state if key.endswith("relative_position_bias_table")]
    assert len(tables) == 4
    for key in tables:
        torch.testing.assert_close(loaded[key], official_resized_bias_table(state[key], 4), atol=1e-6, rtol=0)
    expected = official_resized_pos_embed(state["absolute_pos_embed"], 12).view(1, 12, 12, -1)
    torch.testing.assert_close(loaded["absolute_pos_embed"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "model.", "encoder.", "module.backbone."])
def test_wrapped_keys_load_to_equal_weights(tmp_path, prefix):
    """DDP (``module.``), Lightning task (``backbone.``), ``model.``/``encoder.`` wrappers, and DDP around a task."""
    torch.manual_seed(0)
    source = create_model("swin_t", window_size=4, **SMALL)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {prefix + key: value for key, value in source.state_dict().items()}}, path)
    target = create_model("swin_t", window_size=4, **SMALL)
    result = load_pretrained(target, path)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_lightning_checkpoint_keeps_only_the_backbone(tmp_path):
    """A task checkpoint holds modules next to the backbone (an EMA copy, losses, metrics): only ``backbone.*``
    reaches the model."""
    torch.manual_seed(0)
    source = create_model("swin_t", window_size=4, **SMALL)
    state = {f"backbone.{key}": value for key, value in source.state_dict().items()}
    state["ema.module.head.weight"] = torch.zeros(3, 32)
    state["val_metrics.top1.tp"] = torch.zeros(3)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    target = create_model("swin_t", window_size=4, **SMALL)
    result = load_pretrained(target, tmp_path / "last.ckpt")
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target.head.weight, source.head.weight)


# --- SimMIM pre-training checkpoints --------------------------------------------------------------------------------

SIMMIM_SHAPE = dict(img_size=48, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.0)


def simmim_checkpoints(tmp_path):
    """A window-6 SimMIM pre-training as an official release file and as a swinlab Lightning checkpoint."""
    from swinlab.tasks import MaskedImageModelingTask

    torch.manual_seed(0)
    task = MaskedImageModelingTask("swin_t", {**SIMMIM_SHAPE, "window_size": 6})
    with torch.no_grad():
        for layer in task.model.encoder.layers:
            for block in layer.blocks:
                block.attn.relative_position_bias_table.normal_()
    simmim = task.model
    official = {
        "encoder." + key.replace("layers.1.downsample.", "layers.0.downsample."): value
        for key, value in simmim.encoder.state_dict().items()
    }
    official["encoder.mask_token"] = simmim.mask_token.detach()
    official.update({f"decoder.{k}": v for k, v in simmim.decoder.state_dict().items()})
    torch.save({"model": official, "epoch": 799}, tmp_path / "official_simmim.pth")
    torch.save({"state_dict": task.state_dict(), "epoch": 3}, tmp_path / "swinlab_simmim.ckpt")
    return task.model.encoder


@pytest.mark.parametrize("file", ["official_simmim.pth", "swinlab_simmim.ckpt"])
def test_simmim_window6_checkpoint_loads_into_window7_classification_by_the_official_remap(file, tmp_path, caplog):
    from swinlab.tasks import ClassificationTask
    from tests.reference.official_simmim import remap_relative_position_bias_table

    encoder = simmim_checkpoints(tmp_path)
    with caplog.at_level("INFO", logger="swinlab.models.pretrained"):
        task = ClassificationTask(
            "swin_t", {**SIMMIM_SHAPE, "window_size": 7}, pretrained=str(tmp_path / file), num_classes=10
        )
    dropped = [r.getMessage() for r in caplog.records if "SimMIM pre-training checkpoint" in r.getMessage()]
    assert len(dropped) == 1 and "mask_token" in dropped[0] and "decoder.0.weight" in dropped[0]
    assert not [r for r in caplog.records if "no place in the model" in r.getMessage()]  # nothing else left over
    loaded, pretrained = task.backbone.state_dict(), encoder.state_dict()
    for key, value in pretrained.items():
        if key.endswith("relative_position_bias_table"):
            expected = remap_relative_position_bias_table(value, loaded[key].shape[0])
            assert loaded[key].shape == (13 * 13, value.shape[1])
            torch.testing.assert_close(loaded[key], expected, rtol=0, atol=1e-5, msg=key)
            # The spline passes through the pre-trained offsets: offset 0 keeps its bias.
            torch.testing.assert_close(loaded[key][13 * 13 // 2], value[11 * 11 // 2], rtol=0, atol=1e-5)
        elif not key.endswith("relative_position_index"):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_simmim_checkpoint_gives_its_encoder_to_a_dense_backbone(tmp_path):
    """Detection and segmentation build the backbone with out_indices: the encoder loads, the final norm is skipped."""
    encoder = simmim_checkpoints(tmp_path)
    dense = create_model("swin_t", **SIMMIM_SHAPE, window_size=6, num_classes=0, out_indices=(0, 1))
    result = load_pretrained(dense, tmp_path / "official_simmim.pth")
    assert [k for k in result.missing_keys if not k.startswith(("norm0", "norm1"))] == []
    assert not result.unexpected_keys
    torch.testing.assert_close(dense.patch_embed.proj.weight, encoder.patch_embed.proj.weight, rtol=0, atol=0)


def test_swinv2_simmim_checkpoint_moves_to_another_window_through_pretrained_window_size(tmp_path):
    """V2's continuous position bias has no table: the CPB MLP carries over, the new window names the old one."""
    from swinlab.tasks import ClassificationTask, MaskedImageModelingTask

    pretraining = MaskedImageModelingTask("swinv2_t", {**SIMMIM_SHAPE, "window_size": 6})
    torch.save({"state_dict": pretraining.state_dict()}, tmp_path / "v2.ckpt")
    kwargs = {**SIMMIM_SHAPE, "window_size": 7, "pretrained_window_size": 6}
    task = ClassificationTask("swinv2_t", kwargs, pretrained=str(tmp_path / "v2.ckpt"), num_classes=10)
    loaded, pretrained = task.backbone.state_dict(), pretraining.model.encoder.state_dict()
    cpb = [key for key in pretrained if "cpb_mlp" in key]
    assert cpb and all(torch.equal(loaded[key], pretrained[key]) for key in cpb)
    assert task.backbone.layers[0].blocks[0].attn.pretrained_window_size == 6
