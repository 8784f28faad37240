"""Swin V2 as switches on the shared model: parameter counts, logits equal to timm's, checkpoint layouts, transfer."""

import math

import pytest
import timm
import torch

from swinlab.models import create_model, load_pretrained
from swinlab.models.flops import count_macs
from tests.helpers import official_layout

TINY = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=8, num_classes=5)


def timm_v2(window_size: int = 8, **kwargs) -> torch.nn.Module:
    """timm's SwinV2-T in the TINY configuration, with every zero-initialised norm, bias and logit scale moved off
    its init and a CPB MLP whose bias varies with the offset (at init it is nearly constant, which softmax ignores)."""
    config = {**TINY, "window_size": window_size, "drop_path_rate": 0.0, **kwargs}
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name or "logit_scale" in name:
                param.add_(0.3 * torch.randn_like(param))
            if "cpb_mlp" in name:
                param.normal_(0, 1 / param.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize(
    "name,params",
    [("swinv2_t", 28_347_154), ("swinv2_s", 49_728_418), ("swinv2_b", 87_918_816), ("swinv2_l", 196_739_932)],
)
def test_parameter_counts_equal_timm(name, params):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_full_size_swinv2_t_equals_timm(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("swinv2_tiny_window8_256", pretrained=False).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model = create_model("swinv2_t").eval()
    result = load_pretrained(model, tmp_path / "timm.pth")
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_timm_and_official_layouts_give_timm_logits(tmp_path, layout):
    """The official V2 files keep patch merging at the end of a stage and save the CPB buffers; both are handled."""
    torch.manual_seed(0)
    reference = timm_v2()
    state = reference.state_dict()
    if layout == "official":
        checkpoint = official_layout(state, config="swinv2_tiny_patch4_window8_256")
        attn = reference.layers[0].blocks[0].attn
        checkpoint["model"]["layers.0.blocks.0.attn.relative_coords_table"] = attn.relative_coords_table
        checkpoint["model"]["layers.0.blocks.0.attn.relative_position_index"] = attn.relative_position_index
        assert "layers.0.downsample.norm.weight" in checkpoint["model"]
        torch.save(checkpoint, tmp_path / "weights.pth")
    else:
        torch.save(state, tmp_path / "weights.pth")
    model = create_model("swinv2_t", **TINY).eval()
    result = load_pretrained(model, tmp_path / "weights.pth")
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)  # the second stage's 8x8 map equals the window: no shift there
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=0)


def test_padded_maps_timm_order_equals_timm(tmp_path):
    """At 80x112 both stage maps (20x28, 10x14) need padding for window 8: padding='timm' gives timm's V2 features
    and logits (zeros attended, padded after the shift); the default official order (padded before the shift)
    does not."""
    torch.manual_seed(0)
    reference = timm_v2(img_size=(80, 112))
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    x = torch.randn(2, 3, 80, 112)

    def features(model: torch.nn.Module) -> torch.Tensor:
        return model.norm(model.layers[1](model.layers[0](model.embed(x))))

    with torch.no_grad():
        expected, expected_features = reference(x), reference.forward_features(x)
        for padding in ("timm", "official"):
            model = create_model("swinv2_t", **{**TINY, "img_size": (80, 112), "padding": padding}).eval()
            assert not load_pretrained(model, tmp_path / "timm.pth").missing_keys
            if padding == "timm":
                torch.testing.assert_close(features(model), expected_features, atol=1e-4, rtol=0)
                torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
            else:
                assert (features(model) - expected_features).abs().max() > 1e-2


def test_window8_checkpoint_runs_in_window16_model_like_timm(tmp_path):
    """pretrained_window_size normalises the CPB coordinates by the pre-training window; nothing is interpolated."""
    torch.manual_seed(0)
    window8 = timm_v2(img_size=128)
    torch.save(window8.state_dict(), tmp_path / "window8.pth")
    reference = timm.create_model(
        "swinv2_tiny_window16_256",
        pretrained=False,
        **{**TINY, "img_size": 128, "window_size": 16},
        pretrained_window_sizes=(8, 8),
    ).eval()
    reference.load_state_dict(window8.state_dict())
    model = create_model("swinv2_t", **{**TINY, "img_size": 128, "window_size": 16}, pretrained_window_size=8).eval()
    result = load_pretrained(model, tmp_path / "window8.pth")
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=0)
        unnormalised = create_model("swinv2_t", **{**TINY, "img_size": 128, "window_size": 16})
        unnormalised.load_state_dict(model.state_dict())
        assert not torch.allclose(unnormalised.eval()(x), reference(x), atol=1e-6)  # pretrained_window_size is used


def test_each_v2_switch_alone_changes_only_its_part():
    """A sweep can walk from V1 to V2 one change at a time: each switch builds, runs, adds/removes its own weights."""
    v1 = set(dict(create_model("swin_t", **TINY).named_parameters()))
    attn = "layers.0.blocks.0.attn."
    switches = {
        "similarity": ("cosine", {attn + "logit_scale"}, set()),
        "position_bias": ("cpb", {attn + "cpb_mlp.0.weight"}, {attn + "relative_position_bias_table"}),
        "qkv_bias": ("qv", {attn + "q_bias", attn + "v_bias"}, {attn + "qkv.bias"}),
        "norm": ("res_post", set(), set()),
        "merge_norm": ("after", set(), set()),
    }
    x = torch.randn(1, 3, 64, 64)
    for switch, (value, added, removed) in switches.items():
        model = create_model("swin_t", **TINY, **{switch: value})
        names = set(dict(model.named_parameters()))
        assert added <= names - v1 and removed <= v1 - names, switch
        assert torch.isfinite(model(x)).all(), switch
    post = create_model("swin_t", **TINY, norm="res_post").layers[0].blocks[0]
    assert post.norm1.weight.abs().sum() == 0 and post.norm2.weight.abs().sum() == 0  # branches start at zero
    assert create_model("swin_t", **TINY, merge_norm="after").layers[1].downsample.norm.weight.shape == (32,)
    v2 = create_model("swinv2_t", **TINY).layers[0].blocks[0].attn
    torch.testing.assert_close(v2.logit_scale, torch.full((1, 1, 1), math.log(10.0)))
    with pytest.raises(ValueError, match="similarity='cos'"):
        create_model("swin_t", **TINY, similarity="cos")
    with pytest.raises(ValueError, match="pretrained_window_size"):
        create_model("swinv2_t", **TINY, pretrained_window_size=(8, 8, 8))


def official_cpb_bias(cpb_mlp: torch.nn.Module, window: int, pretrained_window: int) -> torch.Tensor:
    """(heads, N, N) bias of WindowAttention in microsoft/Swin-Transformer models/swin_transformer_v2.py (window
    ``window``, pretrained_window_size ``pretrained_window``), written as the official code has it."""
    relative_coords_h = torch.arange(-(window - 1), window, dtype=torch.float32)
    grid = torch.meshgrid([relative_coords_h, relative_coords_h], indexing="ij")
    relative_coords_table = torch.stack(grid).permute(1, 2, 0).contiguous().unsqueeze(0)
    relative_coords_table /= (pretrained_window - 1) if pretrained_window > 0 else (window - 1)
    relative_coords_table *= 8
    relative_coords_table = (
        torch.sign(relative_coords_table) * torch.log2(torch.abs(relative_coords_table) + 1.0) / math.log2(8)
    )
    coords = torch.flatten(torch.stack(torch.meshgrid([torch.arange(window)] * 2, indexing="ij")), 1)
    relative_coords = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += window - 1
    relative_coords[:, :, 1] += window - 1
    relative_coords[:, :, 0] *= 2 * window - 1
    relative_position_index = relative_coords.sum(-1)
    table = cpb_mlp(relative_coords_table).view(-1, cpb_mlp[-1].out_features)
    bias = table[relative_position_index.view(-1)].view(window**2, window**2, -1).permute(2, 0, 1)
    return 16 * torch.sigmoid(bias)


@pytest.mark.parametrize("pretrained_window", [0, 6])
def test_continuous_position_bias_equals_the_official_computation(pretrained_window):
    """The CPB bias of the configured window (8), of the window clipped at construction (stage 1's 6x6 map at
    img_size 48) and of a window clipped on the fly (5), against the official code, with CPB weights far from their
    init; a bias missing the 16x factor is off by up to 11 here, 1e6x the tolerance."""
    torch.manual_seed(0)
    kwargs = {**TINY, "img_size": 48, "pretrained_window_size": pretrained_window}
    model = create_model("swinv2_t", **kwargs).eval()
    attentions = [stage.blocks[0].attn for stage in model.layers]
    with torch.no_grad():
        for attn in attentions:
            for param in attn.cpb_mlp.parameters():
                param.normal_(0, 1 / param.shape[-1] ** 0.5)
        for attn, window in ((attentions[0], 8), (attentions[1], 6), (attentions[0], 5)):
            expected = official_cpb_bias(attn.cpb_mlp, window, pretrained_window)
            named = lambda text, window=window: f"window {window}: {text}"  # noqa: E731
            torch.testing.assert_close(attn.relative_bias(window), expected, atol=1e-5, rtol=0, msg=named)
    assert model.layers[1].blocks[0].attn.clipped_window == 6


def test_logit_scale_is_clamped_at_100():
    torch.manual_seed(0)
    model = create_model("swinv2_t", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for stage in model.layers:
            for block in stage.blocks:
                block.attn.logit_scale.fill_(math.log(100.0))
        at_limit = model(x)
        for stage in model.layers:
            for block in stage.blocks:
                block.attn.logit_scale.fill_(10.0)  # exp(10) >> 100: clamped
        torch.testing.assert_close(model(x), at_limit)


def test_features_any_size_checkpointing_bf16_macs_and_lr_layers():
    torch.manual_seed(0)
    features = create_model("swinv2_t", **{**TINY, "num_classes": 0}, out_indices=(0, 1)).eval()
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 45, 70))
    assert [tuple(m.shape) for m in maps] == [(1, 16, 12, 18), (1, 32, 6, 9)]
    kwargs = {**TINY, "drop_path_rate": 0.0}
    plain = create_model("swinv2_t", **kwargs)
    checkpointed = create_model("swinv2_t", grad_checkpointing=True, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, checkpointed):
        model(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = plain(x)
    torch.testing.assert_close(logits.float(), plain(x), atol=0.1, rtol=0.05)
    assert count_macs(plain, (3, 64, 64)) > 0
    layers = {name: plain.lr_layer_id(name) for name, _ in plain.named_parameters()}
    assert layers["layers.0.blocks.1.attn.cpb_mlp.0.weight"] == layers["layers.0.blocks.1.attn.logit_scale"] == 2
    assert layers["layers.1.downsample.norm.weight"] == 2 and max(layers.values()) == plain.num_lr_layers


@pytest.mark.parametrize("train", [False, True])
def test_compiles_with_fullgraph_and_matches_eager(train):
    torch.manual_seed(0)
    model = create_model("swinv2_t", **{**TINY, "drop_path_rate": 0.0}).train(train)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))  # res-post norms start at zero
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.set_grad_enabled(train):
        outputs = [compiled(x), model(x)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    if train:
        grads = []
        for out in outputs:
            model.zero_grad()
            out.square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
