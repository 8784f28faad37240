import pytest
import timm
import torch
import torch.nn.functional as F

from swinlab.models import create_model, load_pretrained
from swinlab.models.swin import SwinBlock, SwinOptions
from swinlab.models.windows import window_layout
from tests.helpers import TINY_SWIN, official_layout


@pytest.mark.parametrize(
    "name,params", [("swin_t", 28_288_354), ("swin_s", 49_606_258), ("swin_b", 87_768_224), ("swin_l", 196_532_476)]
)
def test_parameter_counts_equal_official(name, params):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (29, 37)])
def test_any_input_size_and_feature_strides(size):
    model = create_model(
        "swin_t", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=0, out_indices=(0, 1, 2, 3)
    ).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *size))
    for f, c, s in zip(feats, model.feature_channels, model.feature_strides):
        assert f.shape == (1, c, -(-size[0] // s), -(-size[1] // s))


@pytest.fixture(scope="module")
def timm_swin_tiny():
    """timm's swin_tiny with random weights, and its logits on one fixed image."""
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        return reference, x, reference(x)


def test_timm_state_dict_gives_same_logits(tmp_path, timm_swin_tiny):
    reference, x, expected = timm_swin_tiny
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("swin_t").eval()
    result = load_pretrained(model, path)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
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


# ---- attention semantics against a naive reference -------------------------------------------------------


def naive_window_block(block, x: torch.Tensor, window: int, shift: int = 0) -> torch.Tensor:
    """SwinBlock written per window with explicit loops, on the unrolled map: a real token attends to the real
    tokens of its window of the grid offset by ``shift`` that are not wrapped around from the far edge by the
    official cyclic shift (its mask), with the relative bias of their offset on the map. A window cut short by the
    map edge is smaller: no padding involved."""
    B, H, W, C = x.shape
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r in range(H):
        for c in range(W):
            key = (((r - shift) % Hp) // window, ((c - shift) % Wp) // window, r < shift, c < shift)
            groups.setdefault(key, []).append((r, c))
    attn, heads = block.attn, block.attn.num_heads
    h = block.norm1(x)
    out = torch.zeros_like(x)
    table = attn.relative_position_bias_table
    for group in groups.values():
        coords = torch.tensor(group)
        tokens = h[:, coords[:, 0], coords[:, 1]]  # (B, n, C)
        q, k, v = attn.qkv(tokens).view(B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        logits = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)  # (B, heads, n, n)
        if table is not None:
            delta = coords[:, None] - coords[None, :] + window - 1
            logits = logits + table[delta[..., 0] * (2 * window - 1) + delta[..., 1]].permute(2, 0, 1)
        mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
        out[:, coords[:, 0], coords[:, 1]] = attn.proj(mixed)
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size,window", [((8, 8), 4), ((10, 13), 4), ((7, 7), 8), ((12, 12), 4)])
def test_windows_equal_naive_reference(size, window, shift):
    """Covers exact window grids and padded ones (10x13 and a 7x7 map in one 8x8 window), plain and shifted:
    padding never changes what real tokens see."""

    torch.manual_seed(0)
    block = SwinBlock(dim=16, num_heads=2, options=SwinOptions(window_size=window), shifted=bool(shift)).eval()
    x = torch.randn(2, *size, 16)
    layout = window_layout(*size, window, shift)
    with torch.no_grad():
        expected = naive_window_block(block, x, window, shift)
        torch.testing.assert_close(block(x, window, layout), expected, atol=1e-5, rtol=1e-5)


def test_padded_window_equals_unpadded_window_without_position_bias():
    """position_bias='none', padding='mask': a 7x7 map in one 8x8 window (padded) gives what a 7x7 window gives."""
    torch.manual_seed(0)
    kwargs = dict(
        img_size=28,
        patch_size=4,
        embed_dim=16,
        depths=(2,),
        num_heads=(2,),
        shift=False,
        position_bias="none",
        num_classes=3,
        padding="mask",
    )
    exact = create_model("swin_t", window_size=7, **kwargs).eval()
    padded = create_model("swin_t", window_size=8, **kwargs).eval()
    padded.load_state_dict(exact.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), exact(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(12, 12), (11, 14)])
def test_shifted_window_token_sees_only_its_window(size):
    """Gradient test: with the cyclic shift, output token q depends on input token p only when both fall in
    the same window of the shifted grid AND are neighbours on the unshifted map (less than a window apart:
    the mask separates tokens that the roll wrapped around from the far edge)."""

    torch.manual_seed(0)
    window, shift = 4, 2
    H, W = size
    block = SwinBlock(dim=8, num_heads=2, options=SwinOptions(window_size=window), shifted=True).eval()
    layout = window_layout(H, W, window, shift)
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    for qy, qx in [(0, 0), (1, 1), (H - 1, W - 1), (5, 2), (H - 1, 0)]:
        x = torch.randn(1, H, W, 8, requires_grad=True)
        block(x, window, layout)[0, qy, qx].sum().backward()
        influenced = x.grad[0].abs().sum(-1) > 1e-12
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        same_window = (((ys - shift) % Hp) // window == ((qy - shift) % Hp) // window) & (
            ((xs - shift) % Wp) // window == ((qx - shift) % Wp) // window
        )
        neighbours = ((ys - qy).abs() < window) & ((xs - qx).abs() < window)
        assert torch.equal(influenced, same_window & neighbours), (qy, qx)


# ---- shapes, sizes, position-bias variants, precision ------------------------------------------------------


def test_full_swin_t_any_size_batch_one():
    model = create_model("swin_t", num_classes=0, out_indices=(0, 1, 2, 3)).eval()
    classifier = create_model("swin_t", num_classes=7).eval()
    assert model.feature_strides == [4, 8, 16, 32] and model.feature_channels == [96, 192, 384, 768]
    for size in [(224, 224), (256, 320), (97, 131)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            feats = model(x)
            logits = classifier(x)
        for f, c, s in zip(feats, model.feature_channels, model.feature_strides):
            assert f.shape == (1, c, -(-size[0] // s), -(-size[1] // s)), size
            assert torch.isfinite(f).all()
        assert logits.shape == (1, 7) and torch.isfinite(logits).all()


def test_swin_t_flops_round_to_paper():
    from swinlab.models.flops import count_macs

    assert round(count_macs(create_model("swin_t"), (3, 224, 224)) / 1e9, 1) == 4.5


@pytest.mark.parametrize(
    "position_bias,relative,absolute",
    [
        ("relative", True, False),
        ("absolute", False, True),
        ("relative+absolute", True, True),
        ("none", False, False),
    ],
)
def test_position_bias_variants(position_bias, relative, absolute):
    model = create_model(
        "swin_t",
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
        num_classes=4,
        position_bias=position_bias,
    )
    names = [name for name, _ in model.named_parameters()]
    assert any("relative_position_bias_table" in n for n in names) == relative
    assert ("absolute_pos_embed" in names) == absolute
    if absolute:
        assert model.absolute_pos_embed.shape == (1, 16, 16, 16)
    logits = model(torch.randn(2, 1, 3, 32, 32).squeeze(1))
    logits.sum().backward()
    assert logits.shape == (2, 4)
    if absolute:
        assert model.absolute_pos_embed.grad.abs().sum() > 0
        assert model(torch.randn(1, 3, 40, 24)).shape == (1, 4)  # another size interpolates the embedding


def test_absolute_embedding_is_resized_bicubically_at_another_input_size():
    """The first stage's input at another size is patch embedding + the bicubic-resized absolute embedding (as the
    official and timm loaders resize it); a bilinear resize differs by up to 0.84 here, ~1e5x the tolerance."""
    torch.manual_seed(0)
    model = create_model("swin_t", **TINY_SWIN, num_classes=2, position_bias="absolute").eval()
    with torch.no_grad():
        model.absolute_pos_embed.normal_()  # an embedding with detail between grid points
    stage_inputs = []
    model.layers[0].register_forward_pre_hook(lambda _, args: stage_inputs.append(args[0]))
    x = torch.randn(1, 3, 24, 44)  # a 12 x 22 grid, from the 16 x 16 one
    with torch.no_grad():
        model(x)
        pos = F.interpolate(model.absolute_pos_embed.permute(0, 3, 1, 2), size=(12, 22), mode="bicubic")
        expected = model.patch_embed(x) + pos.permute(0, 2, 3, 1)
    torch.testing.assert_close(stage_inputs[0], expected, atol=1e-5, rtol=0)


def block_calls(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[SwinBlock, torch.Tensor, int, torch.Tensor]]:
    """(block, input, window, output) of every SwinBlock call in one forward of ``model``."""
    calls = []

    def record(block, args, output):
        calls.append((block, args[0], args[1], output))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, SwinBlock)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return calls


def test_shift_switch_changes_only_the_shifted_blocks():
    """Odd blocks compute shifted-window attention with the shift on and plain-window attention with it off (both
    against the naive reference); even blocks compute plain windows either way. Maps 16x16 and 8x8, window 4."""
    kwargs = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    torch.manual_seed(0)
    shifted = create_model("swin_t", **kwargs).eval()
    plain = create_model("swin_t", shift=False, **kwargs).eval()
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 3, 32, 32)
    shifted_calls, plain_calls = block_calls(shifted, x), block_calls(plain, x)
    assert len(shifted_calls) == len(plain_calls) == 4
    with torch.no_grad():
        for index, ((block, inp, window, out), (_, plain_inp, _, plain_out)) in enumerate(
            zip(shifted_calls, plain_calls)
        ):
            shift = 2 if index % 2 else 0
            torch.testing.assert_close(out, naive_window_block(block, inp, window, shift), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(plain_out, naive_window_block(block, plain_inp, window), atol=1e-5, rtol=1e-5)
            if shift:  # the two computations really differ on this input: the comparison above can tell them apart
                gap = naive_window_block(block, inp, window, shift) - naive_window_block(block, inp, window)
                assert gap.abs().max() > 1e-2
    torch.testing.assert_close(shifted_calls[0][3], plain_calls[0][3], atol=0, rtol=0)  # first block: same function
    assert not torch.allclose(shifted_calls[1][3], plain_calls[1][3], atol=1e-3)


def test_small_feature_map_is_clipped_by_default_and_logged_once(caplog):
    kwargs = dict(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=2
    )
    for clip in (True, False):
        model = create_model("swin_t", **kwargs, **({} if clip else {"clip_window_to_feature": False})).eval()
        caplog.clear()
        with caplog.at_level("INFO", logger="swinlab.models.swin"), torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
            model(torch.randn(1, 3, 32, 32))
        notes = [r.getMessage() for r in caplog.records if "no larger than window" in r.getMessage()]
        assert len(notes) == 1 and notes[0].startswith("stage 1"), notes
        assert ("without shift" in notes[0]) == clip
    clipped = create_model("swin_t", **kwargs)
    assert clipped.layers[1].effective_window(4, 4) == (4, 0)
    assert clipped.layers[1].effective_window(3, 5) == (3, 0)
    assert clipped.layers[0].effective_window(8, 8) == (4, 2)
    assert model.layers[1].effective_window(4, 4) == (4, 2)


def test_layouts_prebuilt_for_img_size_and_built_on_call_for_other_sizes():
    model = create_model(
        "swin_t", img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=2
    ).eval()
    stage = model.layers[0]
    for kind, shift in (("plain", 0), ("shifted", 2)):
        expected = window_layout(16, 16, 4, shift)
        assert not expected.pads_with_zeros
        for field, tensor in zip(("gather", "scatter", "mask"), expected[:3]):
            prebuilt = getattr(stage.layouts, f"{kind}_{field}")
            assert (prebuilt is None) == (tensor is None) and (tensor is None or torch.equal(prebuilt, tensor))
    assert not any("_gather" in key or "_mask" in key for key in model.state_dict())  # not saved in checkpoints
    assert stage.layouts.get(16, 16, 4, 2, torch.device("cpu")).gather is stage.layouts.shifted_gather
    built = stage.layouts.get(12, 20, 4, 2, torch.device("cpu"))
    for field, tensor in zip(("gather", "scatter", "mask"), window_layout(12, 20, 4, 2, padding="official")[:3]):
        assert torch.equal(getattr(built, field), tensor)


def test_bf16_autocast_close_to_fp32_and_trains():
    torch.manual_seed(0)
    model = create_model(
        "swin_t",
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        num_classes=5,
        drop_path_rate=0.0,
    )
    with torch.no_grad():  # larger weights than the training init, so that attention shapes the logits
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(0.0, 1.0)
            elif param.ndim == 2:
                param.normal_(0.0, 0.2)
    x = torch.randn(4, 3, 32, 32)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: measured errors are about 0.5% of the logits' spread (seeds 0-1), so 2% of
    # the spread leaves a margin while a bf16 path that drops the mask or bias or misscales q.k fails.
    spread = (reference.max() - reference.min()).item()
    error = (logits.float() - reference).abs().max().item()
    assert error < 0.02 * spread, (error, spread)
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_recomputes_blocks_and_gives_same_gradients():
    """Checkpointed blocks run their forward again during backward (their activations were not kept), others
    once; eval mode never checkpoints; gradients equal those without checkpointing."""
    torch.manual_seed(0)
    kwargs = dict(
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
        num_classes=3,
        drop_path_rate=0.0,
    )
    plain = create_model("swin_t", **kwargs)
    checkpointed = create_model("swin_t", grad_checkpointing=True, **kwargs)
    first_stage_only = create_model("swin_t", grad_checkpointing=(True, False), **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)

    def forward_calls_in(model, train=True):
        """Calls of each block's forward over one forward and backward pass (counted as they start: the
        recomputation stops early, once it has rebuilt what backward needs)."""
        model.train(train)
        model.zero_grad()
        blocks = [b for s in model.layers for b in s.blocks]
        counts = [0] * len(blocks)
        hooks = [
            b.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
            for i, b in enumerate(blocks)
        ]
        model(x).square().sum().backward()
        for hook in hooks:
            hook.remove()
        return counts

    assert forward_calls_in(plain) == [1, 1, 1, 1]
    assert forward_calls_in(checkpointed) == [2, 2, 2, 2]
    assert forward_calls_in(first_stage_only) == [2, 2, 1, 1]
    assert forward_calls_in(checkpointed, train=False) == [1, 1, 1, 1]
    forward_calls_in(checkpointed)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- checkpoint layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,timm_name,kwargs,size",
    [
        ("swin_t", "swin_tiny_patch4_window7_224", {}, (224, 224)),
        # Non-square: every map is a multiple of the window and larger than it, so timm's function is the
        # official one (at 256x320 timm pads after the shift, the official code before: tests/models/test_padding.py).
        ("swin_t", "swin_tiny_patch4_window7_224", {}, (448, 672)),
        ("swin_b", "swin_base_patch4_window12_384", {"window_size": 12, "img_size": 384}, (384, 384)),
    ],
)
def test_default_model_equals_timm_from_timm_and_official_files(tmp_path, name, timm_name, kwargs, size):
    """create_model(name) without a clip flag computes timm's (the official) function, from either file layout."""
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False, img_size=size).eval()
    model = create_model(name, **kwargs).eval()
    path = tmp_path / "weights.pth"
    torch.save(official_layout(reference.state_dict()), path)
    result = load_pretrained(model, path)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=0)
    loaded = {key: value.clone() for key, value in model.state_dict().items()}
    torch.save(reference.state_dict(), path)
    model.apply(lambda m: m.reset_parameters() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) else None)
    assert not load_pretrained(model, path).missing_keys  # the timm file sets the same weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded[key]), key


def test_safetensors_and_crafted_pickle(tmp_path):
    from safetensors.torch import save_file

    small = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, img_size=32, num_classes=3)
    source = create_model("swin_t", **small)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    target = create_model("swin_t", **small)
    load_pretrained(target, tmp_path / "w.safetensors")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": RunsCode()}, evil)
    with pytest.raises(ValueError, match=r"evil.pth: refused, .*would run code when loaded"):
        load_pretrained(target, evil)
