"""ONNX export of a trained classification or segmentation task, optionally INT8, for CPU inference.

    python -m swinlab export --config CONFIG [--ckpt_path CKPT] --output model.onnx [--optimize] [--quantize int8]
        [--int8_method auto|static|dynamic] [--evaluate]

The config is parsed exactly as ``fit`` parses it, through the same construction (``swinlab.cli.build_cli``:
``__base__`` composition, overrides, ``${...}`` interpolation, one-line errors), without ``fit``'s own arguments
(``--overwrite``, checkpoint timing, ...; a recipe's values for them are ignored). Only the task is built: the
data module is constructed (never set up) only to learn ``num_classes`` when no checkpoint gives it, and read only
for ``--quantize int8`` calibration and ``--evaluate``. The batch dimension of the
exported model is dynamic; height and width are fixed at export (``--input_size``, default the backbone's
``img_size``) because the shifted-window layout and its masks are computed from the map size in Python.

``--optimize``: onnxruntime's transformer graph optimizer (``optimize_model(model_type="swin")``: constant folding,
bias + GELU fusion, ...) rewrites the fp32 graph before it is checked against PyTorch and, with ``--quantize``,
quantized.

``--quantize int8``: ``--int8_method static`` is QDQ quantization (``onnxruntime.quantization.quantize_static``)
calibrated on ``--calibration_images`` training images, ``dynamic`` quantizes the weights only
(``quantize_dynamic``, activation ranges measured per batch at run time); ``auto`` (default) is static when the
config's data exists, dynamic otherwise.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser
from torch import nn

from swinlab.cli import SwinLabCLI, build_cli
from swinlab.deploy.runtime import quantize_int8
from swinlab.models.checkpoint_file import CheckpointFileError, read_lightning_checkpoint
from swinlab.tasks import ClassificationTask, DetectionTask, SegmentationTask
from swinlab.validation import ConfigError, data_problems, validate_run_config

INPUT_NAME = "images"


class ExportCLI(SwinLabCLI):
    """The run-config parser shared by every command plus the export arguments; builds nothing by itself."""

    command = "export"

    def add_command_arguments(self, parser: LightningArgumentParser, command: str) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint to export")
        parser.add_argument("--output", type=str, required=True, help="the .onnx file to write")
        parser.add_argument(
            "--quantize",
            type=Literal["int8"] | None,
            default=None,
            help="int8: quantize the fp32 graph (see --int8_method)",
        )
        parser.add_argument(
            "--int8_method",
            type=Literal["auto", "static", "dynamic"],
            default="auto",
            help="static: QDQ calibrated on training images; dynamic: int8 weights, activation ranges at run time; "
            "auto: static if the config's data exists, else dynamic",
        )
        parser.add_argument(
            "--optimize",
            action=ActionYesNo,
            default=False,
            help="run onnxruntime's transformer graph optimizer (model_type swin) on the fp32 graph before checking "
            "and quantizing it",
        )
        parser.add_argument(
            "--calibration_images", type=int, default=300, help="training images for static INT8 calibration"
        )
        parser.add_argument(
            "--input_size",
            type=list[int] | None,
            default=None,
            help="[H, W] the model is exported for (default: the backbone's img_size)",
        )
        parser.add_argument(
            "--evaluate",
            action=ActionYesNo,
            default=False,
            help="classification: print the ONNX model's top-1 on the data module's test split (and the fp32 "
            "model's when quantizing)",
        )

    def before_instantiate_classes(self) -> None:
        # Only the model's settings are checked: export must work without the data.
        validate_run_config({"model": self.config.model})

    def instantiate_classes(self) -> None:
        """Nothing: ``export`` builds the task (and the data module, when it can) itself."""


def parse_config(args: list[str] | None = None) -> Namespace:
    """``export`` command-line arguments (``sys.argv[1:]`` when None) -> the parsed config."""
    return build_cli(
        ExportCLI,
        args,
        run=False,
        prog="python -m swinlab export",
        description="Export a classification or segmentation task as ONNX for CPU inference, optionally INT8.",
    ).config


def _instantiate(base: type, config: Namespace | dict) -> Any:
    """A ``class_path``/``init_args`` config of a subclass of ``base`` -> the object, as the CLI builds it."""
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(base, "obj", required=True)
    config = config.as_dict() if isinstance(config, Namespace) else config
    return parser.instantiate_classes(parser.parse_object({"obj": config})).obj


def build_datamodule(config: Namespace) -> tuple[LightningDataModule | None, str]:
    """The config's data module, constructed but not set up, or None and why it could not be built."""
    if config.get("data") is None:
        return None, "the config has no data module"
    problems = data_problems(config.data, None)
    if problems:
        return None, "; ".join(problems)
    try:
        return _instantiate(LightningDataModule, config.data), ""
    except (OSError, ValueError) as err:
        return None, str(err)


def build_task(
    config: Namespace, ckpt_path: str | None, datamodule: LightningDataModule | None = None
) -> LightningModule:
    """The config's task in eval mode with the checkpoint's ``state_dict`` (loaded with ``weights_only``).

    ``num_classes`` comes from the checkpoint's hyper-parameters, else from the data module (as the CLI links it),
    else from the config. With a checkpoint, ``pretrained`` is not loaded (the checkpoint replaces it).
    """
    model_config = config.model.as_dict()
    init_args = model_config.setdefault("init_args", {})
    state_dict, saved = read_lightning_checkpoint(ckpt_path) if ckpt_path else (None, {})
    if state_dict is not None:
        init_args["pretrained"] = None
    data_classes = getattr(datamodule, "num_classes", None)
    if saved.get("num_classes") is not None:
        init_args["num_classes"] = saved["num_classes"]
    elif isinstance(data_classes, int):
        init_args["num_classes"] = data_classes
    if init_args.get("num_classes") is None:
        raise ConfigError(
            "num_classes is unknown: the config links it from the data, which is not available here, and no "
            "--ckpt_path gives it; pass --model.init_args.num_classes N or --ckpt_path CKPT"
        )
    task = _instantiate(LightningModule, model_config)
    if state_dict is not None:
        try:
            task.load_state_dict(state_dict)
        except RuntimeError as err:
            raise CheckpointFileError(
                f"--ckpt_path {ckpt_path} does not fit the model of the config ({model_config['class_path']}): "
                f"{str(err).splitlines()[0]} ... export with the config the checkpoint was trained with"
            ) from err
    return task.eval()


def inference_network(task: LightningModule) -> nn.Module:
    """What is exported: a classifier's evaluation weights (the EMA when enabled) mapping (B, C, H, W) images to
    (B, num_classes) logits, or a segmenter mapping them to (B, num_classes, H, W) logits."""
    if isinstance(task, ClassificationTask):
        return task.eval_network.eval()
    if isinstance(task, SegmentationTask):
        return task.eval()
    if isinstance(task, DetectionTask):
        raise ConfigError(
            "DetectionTask cannot be exported: torchvision's Mask R-CNN takes a list of images and filters "
            "proposals into data-dependent shapes, which torch.onnx.export(dynamo=True) does not trace; export a "
            "classification or segmentation config instead"
        )
    raise ConfigError(f"{type(task).__name__} cannot be exported; supported: ClassificationTask, SegmentationTask")


def default_input_shape(network: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images the backbone was built for: ``in_chans`` and ``img_size``."""
    backbone = getattr(network, "backbone", network)
    return (backbone.patch_embed.proj.in_channels, *backbone.img_size)


def export_onnx(network: nn.Module, path: str | Path, input_shape: tuple[int, int, int]) -> None:
    """Write ``network`` (eval mode) as ONNX with a dynamic batch and a fixed ``input_shape`` (C, H, W)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install onnxscript") from err
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Batch 2 in the example: a size-1 dimension would be specialised to the constant 1.
    example = torch.randn(2, *input_shape)
    # Not under no_grad: there swinlab's window attention takes its SDPA path, whose export fixes the batch size
    # to the example's (the explicit path traced with grad enabled keeps it dynamic).
    torch.onnx.export(
        network,
        (example,),
        str(path),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )


def optimize_graph(fp32_path: str | Path, output: str | Path) -> dict[str, int]:
    """Write ``fp32_path`` rewritten by onnxruntime's transformer optimizer for Swin (fp32, CPU operators);
    returns how many of each fused operator it made."""
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0: read from the graph (they differ between Swin stages anyway).
    optimized = optimize_model(str(fp32_path), model_type="swin", num_heads=0, hidden_size=0, use_gpu=False)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(output))
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


class OnnxModel:
    """An onnxruntime CPU session; (B, C, H, W) float32 images -> the model's output, as numpy arrays."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_shape = tuple(self.session.get_inputs()[0].shape[1:])

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        images = images.numpy() if isinstance(images, torch.Tensor) else images
        if tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.path} was exported for images of shape (batch, {', '.join(map(str, self.input_shape))}) "
                f"and got {tuple(images.shape)}: the window layout is fixed at export, so resize the images or "
                "export again with --input_size [H, W]"
            )
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})[0]


def max_abs_difference(network: nn.Module, model: OnnxModel, images: torch.Tensor) -> float:
    """Largest |PyTorch - onnxruntime| output difference on ``images`` (B, C, H, W)."""
    with torch.no_grad():
        expected = network(images).numpy()
    return float(np.abs(model(images) - expected).max())


def calibration_batches(
    datamodule: LightningDataModule, count: int, input_shape: tuple[int, int, int], batch_size: int = 32
) -> list[np.ndarray]:
    """Up to ``count`` training images in (B, C, H, W) float32 batches of at most ``batch_size``, resized to
    ``input_shape`` where the training crops differ from it."""
    datamodule.setup("fit")
    batches, seen = [], 0
    for batch in datamodule.train_dataloader():
        images = batch["image"][: count - seen].float()
        if tuple(images.shape[-2:]) != tuple(input_shape[1:]):
            images = F.interpolate(images, size=input_shape[1:], mode="bilinear", align_corners=False)
        batches += [chunk.numpy() for chunk in images.split(batch_size)]
        seen += len(images)
        if seen >= count:
            break
    return batches


def evaluation_batches(datamodule: LightningDataModule) -> Iterator[dict[str, Any]]:
    """The data module's test split as ``{"image", "label"}`` batches."""
    datamodule.setup("test")
    yield from datamodule.test_dataloader()


def top1_accuracy(model: OnnxModel, batches: Iterable[dict[str, Any]]) -> float:
    """Top-1 accuracy (0..1) of an exported classifier over ``{"image", "label"}`` batches."""
    correct = total = 0
    for batch in batches:
        labels = batch["label"]
        correct += int((model(batch["image"]).argmax(axis=1) == labels.numpy()).sum())
        total += len(labels)
    if total == 0:
        raise ValueError(f"no test images to evaluate {model.path} on")
    return correct / total


def main(args: list[str] | None = None) -> dict[str, Any]:
    """``python -m swinlab export ...``; returns what it printed (paths, parity, quantization, accuracies)."""
    config = parse_config(args)
    if config.calibration_images < 1:
        raise ConfigError(f"--calibration_images must be >= 1, got {config.calibration_images}")
    datamodule, data_missing = build_datamodule(config)
    task = build_task(config, config.ckpt_path, datamodule)
    network = inference_network(task)
    channels, *size = default_input_shape(network)
    if config.input_size is not None:
        if len(config.input_size) != 2 or min(config.input_size) < 1:
            raise ConfigError(f"--input_size must be [H, W] with positive sides, got {config.input_size}")
        size = list(config.input_size)
    input_shape = (channels, *size)
    if config.evaluate and not isinstance(task, ClassificationTask):
        raise ConfigError("--evaluate reports top-1 accuracy, so it needs a ClassificationTask config")
    if config.evaluate and datamodule is None:
        raise ConfigError(f"--evaluate needs the config's test data: {data_missing}")

    if config.quantize and config.int8_method == "static" and datamodule is None:
        raise ConfigError(f"--int8_method static needs the config's training images for calibration: {data_missing}")

    output = Path(config.output)
    report: dict[str, Any] = {"output": str(output), "input_shape": input_shape}
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "exported.onnx" if config.quantize or config.optimize else output
        export_onnx(network, exported, input_shape)
        fp32_path = exported
        if config.optimize:
            fp32_path = Path(tmp) / "optimized.onnx" if config.quantize else output
            report["fused_operators"] = optimize_graph(exported, fp32_path)
            print(f"onnxruntime transformer optimizer fused: {report['fused_operators'] or 'nothing'}")
        fp32 = OnnxModel(fp32_path)
        torch.manual_seed(0)
        report["fp32_max_abs_diff"] = max(
            max_abs_difference(network, fp32, torch.randn(batch, *input_shape)) for batch in (1, 2)
        )
        print(f"onnxruntime fp32 vs PyTorch, 2 random inputs: max |difference| {report['fp32_max_abs_diff']:.2e}")
        if config.evaluate:
            report["fp32_top1"] = top1_accuracy(fp32, evaluation_batches(datamodule))
            print(f"fp32 ONNX test top-1: {100 * report['fp32_top1']:.2f}%")
        if config.quantize:
            calibration = None
            if config.int8_method == "auto" and datamodule is None:
                print(f"no calibration data ({data_missing}): dynamic INT8 quantization")
            elif config.int8_method != "dynamic":
                calibration = calibration_batches(datamodule, config.calibration_images, input_shape)
            report["quantization"] = quantize_int8(fp32_path, output, calibration)
            print(f"INT8 ({report['quantization']}) model written")
            if config.evaluate:
                report["int8_top1"] = top1_accuracy(OnnxModel(output), evaluation_batches(datamodule))
                delta = 100 * (report["int8_top1"] - report["fp32_top1"])
                print(f"INT8 ONNX test top-1: {100 * report['int8_top1']:.2f}% ({delta:+.2f} points vs fp32)")
    print(f"wrote {output} (input: batch x {' x '.join(map(str, input_shape))})")
    return report
