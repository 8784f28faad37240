"""Detection and instance-segmentation export: one image in, the detector's final detections out.

``DetectorGraph`` wraps a torchvision-style detector (``DetectionTask.detector``: Mask / Faster R-CNN, Cascade
(Mask) R-CNN, RetinaNet, FCOS) so that the whole evaluation forward is one graph: the detector's own transform
(normalise, resize to ``min_size`` / ``max_size``, pad), backbone, heads, NMS and postprocess (boxes scaled back to
the input image, masks pasted into it). ``export_detector`` writes it with torch's TorchScript-based ONNX exporter
(``dynamo=False``): it is the exporter torchvision tests its detectors with (its ``test/test_onnx.py``), and
``torch.export`` (``dynamo=True``) stops at the data-dependent sizes of proposal filtering and NMS
(pytorch/vision#9306; with torch 2.14: ``GuardOnDataDependentSymNode`` in ``batched_nms``). During the export
``aten::floor_divide`` gets a flooring symbolic (``_floor_divide``): the exporter's own truncates, which broke Swin's
padded windows (maps that are no multiple of the window, e.g. 200 x 272 tokens at 800 x 1088).

Sizes served: the tracer records the Swin window layout, computed in Python from the feature-map sizes, as
constants, so a graph serves exactly the (H, W) it was exported for; ``ExportedDetector`` refuses any other size
with a ``ConfigError``. The detection quickstart (``configs/detection/quickstart_shapes.yaml``: 128 x 128 images,
``min_size = max_size = 128``) feeds every image at 128 x 128, so ``image_size=(128, 128)`` serves it exactly.

``ExportedDetector`` runs such a graph through any runner (onnxruntime, OpenVINO: numpy image in, list of numpy
arrays out) and answers like the detector in evaluation mode, so it can stand in for ``DetectionTask.detector``
and the task's post-processing (labels - 1, masks > 0.5) and metrics apply unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from swinlab.validation import ConfigError

if TYPE_CHECKING:
    from swinlab.tasks.detection import DetectionTask

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
# Opset 17: torchvision's detection ops (RoIAlign, NMS) need >= 11, swinlab's LayerNorm exports natively from 17.
OPSET = 17

Runner = Callable[[np.ndarray], Sequence[np.ndarray]]
FLOAT_TYPES = ("Float", "Double", "Half", "BFloat16")


def _floor_divide(g: Any, self: Any, other: Any) -> Any:
    """``aten::floor_divide`` as ONNX ops that floor, as torch does. The TorchScript exporter's own symbolic
    truncates (torch < 1.13 semantics), which turns Swin's padded window grid ``-(-H // window) * window`` of a
    traced H into the unpadded one: wrong windows wherever a map is no multiple of the window."""
    if any(getattr(value.type(), "scalarType", lambda: None)() in FLOAT_TYPES for value in (self, other)):
        return g.op("Floor", g.op("Div", self, other))
    return g.op("Div", g.op("Sub", self, g.op("Mod", self, other)), other)  # ONNX Mod takes the divisor's sign


class DetectorGraph(nn.Module):
    """A torchvision-style detector on one image: (3, H, W) float in [0, 1] -> ``boxes`` (N, 4) xyxy in input
    pixels, ``labels`` (N,) int64 as the detector gives them (objects ``1 .. num_classes``), ``scores`` (N,) and,
    with ``masks``, ``masks`` (N, 1, H, W) probabilities; equal to ``detector([image])[0]`` in evaluation mode."""

    def __init__(self, detector: nn.Module, masks: bool) -> None:
        super().__init__()
        self.detector = detector
        self.masks = masks
        self.train(detector.training)  # a new module is in training mode: take the detector's

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.masks else OUTPUT_NAMES[:3]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (detection,) = self.detector([image])
        return tuple(detection[name] for name in self.output_names)


def export_detector(task: DetectionTask, path: str | Path, image_size: tuple[int, int]) -> None:
    """Write ``task``'s detector (``task.export_network()``) as ONNX for (3, H, W) images, ``image_size`` = (H, W):
    input ``image``, outputs ``boxes``, ``labels``, ``scores`` (and ``masks``) as ``DetectorGraph`` gives them. The
    graph serves exactly that size (see the module docstring)."""
    height, width = _checked_size(image_size)
    network = task.export_network()
    parameter = next(network.parameters())
    was_training = network.training
    network.eval()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::floor_divide", _floor_divide, OPSET)
    try:
        with warnings.catch_warnings():
            # The tracer warns at every Python-side shape computation (window layout, anchor grids, RoI counts),
            # torchvision's and the exporter's ONNX paths at deprecated calls: dozens of lines, all expected.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (torch.rand(3, height, width, device=parameter.device, dtype=parameter.dtype),),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=list(network.output_names),
            )
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::floor_divide", OPSET)
        network.train(was_training)


def _checked_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"image_size must be (height, width) in pixels, two positive integers; got {image_size!r}")
    return size


def detections_from_outputs(
    outputs: Sequence[np.ndarray], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """A runner's outputs of one image (``OUTPUT_NAMES`` order, ``masks`` only for mask models) as the dict
    torchvision's detectors return: ``boxes`` (N, 4), ``labels`` (N,) int64, ``scores`` (N,), ``masks`` (N, 1, H, W)."""
    if len(outputs) not in (3, 4):
        raise ValueError(f"an exported detector gives 3 or 4 outputs ({', '.join(OUTPUT_NAMES)}), got {len(outputs)}")
    detection = {name: torch.as_tensor(np.asarray(value), device=device) for name, value in zip(OUTPUT_NAMES, outputs)}
    detection["labels"] = detection["labels"].long()
    return detection


class ExportedDetector(nn.Module):
    """An exported ``DetectorGraph`` behind torchvision's evaluation interface: ``model(images)`` with a list of
    (3, H, W) floats in [0, 1] returns one dict per image (``detections_from_outputs``). ``run`` maps one
    (3, H, W) float32 numpy image to the graph's outputs (e.g. an onnxruntime session's ``run``); ``image_size``
    is the (H, W) it was exported for, the only size it serves; ``name`` (e.g. the file) is used in errors."""

    def __init__(self, run: Runner, image_size: tuple[int, int], name: str = "the exported detector") -> None:
        super().__init__()
        self.run = run
        self.image_size = _checked_size(image_size)
        self.name = name

    def forward(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        detections = []
        for image in images:
            if tuple(image.shape) != (3, *self.image_size):
                height, width = self.image_size
                raise ConfigError(
                    f"{self.name} was exported for (3, {height}, {width}) images (the Swin window layout is fixed "
                    f"at export) and got an image of shape {tuple(image.shape)}: resize the images to {height} x "
                    f"{width} or export again with image_size=({image.shape[-2]}, {image.shape[-1]})"
                )
            array = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
            detections.append(detections_from_outputs(self.run(array), image.device))
        return detections
