"""torch.compile without graph breaks, the attention fast paths, and per-stage activation checkpointing."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from swinlab.models import create_model, load_pretrained
from swinlab.models.kernels import use_explicit_attention

# Two stages at 36x36 with 4x4 windows: maps 18x18 and 9x9 need padding, and the odd blocks shift.
TINY = dict(
    img_size=32,
    patch_size=2,
    window_size=4,
    embed_dim=16,
    depths=(2, 2),
    num_heads=(1, 2),
    num_classes=5,
    drop_path_rate=0.0,
)


@pytest.mark.parametrize("size", [32, 36])  # img_size (prebuilt layout buffers) and another size (built in-graph)
@pytest.mark.parametrize("train", [False, True])
def test_compiles_with_fullgraph_and_matches_eager(train, size):
    """fullgraph=True fails on any graph break. The aot_eager backend runs dynamo and AOTAutograd (the forward and
    backward graphs inductor would get) without inductor's C++ build, which takes minutes on a 2-core CPU."""
    torch.manual_seed(0)
    model = create_model("swin_t", **TINY).train(train)
    x = torch.randn(2, 3, size, size)
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


def test_cpu_training_path_matches_timm_gradients(tmp_path):
    """With gradients on, CPU attention takes the explicit path; its logits and gradients equal timm's.

    Both in eval mode: timm's train-mode logits differ from its own eval-mode logits by ~1e-3 on this config."""
    torch.manual_seed(0)
    reference = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
        num_classes=5,
    )
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model = create_model("swin_t", **TINY).eval()
    load_pretrained(model, tmp_path / "timm.pth")
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    logits = [model(inputs[0]), reference(inputs[1])]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)
    for out in logits:
        out.square().sum().backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, atol=1e-5, rtol=1e-4)
    ours = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if "relative_position_bias_table" in name:
            torch.testing.assert_close(ours[name].grad, param.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("size", [32, 36])  # 32: the plain blocks have no mask; 36: every block is masked (padding)
@pytest.mark.parametrize("position_bias", ["relative", "none"])
def test_attention_kernels_compute_the_same_function(position_bias, size):
    torch.manual_seed(0)
    sdpa, explicit = (
        create_model("swin_t", attention=kernel, position_bias=position_bias, **TINY).eval()
        for kernel in ("sdpa", "explicit")
    )
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), explicit(x), atol=1e-5, rtol=1e-4)
    for model in (sdpa, explicit):
        model.train()(x).square().sum().backward()
    for (name, a), b in zip(sdpa.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="attention='flash'"):
        create_model("swin_t", attention="flash", **TINY)


def test_sdpa_masks_are_contiguous(monkeypatch):
    """CUDA's fused SDPA kernels need a mask with stride 1 in its last dimension; the bias alone (unshifted blocks
    at img_size, no window mask) is a permuted view and must be copied, or SDPA falls back to its math kernel."""
    model = create_model("swin_t", attention="sdpa", **TINY).eval()
    masks = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert [mask.shape[0] for mask in masks] == [1, 2 * 16, 1, 2 * 4]  # plain blocks (16x16, 8x8 maps): bias only
    assert all(mask.is_contiguous() for mask in masks)


def test_auto_attention_picks_the_kernel_that_measured_faster():
    # (device, bias needs a gradient, under torch.compile) -> explicit?  See docs/benchmarks.md.
    expected = {
        ("cpu", True, False): True,
        ("cpu", True, True): True,
        ("cpu", False, False): False,
        ("cpu", False, True): False,
        ("cuda", True, False): False,
        ("cuda", True, True): False,
        ("cuda", False, False): False,
        ("cuda", False, True): True,
    }
    for (device, needs_grad, compiling), explicit in expected.items():
        assert use_explicit_attention("auto", device, needs_grad, compiling) is explicit, (
            device,
            needs_grad,
            compiling,
        )
        assert use_explicit_attention("sdpa", device, needs_grad, compiling) is False
        assert use_explicit_attention("explicit", device, needs_grad, compiling) is True


@pytest.mark.parametrize("flags", [(True, False), (False, True), True])
def test_per_stage_checkpointing_gives_same_gradients_with_stochastic_depth(flags):
    torch.manual_seed(0)
    kwargs = {**TINY, "drop_path_rate": 0.3}
    plain, checkpointed = create_model("swin_t", **kwargs), create_model("swin_t", grad_checkpointing=flags, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    expected = [flags] * 2 if isinstance(flags, bool) else list(flags)
    assert [stage.grad_checkpointing for stage in checkpointed.layers] == expected
    x = torch.randn(2, 3, 36, 36)
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same drop-path draws; checkpointing replays the RNG state in the recompute
        model(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_flags_must_match_stages():
    with pytest.raises(ValueError, match="2 stages"):
        create_model("swin_t", grad_checkpointing=(True, False, True), **TINY)


@pytest.mark.parametrize("clip", [False, True])
def test_training_after_inference_mode_works(clip):
    """Nothing built under inference_mode (Lightning's sanity check) is kept for the training steps that follow."""
    model = create_model("swin_t", clip_window_to_feature=clip, **TINY).eval()
    x = torch.randn(2, 3, 12, 12)  # the second stage's 3x3 map is smaller than the 4x4 window
    with torch.inference_mode():
        model(x)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
