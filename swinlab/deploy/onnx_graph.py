"""ONNX graphs of classification and segmentation networks whose height and width are dynamic.

One file serves every image size the PyTorch model accepts, down to :func:`min_dynamic_size`: under
``torch.export`` the Swin blocks cut windows with pad / roll / reshape on symbolic sizes and decide in the graph
whether a stage's map is small enough to drop the shift (:class:`swinlab.models.windows.SymbolicLayout`). Smaller
images shrink the window itself, which the graph does not do: export those with ``dynamic_size=False`` at the size
they have (``--input_size H W``).

The file's metadata records what it serves: ``swinlab.min_size`` ("H,W") for a dynamic graph,
``swinlab.input_size`` ("H,W") for a fixed one.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn
from torch.fx.experimental import _config as shape_config

from swinlab.models.swin import SwinStage, SwinTransformer

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
MIN_SIZE_KEY = "swinlab.min_size"
INPUT_SIZE_KEY = "swinlab.input_size"


def swin_backbone(network: nn.Module) -> SwinTransformer:
    """The Swin backbone of a classifier (the network itself) or a segmenter (its ``backbone``)."""
    backbone = getattr(network, "backbone", network)
    if not isinstance(backbone, SwinTransformer) or not all(isinstance(s, SwinStage) for s in backbone.layers):
        raise ValueError(
            f"{type(backbone).__name__} has no dynamic-size ONNX graph (only swinlab's Swin Transformer, V1 and V2, "
            "has one); export it with dynamic_size=False (--input_size H W)"
        )
    return backbone


def min_dynamic_size(network: nn.Module) -> tuple[int, int]:
    """The smallest (H, W) the dynamic graph of ``network`` serves.

    With ``clip_window_to_feature`` (the official rule) a stage whose map is smaller than the window shrinks the
    window to it; the graph keeps the window, so the last stage's map, ceil(H / (patch * 2^(stages - 1))), must be at
    least the window: H > (window - 1) * patch * 2^(stages - 1), 193 for Swin-T (window 7). Without the rule a
    classifier serves any size (2: torch.export treats sizes 0 and 1 as constants), a segmenter (``out_indices``)
    those whose last map has at least 2 tokens: the export specialises its head to maps of more than one token.
    """
    backbone = swin_backbone(network)
    clip = backbone.options.clip_window_to_feature
    if not clip and backbone.out_indices is None:
        return 2, 2
    stages = backbone.num_layers if backbone.out_indices is None else max(backbone.out_indices) + 1
    side = ((backbone.options.window_size - 1) if clip else 1) * backbone.patch_size * 2 ** (stages - 1) + 1
    return max(side, 2), max(side, 2)


def export_onnx(
    network: nn.Module, path: str | Path, example_shape: tuple[int, int, int], dynamic_size: bool = True
) -> None:
    """Write ``network`` (put in eval mode) as ONNX: input ``images`` (B, C, H, W), output ``logits``.

    The batch is always dynamic. With ``dynamic_size`` so are H and W, from :func:`min_dynamic_size` up, and
    ``example_shape`` (C, H, W) is only the example traced (raised to that minimum); without it H and W are fixed
    at ``example_shape``. Raises ValueError for a network without a dynamic-size graph.
    """
    network = network.eval()
    channels, height, width = example_shape
    batch = torch.export.Dim("batch")
    if dynamic_size:
        min_h, min_w = min_dynamic_size(network)
        height, width = max(height, min_h), max(width, min_w)
        # A declared minimum: a size that the graph would have to specialise fails the export instead.
        shapes = {0: batch, 2: torch.export.Dim("height", min=min_h), 3: torch.export.Dim("width", min=min_w)}
    else:
        shapes = {0: batch}
    # Batch 2 in the example: a size-1 dimension would be specialised to the constant 1.
    example = torch.randn(2, channels, height, width)
    # Size-oblivious: reshape and broadcasting checks such as "is this symbolic size 1?" take the general branch
    # (the graph is the same) instead of failing the export.
    with torch.no_grad(), shape_config.patch(backed_size_oblivious=True):
        program = torch.export.export(network, (example,), dynamic_shapes=(shapes,))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx_program = torch.onnx.export(
        program, f=None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True, verbose=False
    )
    model = onnx_program.model_proto
    _name_dims(model, ("batch", None, "height", "width"))
    key, value = (MIN_SIZE_KEY, min_dynamic_size(network)) if dynamic_size else (INPUT_SIZE_KEY, (height, width))
    onnx.helper.set_model_props(model, {key: f"{value[0]},{value[1]}"})
    onnx.save(model, str(path))


def _name_dims(model: onnx.ModelProto, names: tuple[str | None, ...]) -> None:
    """Rename the input's symbolic dimensions (torch.export's ``s0``, ``s77``, ...) to ``names`` everywhere."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    rename = {dim.dim_param: name for dim, name in zip(dims, names) if dim.dim_param and name}
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def served_size(path: str | Path) -> dict[str, tuple[int, int]]:
    """The sizes an exported file records: ``{"min_size": (H, W)}`` (dynamic) or ``{"input_size": (H, W)}``."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {
        name: tuple(int(v) for v in props[key].split(","))
        for name, key in (("min_size", MIN_SIZE_KEY), ("input_size", INPUT_SIZE_KEY))
        if key in props
    }
