import pytest
import torch

from swinlab.models.upernet import FCNHead, UperNetHead


def _features(batch: int, height: int, width: int, channels=(8, 16, 32, 64)) -> list[torch.Tensor]:
    # Swin-like pyramid: strides 4, 8, 16, 32, sizes rounded up as the backbone pads.
    return [torch.randn(batch, c, -(-height // (4 * 2**i)), -(-width // (4 * 2**i))) for i, c in enumerate(channels)]


@pytest.mark.parametrize(("height", "width"), [(64, 64), (72, 40)])
def test_upernet_logits_at_finest_resolution(height: int, width: int) -> None:
    head = UperNetHead([8, 16, 32, 64], num_classes=5, channels=16).eval()
    features = _features(2, height, width)
    logits = head(features)
    assert logits.shape == (2, 5, *tuple(features[0].shape[-2:]))


def test_upernet_every_level_receives_gradient() -> None:
    head = UperNetHead([8, 16, 32, 64], num_classes=3, channels=16)
    features = [f.requires_grad_() for f in _features(2, 64, 64)]
    head(features).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_upernet_pool_scales_set_bottleneck_width() -> None:
    head = UperNetHead([8, 16], num_classes=3, channels=4, pool_scales=(1, 2)).eval()
    assert head.ppm_bottleneck[0].in_channels == 16 + 2 * 4
    assert head(_features(1, 32, 32, channels=(8, 16))).shape == (1, 3, 8, 8)


def test_upernet_needs_two_levels() -> None:
    with pytest.raises(ValueError, match="at least 2 feature maps"):
        UperNetHead([64], num_classes=3)


def test_fcn_head_keeps_resolution() -> None:
    head = FCNHead(32, num_classes=4, channels=8, num_convs=2).eval()
    assert head(torch.randn(2, 32, 5, 7)).shape == (2, 4, 5, 7)
    with pytest.raises(ValueError, match="num_convs"):
        FCNHead(32, num_classes=4, num_convs=0)
