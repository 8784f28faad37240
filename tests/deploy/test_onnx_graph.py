"""Dynamic-size ONNX graphs (swinlab.deploy.onnx_graph): the symbolic window path equals the index-table path in
eager, and one exported file equals PyTorch at several sizes in onnxruntime and OpenVINO, for tiny V1 and V2 models.

The sizes hit, at the last stage (window 4): a map exactly one window wide (shift dropped by the small-map rule), a
map larger than the window, maps that are no multiple of the window (padding), and rectangles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from torch import nn

from swinlab.deploy.onnx_graph import export_onnx, min_dynamic_size, served_size
from swinlab.models import create_model
from swinlab.models.swin import SWIN_V2, SwinBlock, SwinOptions, small_map_window
from swinlab.models.windows import SymbolicLayout, shift_is_active, symbolic_layout, symbolic_mask, window_layout
from swinlab.tasks import SegmentationTask
from tests.helpers import TINY_SWIN, moved_off_init

VERSIONS = {"v1": {}, "v2": SWIN_V2}
# TINY_SWIN with a shifted block per stage (patch 2, window 4): the last map is ceil(H / 4), 13 the smallest size.
TINY_CLASSIFIER = {**TINY_SWIN, "depths": [2, 2]}
CLASSIFIER_SIZES = [(1, 13, 13), (3, 16, 16), (2, 20, 28), (1, 28, 20), (1, 17, 31), (2, 32, 32)]
# The segmenter's backbone: patch 4, window 4, two stages: the last map is ceil(H / 8), 25 the smallest size.
SEGMENTER_BACKBONE = {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 4, "out_indices": [0, 1]}
SEGMENTER_SIZES = [(1, 25, 25), (2, 32, 32), (1, 32, 40), (1, 40, 32), (1, 64, 64)]


def classifier(version: str, **kwargs) -> nn.Module:
    """A tiny 5-class Swin with weights off their init and logits of a few units (a trained model's scale)."""
    torch.manual_seed(0)
    model = moved_off_init(
        create_model("swin_t", **{**TINY_CLASSIFIER, **VERSIONS[version], "num_classes": 5, **kwargs})
    )
    with torch.no_grad():
        model.head.weight.mul_(30)
    return model.eval()


def max_difference(network: nn.Module, run, batch: int, height: int, width: int) -> float:
    torch.manual_seed(height * width + batch)
    images = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        expected = network(images).numpy()
    return float(np.abs(run(images.numpy()) - expected).max())


def runner(path: Path, runtime: str):
    """(B, 3, H, W) float32 -> the file's output, in onnxruntime or in OpenVINO's CPU plugin at f32 (it would
    otherwise run bf16 on CPUs that have it)."""
    if runtime == "onnxruntime":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": images})[0]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda images: compiled(images)[0]


# ---- the symbolic path in eager ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("padding", ["official", "timm", "mask"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size", [(8, 8), (10, 13), (4, 4), (4, 7), (9, 4), (5, 6)])
def test_symbolic_layout_equals_index_layout(version, padding, clip, shift, size):
    """A block through SymbolicLayout (pad / roll / reshape, mask from positions) equals it through the index
    tables of window_layout, with the shift decided by a bool and by a 0-dim tensor (the exported graph's case)."""
    H, W = size
    options = SwinOptions(window_size=4, padding=padding, clip_window_to_feature=clip, **VERSIONS[version])
    torch.manual_seed(0)
    block = moved_off_init(SwinBlock(8, 2, options, shifted=bool(shift))).eval()
    window, small_map_shift = small_map_window(H, W, 4, clip)
    indexed = window_layout(H, W, window, small_map_shift if shift else 0, padding=padding)
    layout = symbolic_layout(H, W, 4, shift, clip, padding)
    assert shift_is_active(H, W, 4, clip) is (small_map_shift > 0)
    switch = torch.tensor(small_map_shift > 0)
    as_tensor = SymbolicLayout(4, shift, switch, padding, symbolic_mask(H, W, 4, shift, switch, padding, None))
    for mask in (layout.mask, as_tensor.mask):
        if indexed.mask is None:
            assert mask is None or not mask.any()
        else:
            torch.testing.assert_close(mask, indexed.mask, atol=0, rtol=0)
    x = torch.randn(2, H, W, 8)
    with torch.no_grad():
        expected = block(x, window, indexed)
        torch.testing.assert_close(block(x, 4, layout), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block(x, 4, as_tensor), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("padding", ["official", "timm", "mask"])
@pytest.mark.parametrize("clip", [True, False])
def test_exported_path_equals_eager_path(version, padding, clip, monkeypatch):
    """The whole model on the path torch.export traces (symbolic layouts, explicit attention, unconditional pads)
    equals the eager model, run in eager at odd, rectangular and exact sizes."""
    model = classifier(version, padding=padding, clip_window_to_feature=clip)
    images = {size: torch.randn(2, 3, *size) for size in [(13, 13), (16, 16), (20, 28), (17, 31), (32, 32)]}
    with torch.no_grad():
        expected = {size: model(x) for size, x in images.items()}
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        for size, x in images.items():
            torch.testing.assert_close(model(x), expected[size], atol=1e-5, rtol=1e-5, msg=f"{size}")


# ---- exported files -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dynamic_classifier(tmp_path_factory) -> tuple[nn.Module, Path]:
    model, path = classifier("v1"), tmp_path_factory.mktemp("onnx") / "classifier.onnx"
    export_onnx(model, path, (3, 32, 32))
    return model, path


@pytest.fixture(scope="module")
def dynamic_segmenter(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    task = SegmentationTask(
        num_classes=4,
        backbone_kwargs={**SEGMENTER_BACKBONE, **SWIN_V2},
        decode_channels=8,
        pool_scales=(2, 6),  # overlapping bins of a 4x5 map and more bins than cells
        aux_loss_weight=0,
    )
    task, path = moved_off_init(task).eval(), tmp_path_factory.mktemp("onnx") / "segmenter.onnx"
    export_onnx(task, path, (3, 32, 32))
    return task, path


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_one_dynamic_classifier_file_serves_every_size(dynamic_classifier, runtime):
    model, path = dynamic_classifier
    run = runner(path, runtime)
    for batch, height, width in CLASSIFIER_SIZES:
        assert max_difference(model, run, batch, height, width) < 1e-4, (runtime, batch, height, width)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_one_dynamic_segmenter_file_serves_every_size(dynamic_segmenter, runtime):
    """Swin V2 + UperNet (pyramid pooling and the resize to the image computed from the symbolic size)."""
    task, path = dynamic_segmenter
    run = runner(path, runtime)
    for batch, height, width in SEGMENTER_SIZES:
        assert max_difference(task, run, batch, height, width) < 1e-4, (runtime, batch, height, width)


def test_dynamic_file_names_its_dimensions_and_smallest_size(dynamic_classifier, dynamic_segmenter):
    inputs = ort.InferenceSession(str(dynamic_segmenter[1]), providers=["CPUExecutionProvider"]).get_inputs()
    outputs = ort.InferenceSession(str(dynamic_segmenter[1]), providers=["CPUExecutionProvider"]).get_outputs()
    assert (inputs[0].name, inputs[0].shape) == ("images", ["batch", 3, "height", "width"])
    assert (outputs[0].name, outputs[0].shape) == ("logits", ["batch", 4, "height", "width"])
    assert served_size(dynamic_classifier[1]) == {"min_size": (13, 13)}
    assert served_size(dynamic_segmenter[1]) == {"min_size": (25, 25)}


def test_fixed_size_file_serves_its_size_only(tmp_path):
    """dynamic_size=False (``--input_size H W``): dynamic batch, fixed H and W, and onnxruntime names the
    mismatch for any other size."""
    model, path = classifier("v1"), tmp_path / "fixed.onnx"
    export_onnx(model, path, (3, 20, 28), dynamic_size=False)
    run = runner(path, "onnxruntime")
    assert max(max_difference(model, run, batch, 20, 28) for batch in (1, 3)) < 1e-4
    assert served_size(path) == {"input_size": (20, 28)}
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="images"):
        run(np.zeros((1, 3, 28, 20), np.float32))


def test_min_dynamic_size():
    """Where the last map would be smaller than the window (which then shrinks) the graph is not valid: Swin-T
    (window 7, stride 32) serves 193 and up, SwinV2-T (window 8) 225; without the small-map rule, any size."""
    assert min_dynamic_size(create_model("swin_t", num_classes=0)) == (193, 193)
    assert min_dynamic_size(create_model("swinv2_t", num_classes=0)) == (225, 225)
    assert min_dynamic_size(classifier("v1", clip_window_to_feature=False)) == (2, 2)
    with pytest.raises(ValueError, match="dynamic_size=False"):
        min_dynamic_size(nn.Conv2d(3, 3, 1))
