import pytest
import torch

from swinlab.models import create_model, load_pretrained
from swinlab.models.swin_mlp import SwinMLPBlock
from swinlab.tasks import ClassificationTask
from swinlab.tasks.detection import DetectionTask
from swinlab.tasks.segmentation import SegmentationTask
from tests.helpers import official_layout

TINY = {"embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4, "patch_size": 2, "img_size": 32}


def test_swin_mlp_t_matches_the_official_size():
    model = create_model("swin_mlp_t")
    assert sum(p.numel() for p in model.parameters()) == 21_152_072  # official SwinMLP-T/C12: 21.2M
    block = model.layers[2].blocks[1]
    assert block.spatial_mlp.weight.shape == (32 * 64, 64, 1) and block.shift_size == 4
    # At 256 the last stage's 8x8 map is no larger than the window: the official code drops its shift.
    assert [b.shift_size for b in model.layers[3].blocks] == [0, 0]
    kept = create_model("swin_mlp_t", clip_window_to_feature=False, num_classes=0)
    assert [b.shift_size for b in kept.layers[3].blocks] == [0, 4]


@pytest.mark.parametrize("size", [(32, 32), (29, 45), (6, 6)])
def test_any_input_size_features_and_logits(size):
    model = create_model("swin_mlp_t", **TINY, num_classes=0, out_indices=(0, 1)).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, *size))
    for f, c, s in zip(feats, model.feature_channels, model.feature_strides):
        assert f.shape == (2, c, -(-size[0] // s), -(-size[1] // s))
    classifier = create_model("swin_mlp_t", **TINY, num_classes=7)
    assert classifier(torch.randn(1, 3, *size)).shape == (1, 7)
    classifier.reset_classifier(3)
    assert classifier(torch.randn(1, 3, *size)).shape == (1, 3) and classifier.num_features == 32


def test_spatial_mlp_mixes_tokens_per_head_group():
    block = SwinMLPBlock(dim=6, num_heads=2, window_size=2)
    windows = torch.randn(3, 4, 6)  # (windows, tokens, channels), head groups of 3 channels
    weight = block.spatial_mlp.weight[..., 0].view(2, 4, 4)  # (head, output token, input token)
    groups = windows.view(3, 4, 2, 3)
    expected = torch.einsum("hnm,bmhc->bnhc", weight, groups) + block.spatial_mlp.bias.view(2, 4).T[None, :, :, None]
    torch.testing.assert_close(block.mix_windows(windows), expected.reshape(3, 4, 6))


def mixing_reach(block: SwinMLPBlock, size: int = 8) -> torch.Tensor:
    """(size, size) bool: which output tokens of the token mixing change when input token (0, 0) changes."""
    x = torch.randn(1, size, size, block.norm1.normalized_shape[0])
    y = x.clone()
    y[0, 0, 0] += torch.randn(x.shape[-1])  # not a constant: LayerNorm would remove that
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()  # keep only the spatial (window) mixing in the residual branch
        diff = (block(y) - block(x)).abs().sum(-1)[0]
    return diff > 1e-6


def test_plain_windows_mix_inside_their_window_and_shifted_ones_across():
    plain, shifted = SwinMLPBlock(8, 2, window_size=4), SwinMLPBlock(8, 2, window_size=4, shift=True)
    reach = mixing_reach(plain)
    assert reach[:4, :4].all() and reach.sum() == 16  # token (0, 0) reaches exactly its own 4x4 window
    # Shift 2 = padding 2 before: token (0, 0) sits at (2, 2) of the first shifted window, which covers rows/cols 0-1.
    reach = mixing_reach(shifted)
    assert reach[:2, :2].all() and reach.sum() == 4


def test_shift_switch_and_position_bias_choices():
    shifted = create_model("swin_mlp_t", **TINY)
    plain = create_model("swin_mlp_t", **TINY, shift=False)
    assert [b.shift_size for s in shifted.layers for b in s.blocks] == [0, 2, 0, 2]
    assert [b.shift_size for s in plain.layers for b in s.blocks] == [0, 0, 0, 0]
    assert create_model("swin_mlp_t", **TINY, position_bias="absolute").absolute_pos_embed is not None
    with pytest.raises(ValueError, match="position_bias 'none' or 'absolute'"):
        create_model("swin_mlp_t", **TINY, position_bias="relative")
    with pytest.raises(ValueError, match="no window attention, so it takes no qkv_bias, padding"):
        create_model("swin_mlp_t", **TINY, padding="mask", qkv_bias=False)


def test_gradient_checkpointing_recomputes_blocks_and_gives_same_gradients():
    """Checkpointed blocks run their forward again in the backward pass (counted as calls start), only in the stages
    asked for; gradients equal those without checkpointing."""
    torch.manual_seed(0)
    model = create_model("swin_mlp_t", **TINY, num_classes=3, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    blocks = [block for stage in model.layers for block in stage.blocks]
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    assert calls == [1, 1, 1, 1]
    for flags, recomputed in (((True, False), [2, 2, 1, 1]), (True, [2, 2, 2, 2])):
        model.zero_grad()
        calls[:] = [0] * len(blocks)
        model.set_grad_checkpointing(flags)
        model(x).sum().backward()
        assert calls == recomputed
        for grad, p in zip(expected, model.parameters()):
            torch.testing.assert_close(p.grad, grad)


def test_every_task_builds_and_trains_with_swin_mlp():
    kwargs = {key: value for key, value in TINY.items() if key != "img_size"}
    classification = ClassificationTask(backbone="swin_mlp_t", backbone_kwargs={**TINY, "in_chans": 1}, num_classes=4)
    classification.train_loss(classification(torch.randn(2, 1, 32, 32)), torch.tensor([0, 3])).backward()
    assert classification.backbone.layers[0].blocks[1].spatial_mlp.weight.grad.abs().sum() > 0
    backbone = {**kwargs, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "patch_size": 4}
    segmentation = SegmentationTask(
        num_classes=3, backbone="swin_mlp_t", backbone_kwargs=backbone, decode_channels=8, aux_channels=8
    ).eval()
    with torch.no_grad():
        assert segmentation(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    detection = DetectionTask(
        num_classes=2,
        backbone="swin_mlp_t",
        backbone_kwargs=backbone,
        fpn_channels=16,
        box_head_dim=32,
        mask_head_channels=16,
        min_size=64,
        max_size=64,
    ).eval()
    with torch.no_grad():
        (result,) = detection([torch.rand(3, 64, 80)])
    assert set(result) >= {"boxes", "labels", "scores"}


def test_official_swin_mlp_checkpoint_layout_loads(tmp_path):
    """The official Swin-MLP files use the official Swin layout (patch merging at the end of the previous stage)."""
    kwargs = dict(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5
    )
    torch.manual_seed(0)
    source = create_model("swin_mlp_t", **kwargs).eval()
    checkpoint = official_layout(source.state_dict(), config="swin_mlp_tiny_c12_patch4_window8_256")
    assert "layers.0.downsample.reduction.weight" in checkpoint["model"]
    torch.save(checkpoint, tmp_path / "swin_mlp.pth")
    torch.manual_seed(1)
    model = create_model("swin_mlp_t", **kwargs).eval()
    result = load_pretrained(model, tmp_path / "swin_mlp.pth")
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
