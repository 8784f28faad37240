"""SimMIM: the loss equals the official code's with the same weights and mask, the mask generator draws the official
masks, and bad settings fail with one line naming the value and the fix."""

import numpy as np
import pytest
import timm
import torch

from swinlab.models import MaskGenerator, SimMIM, create_model, load_pretrained
from swinlab.models.simmim import load_simmim_pretrained
from tests.helpers import moved_off_init
from tests.reference import official_simmim

# Two stages at 64x64: patch 4, maps 16x16 and 8x8, window 4 (shifted blocks in both), total stride 8.
SHAPE = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, drop_path_rate=0.0)
TIMM = {"v1": "swin_tiny_patch4_window7_224", "v2": "swinv2_tiny_window8_256"}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_loss_and_reconstruction_equal_the_official_simmim(version, tmp_path):
    torch.manual_seed(0)
    reference_swin = moved_off_init(timm.create_model(TIMM[version], pretrained=False, num_classes=0, **SHAPE)).eval()
    torch.save(reference_swin.state_dict(), tmp_path / "timm.pth")
    encoder = create_model("swin_t" if version == "v1" else "swinv2_t", num_classes=0, **SHAPE).eval()
    assert not load_pretrained(encoder, tmp_path / "timm.pth").missing_keys
    model = SimMIM(encoder).eval()
    reference = official_simmim.SimMIM(official_simmim.SwinTransformerForSimMIM(reference_swin), 8).eval()
    with torch.no_grad():
        model.mask_token.normal_()
        model.decoder[0].weight.normal_(0, 0.1)
        reference.encoder.mask_token.copy_(model.mask_token)
        reference.decoder.load_state_dict(model.decoder.state_dict())

    np.random.seed(0)
    masks = official_simmim.MaskGenerator(64, 16, 4, 0.6)
    mask = torch.from_numpy(np.stack([masks() for _ in range(3)]))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        loss, reconstruction = model(images, mask)
        expected = reference(images, mask)
        expected_reconstruction = reference.decoder(reference.encoder(images, mask))
    assert abs(loss.item() - expected.item()) < 1e-5
    torch.testing.assert_close(reconstruction, expected_reconstruction, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size,mask_patch,patch,ratio", [(192, 32, 4, 0.6), (64, 16, 4, 0.6), (96, 32, 2, 0.3)])
def test_mask_generator_draws_the_official_masks(size, mask_patch, patch, ratio):
    official = official_simmim.MaskGenerator(size, mask_patch, patch, ratio)
    ours = MaskGenerator(size, mask_patch, patch, ratio)
    generator = torch.Generator().manual_seed(0)
    scale = mask_patch // patch
    np.random.seed(0)
    for _ in range(20):
        expected, mask = official(), ours(generator)
        assert mask.shape == expected.shape and mask.dtype == torch.int64
        assert mask.sum() == expected.sum()  # ceil(ratio x blocks) blocks of scale x scale tokens
        blocks = mask[::scale, ::scale]
        assert torch.equal(mask, blocks.repeat_interleave(scale, 0).repeat_interleave(scale, 1))
    # The same generator state gives the same mask; the masks vary from draw to draw.
    first = ours(torch.Generator().manual_seed(1))
    assert torch.equal(first, ours(torch.Generator().manual_seed(1)))
    assert not torch.equal(first, ours(torch.Generator().manual_seed(2)))


def test_mask_generator_covers_non_square_inputs():
    mask = MaskGenerator((64, 96), 32, 4, 0.5)(torch.Generator().manual_seed(0))
    assert mask.shape == (16, 24) and mask.sum() == 3 * 64


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_size=192, mask_patch_size=30, model_patch_size=4), r"mask_patch_size=30 is not a multiple of the"),
        (dict(input_size=200, mask_patch_size=32, model_patch_size=4), r"input size 200x200 is not a multiple of mask"),
    ],
)
def test_mask_generator_refuses_sizes_that_do_not_divide(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskGenerator(**kwargs)


def test_v2_switches_and_sizes_off_the_stride_pretrain():
    """SwinV2 with three stages (stride 16) at 40x40: multiples of the mask patch (8), not of the stride."""
    model = SimMIM(create_model("swinv2_t", num_classes=0, **{**SHAPE, "depths": (1, 1, 1), "num_heads": (1, 2, 4)}))
    assert model.stride == 16
    mask = torch.stack([MaskGenerator(40, 8, 4, 0.6)(torch.Generator().manual_seed(i)) for i in range(2)])
    loss, reconstruction = model(torch.randn(2, 3, 40, 40), mask)
    loss.backward()
    assert reconstruction.shape == (2, 3, 40, 40) and torch.isfinite(loss)
    assert model.mask_token.grad.abs().sum() > 0


def test_a_mask_of_the_wrong_size_names_the_patch_size():
    model = SimMIM(create_model("swin_t", num_classes=0, **SHAPE))
    with pytest.raises(ValueError, match=r"need \(1, 16, 16\); make the masks with model_patch_size=4"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 8, 8))


def test_a_backbone_that_is_no_swin_is_refused():
    with pytest.raises(ValueError, match="SimMIM needs a swinlab Swin backbone .* got TimmBackbone"):
        SimMIM(create_model("timm/resnet18", num_classes=0))


def test_continue_from_an_official_simmim_release(tmp_path):
    """Official layout: ``encoder.`` + the official Swin keys (patch merging at the end of a stage), the mask
    token inside the encoder, ``decoder.0``."""
    torch.manual_seed(0)
    source = SimMIM(create_model("swin_t", num_classes=0, **SHAPE))
    official = {}
    for key, value in source.state_dict().items():
        if key.startswith("encoder.layers.1.downsample."):
            key = key.replace("encoder.layers.1.downsample.", "encoder.layers.0.downsample.")
        official[{"mask_token": "encoder.mask_token"}.get(key, key)] = value
    torch.save({"model": official, "epoch": 799}, tmp_path / "simmim.pth")
    target = SimMIM(create_model("swin_t", num_classes=0, **SHAPE))
    load_simmim_pretrained(target, tmp_path / "simmim.pth")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_file_without_a_swin_encoder_is_refused(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    target = SimMIM(create_model("swin_t", num_classes=0, **SHAPE))
    with pytest.raises(ValueError, match=r"other\.pth holds no Swin encoder for this model: none of its 1 tensors"):
        load_simmim_pretrained(target, tmp_path / "other.pth")
