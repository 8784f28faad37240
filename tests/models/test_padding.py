"""Padding of maps that are no multiple of the window: ``padding="official"`` (default) against a reference of the
official detection backbone, ``padding="timm"`` against timm, ``"mask"`` against the naive reference in
test_swin.py. At 256x320 every Swin-T stage map (64x80 ... 8x10) needs padding for window 7."""

import pytest
import timm
import torch
import torch.nn.functional as F

from swinlab.models import create_model, load_pretrained
from swinlab.models.windows import window_layout


def official_window_partition(x: torch.Tensor, M: int) -> torch.Tensor:
    B, H, W, C = x.shape
    return x.view(B, H // M, M, W // M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, M, M, C)


def official_window_reverse(windows: torch.Tensor, M: int, H: int, W: int) -> torch.Tensor:
    B = windows.shape[0] // (H * W // M // M)
    return windows.view(B, H // M, W // M, M, M, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


def official_bias_index(M: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (M - 1)
    return relative[..., 0] * (2 * M - 1) + relative[..., 1]


def official_shift_mask(Hp: int, Wp: int, M: int, shift: int) -> torch.Tensor:
    """BasicLayer.forward of the official detection backbone: the SW-MSA mask built on the padded Hp x Wp map."""
    img_mask = torch.zeros(1, Hp, Wp, 1)
    cuts = (slice(0, -M), slice(-M, -shift), slice(-shift, None))
    for label, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        img_mask[:, h, w, :] = label
    windows = official_window_partition(img_mask, M).view(-1, M * M)
    mask = windows[:, None, :] - windows[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def official_block(block, x: torch.Tensor, M: int, shift: int) -> torch.Tensor:
    """SwinTransformerBlock.forward of Swin-Transformer-Object-Detection (mmdet/models/backbones/swin_transformer.py):
    norm1, pad to the window grid with zeros, THEN the cyclic roll over the padded map, window attention with the
    mask of the padded map (padding tokens are attended), reverse, crop. Weights read from a swinlab block."""
    B, H, W, C = x.shape
    attn, heads = block.attn, block.attn.num_heads
    y = F.pad(block.norm1(x), (0, 0, 0, (M - W % M) % M, 0, (M - H % M) % M))
    Hp, Wp = y.shape[1:3]
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    windows = official_window_partition(y, M).view(-1, M * M, C)
    BnW, N = windows.shape[:2]
    q, k, v = attn.qkv(windows).reshape(BnW, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    logits = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    table = attn.relative_position_bias_table[official_bias_index(M).view(-1)]
    logits = logits + table.view(N, N, -1).permute(2, 0, 1)[None]
    if shift:
        mask = official_shift_mask(Hp, Wp, M, shift)
        logits = (logits.view(B, -1, heads, N, N) + mask[None, :, None]).view(BnW, heads, N, N)
    out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(BnW, N, C))
    y = official_window_reverse(out.view(-1, M, M, C), M, Hp, Wp)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    x = x + y[:, :H, :W]
    return x + block.mlp(block.norm2(x))


def official_patch_merging(merge, x: torch.Tensor) -> torch.Tensor:
    x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return merge.reduction(merge.norm(x))


def official_detection_stages(model, image: torch.Tensor, M: int = 7) -> list[torch.Tensor]:
    """The official detection backbone's four NCHW outputs (no window clipping: that code has none), computed
    with a swinlab backbone's weights."""
    p = model.patch_size
    image = F.pad(image, (0, (p - image.shape[3] % p) % p, 0, (p - image.shape[2] % p) % p))
    x = model.patch_embed.norm(model.patch_embed.proj(image).permute(0, 2, 3, 1))
    outputs = []
    for i, stage in enumerate(model.layers):
        if i > 0:
            x = official_patch_merging(stage.downsample, x)
        for j, block in enumerate(stage.blocks):
            x = official_block(block, x, M, M // 2 if j % 2 else 0)
        outputs.append(getattr(model, f"norm{i}")(x).permute(0, 3, 1, 2))
    return outputs


def randomized_timm_swin_t(img_size) -> torch.nn.Module:
    """timm's Swin-T with its zero-initialised biases and unit norms moved off their init, so that what a zero
    padding token contributes (its k and v are the qkv bias) shows in the outputs."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def swin_t_backbone(path, padding: str | None = None) -> torch.nn.Module:
    kwargs = {} if padding is None else {"padding": padding}
    model = create_model("swin_t", num_classes=0, out_indices=(0, 1, 2, 3), **kwargs).eval()
    assert not load_pretrained(model, path).unexpected_keys
    with torch.no_grad():
        for i in range(4):  # the per-output norms are not in a classifier file
            getattr(model, f"norm{i}").weight.normal_(1.0, 0.3)
            getattr(model, f"norm{i}").bias.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("size", [(256, 320), (260, 292)])
def test_default_backbone_equals_official_detection_backbone(tmp_path, size):
    """Default swin_t features equal the official detection code's at 256x320 (every map padded) and 260x292
    (also odd maps before each patch merging); timm's order (pad after the shift) differs."""
    torch.manual_seed(0)
    torch.save(randomized_timm_swin_t(size).state_dict(), tmp_path / "timm.pth")
    torch.manual_seed(1)
    model = swin_t_backbone(tmp_path / "timm.pth")
    timm_order = swin_t_backbone(tmp_path / "timm.pth", padding="timm")
    timm_order.load_state_dict(model.state_dict())
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = official_detection_stages(model, image)
        features, swapped = model(image), timm_order(image)
    for i, (feature, reference) in enumerate(zip(features, expected)):
        torch.testing.assert_close(feature, reference, atol=1e-4, rtol=0, msg=f"stage {i}")
    assert (swapped[0] - expected[0]).abs().max() > 1e-2


def test_timm_padding_equals_timm_logits(tmp_path):
    """padding='timm' gives timm's logits at 256x320 (timm built for that size); the default order does not."""
    torch.manual_seed(0)
    reference = randomized_timm_swin_t((256, 320))
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    models = {padding: create_model("swin_t", padding=padding).eval() for padding in ("timm", "official")}
    for model in models.values():
        result = load_pretrained(model, tmp_path / "timm.pth")
        assert not result.missing_keys and not result.unexpected_keys
    image = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        expected = reference(image)
        torch.testing.assert_close(models["timm"](image), expected, atol=1e-4, rtol=0)
        assert (models["official"](image) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("padding", ["official", "timm"])
def test_padding_changes_nothing_on_window_multiples(padding):
    """On a map that is a multiple of the window the three modes give the same layout, and no zero token."""
    for shift in (0, 2):
        layout, masked = window_layout(8, 12, 4, shift, padding=padding), window_layout(8, 12, 4, shift)
        assert not layout.pads_with_zeros
        for a, b in zip(layout[:3], masked[:3]):
            assert (a is None and b is None) or torch.equal(a, b)


def test_zero_padding_layout_reads_appended_token_and_masks_only_regions():
    """10x13 map, window 4, shift 2: padding slots read row H * W (the zero token); the official order is the
    masked mode's (pad, then shift) without the padding-key mask; timm's order puts the padding elsewhere."""
    H, W, N = 10, 13, 16
    official, timm_order = (window_layout(H, W, 4, 2, padding=p) for p in ("official", "timm"))
    masked = window_layout(H, W, 4, 2, padding="mask")
    for layout in (official, timm_order):
        assert layout.pads_with_zeros and (layout.gather == H * W).sum() == 12 * 16 - H * W
        assert torch.equal(layout.gather[layout.scatter], torch.arange(H * W))
    assert not torch.equal(official.gather, timm_order.gather)
    is_padding = official.gather == H * W
    assert torch.equal(official.gather.masked_fill(is_padding, 0), masked.gather)
    padding_key = is_padding.view(-1, 1, N).expand_as(masked.mask)
    assert torch.equal(official.mask[~padding_key], masked.mask[~padding_key])
    assert (masked.mask[padding_key] == -100).all() and (official.mask[padding_key] == 0).any()
    assert window_layout(H, W, 4, 0, padding="official").mask is None


def test_unknown_padding_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"padding='zeros' is not one of \('official', 'timm', 'mask'\)"):
        create_model("swin_t", padding="zeros")
