import pytest
import timm
import torch

from swinlab.models import create_model, load_pretrained


@pytest.mark.parametrize("name,params", [("swin_t", 28_288_354), ("swin_s", 49_606_258), ("swin_b", 87_768_224), ("swin_l", 196_532_476)])
def test_parameter_counts_equal_official(name, params):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (29, 37)])
def test_any_input_size_and_feature_strides(size):
    model = create_model("swin_t", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=0, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *size))
    for f, c, s in zip(feats, model.feature_channels, model.feature_strides):
        assert f.shape == (1, c, -(-size[0] // s), -(-size[1] // s))


def test_timm_state_dict_gives_same_logits(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224").eval()
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("swin_t", clip_window_to_feature=True).eval()
    result = load_pretrained(model, path)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=0)
    other_window = create_model("swin_t", window_size=12, img_size=384, num_classes=5).eval()
    load_pretrained(other_window, path)
    with torch.no_grad():
        assert other_window(torch.randn(1, 3, 96, 96)).shape == (1, 5)


def test_bad_checkpoint_names_file_and_key(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    model = create_model("swin_t", embed_dim=16, depths=(1, 1), num_heads=(1, 2))
    with pytest.raises(ValueError, match="notes.txt"):
        load_pretrained(model, bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}, wrong)
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_pretrained(model, wrong)


def test_unknown_model_and_bad_heads_are_clear():
    with pytest.raises(ValueError, match="available models"):
        create_model("swin_xxl")
    with pytest.raises(ValueError, match="num_heads"):
        create_model("swin_t", embed_dim=10)
