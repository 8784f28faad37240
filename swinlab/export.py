"""``python -m swinlab export``: a trained task as a file for CPU inference, with onnxruntime or OpenVINO.

    python -m swinlab export --config CONFIG [--ckpt_path CKPT] --output PATH [--runtime auto|onnxruntime|openvino]
        [--precision fp32|bf16|int8] [--input_size H W] [--calibration_images N] [--optimize] [--evaluate]

The config is parsed exactly as ``fit`` parses it, through the same construction (``swinlab.cli.build_cli``:
``__base__`` composition, overrides, ``${...}`` interpolation, one-line errors), without ``fit``'s own arguments
(``--overwrite``, checkpoint timing, ...; a recipe's values for them are ignored). The task is built with the
checkpoint's weights (random ones without ``--ckpt_path``); the data module is constructed (never set up unless
needed) to learn ``num_classes`` when no checkpoint gives it, and read for INT8 calibration and ``--evaluate``.

What is written is the task's ``export_network`` (classification: logits; segmentation: UperNet logits at the
input size; pre-training: the encoder's pooled features; detection: one image's boxes, labels, scores and masks,
``swinlab.deploy.detection``). Classification, segmentation and pre-training graphs take any batch and, by
default, any height and width (``swinlab.deploy.onnx_graph``); ``--input_size H W`` fixes them.

``--runtime``: an ``.onnx`` output runs in onnxruntime, an ``.xml`` output is an OpenVINO IR; ``auto`` (default)
takes the runtime from the output's suffix and, for an output without one, times both on the fp32 graph and
writes for the faster (``swinlab.deploy.runtime``). ``--precision int8`` is NNCF post-training quantization
(OpenVINO) or static QDQ quantization (onnxruntime), calibrated on ``--calibration_images`` training images of the
config; ``bf16`` is OpenVINO's bf16 inference (CPUs with AVX-512 BF16 or AMX). ``--optimize``: onnxruntime's
transformer graph optimizer (``optimize_model(model_type="swin")``) rewrites the fp32 graph first.
``--evaluate`` runs the task's own test loop (top-1, mIoU or COCO AP) with the PyTorch network and with the
written file, and prints both.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser

from swinlab.cli import SwinLabCLI, build_cli
from swinlab.deploy.runtime import SUFFIXES
from swinlab.models.checkpoint_file import CheckpointFileError, read_lightning_checkpoint
from swinlab.tasks import DetectionTask
from swinlab.validation import ConfigError, data_problems, validate_run_config


class ExportCLI(SwinLabCLI):
    """The run-config parser shared by every command plus the export arguments; builds nothing by itself."""

    command = "export"

    def add_command_arguments(self, parser: LightningArgumentParser, command: str) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint to export")
        parser.add_argument(
            "--output",
            type=str,
            required=True,
            help="the file to write: .onnx (onnxruntime), .xml (OpenVINO IR, with its .bin), or a path without a "
            "suffix, which gets the one of --runtime",
        )
        parser.add_argument(
            "--runtime",
            type=Literal["auto", "onnxruntime", "openvino"],
            default="auto",
            help="the CPU runtime the file is written for; auto: the --output suffix's, or for a path without one "
            "the faster of the two on this machine (timed on the fp32 graph, and printed)",
        )
        parser.add_argument(
            "--precision",
            type=Literal["fp32", "bf16", "int8"],
            default="fp32",
            help="int8: post-training quantization calibrated on the config's training images (NNCF for OpenVINO, "
            "static QDQ for onnxruntime); bf16: OpenVINO's bf16 inference (AVX-512 BF16 or AMX CPUs)",
        )
        parser.add_argument("--calibration_images", type=int, default=300, help="training images for INT8 calibration")
        parser.add_argument(
            "--input_size",
            type=list[int] | None,
            default=None,
            help="[H, W]: a graph for this image size only (default: any size; detection: the config's test size)",
        )
        parser.add_argument(
            "--optimize",
            action=ActionYesNo,
            default=False,
            help="onnxruntime: run its transformer graph optimizer (model_type swin) on the fp32 graph first",
        )
        parser.add_argument(
            "--evaluate",
            action=ActionYesNo,
            default=False,
            help="print the test metrics (top-1, mIoU or COCO AP) of the written file next to PyTorch's",
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
        description="Export a trained task for CPU inference with onnxruntime or OpenVINO, optionally bf16 or INT8.",
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
    # A task without classes (pre-training) has no num_classes argument.
    if "num_classes" in init_args and init_args["num_classes"] is None:
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


def optimize_graph(fp32_path: str | Path, output: str | Path) -> dict[str, int]:
    """Write ``fp32_path`` rewritten by onnxruntime's transformer optimizer for Swin (fp32, CPU operators);
    returns how many of each fused operator it made."""
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0: read from the graph (they differ between Swin stages anyway).
    optimized = optimize_model(str(fp32_path), model_type="swin", num_heads=0, hidden_size=0, use_gpu=False)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(output))
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


def calibration_batches(
    datamodule: LightningDataModule, count: int, image_size: tuple[int, int] | None, batch_size: int = 32
) -> list[np.ndarray]:
    """Up to ``count`` training images in (B, C, H, W) float32 batches of at most ``batch_size``, resized to
    ``image_size`` (H, W) where given and the training crops differ from it."""
    datamodule.setup("fit")
    batches, seen = [], 0
    for batch in datamodule.train_dataloader():
        images = batch["image"][: count - seen].float()
        if image_size is not None and tuple(images.shape[-2:]) != tuple(image_size):
            images = F.interpolate(images, size=tuple(image_size), mode="bilinear", align_corners=False)
        batches += [chunk.numpy() for chunk in images.split(batch_size)]
        seen += len(images)
        if seen >= count:
            break
    return batches


def output_and_runtime(output: str, runtime: str, fastest: Any) -> tuple[Path, str]:
    """(the file to write, its runtime) from ``--output`` and ``--runtime``; ``fastest()`` -> the faster runtime,
    called only when neither names one."""
    path = Path(output)
    suffix_runtime = SUFFIXES.get(path.suffix)
    if path.suffix and suffix_runtime is None:
        raise ConfigError(f"--output {output}: use a .onnx (onnxruntime) or .xml (OpenVINO) file, or no suffix")
    if runtime == "auto":
        runtime = suffix_runtime or fastest()
    elif suffix_runtime not in (None, runtime):
        wanted = next(suffix for suffix, name in SUFFIXES.items() if name == runtime)
        raise ConfigError(f"--output {output} is a {suffix_runtime} file, not {runtime}'s: name it {path.stem}{wanted}")
    if not path.suffix:
        path = path.with_suffix(next(suffix for suffix, name in SUFFIXES.items() if name == runtime))
    return path, runtime


def test_metrics(task: LightningModule, datamodule: LightningDataModule, root: Path) -> dict[str, float]:
    """The task's own test loop on the data module's test split (on the CPU): its logged ``test/*`` metrics."""
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    (results,) = trainer.test(task, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in results.items()}


def max_abs_difference(network: torch.nn.Module, exported: Any, inputs: torch.Tensor) -> float:
    """Largest |PyTorch - exported| over every output of ``network(inputs)``; infinite where an output's shape
    differs (a detector that found another number of objects)."""
    with torch.no_grad():
        expected = network(inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    outputs = exported(inputs.numpy())
    if len(outputs) != len(expected) or any(o.shape != tuple(e.shape) for o, e in zip(outputs, expected)):
        return float("inf")
    return max((float(np.abs(o - e.float().numpy()).max()) for o, e in zip(outputs, expected) if o.size), default=0.0)


def parity_inputs(channels: int, size: tuple[int, int], dynamic: bool, detection: bool) -> list[torch.Tensor]:
    """Random inputs to compare the written file with PyTorch on: one image in [0, 1] for a detector, else a
    batch of 2 normalised images at ``size`` and, for a graph of any size, at a second, larger size."""
    generator = torch.Generator().manual_seed(0)
    if detection:
        return [torch.rand(channels, *size, generator=generator)]
    sizes = [size, (size[0] + size[0] // 2, size[1] + size[1] // 4)] if dynamic else [size]
    return [torch.randn(2, channels, *s, generator=generator) for s in sizes]


def serves_any_size(network: torch.nn.Module, size: tuple[int, int], min_size: Any) -> bool:
    """Whether a graph of any image size can serve ``size`` (H, W), the task's own; says why not."""
    try:
        smallest = min_size(network)
    except ValueError as err:  # a backbone without such a graph (timm's)
        print(f"{err}: the graph is fixed at {size[0]}x{size[1]}")
        return False
    if size[0] >= smallest[0] and size[1] >= smallest[1]:
        return True
    print(
        f"the graph is fixed at {size[0]}x{size[1]}: a graph of any size serves {smallest[0]}x{smallest[1]} and "
        "larger, where no stage's map is smaller than its window (the official rule shrinks the window there)"
    )
    return False


def main(args: list[str] | None = None) -> dict[str, Any]:
    """``python -m swinlab export ...``; returns what it printed (paths, runtime, parity, metrics)."""
    from swinlab.deploy.onnx_graph import export_onnx, min_dynamic_size
    from swinlab.deploy.runtime import ExportedModel, fastest_runtime, write_deployable

    config = parse_config(args)
    if config.calibration_images < 1:
        raise ConfigError(f"--calibration_images must be >= 1, got {config.calibration_images}")
    if config.input_size is not None and (len(config.input_size) != 2 or min(config.input_size) < 1):
        raise ConfigError(f"--input_size must be [H, W] with positive sides, got {config.input_size}")
    datamodule, data_missing = build_datamodule(config)
    for wanted, needs in (
        (config.evaluate, "--evaluate needs the config's test data"),
        (config.precision == "int8", "--precision int8 is calibrated on the config's training images"),
    ):
        if wanted and datamodule is None:
            raise ConfigError(f"{needs}: {data_missing}")
    task = build_task(config, config.ckpt_path, datamodule)
    network = task.export_network()
    detection = isinstance(task, DetectionTask)
    channels, *default_size = task.example_image_shape()
    size = tuple(config.input_size or default_size)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        graph = tmp / "exported.onnx"
        if detection:
            from swinlab.deploy.detection import export_detector

            export_detector(task, graph, size)
        else:
            dynamic = config.input_size is None and serves_any_size(network, size, min_dynamic_size)
            export_onnx(network, graph, (channels, *size), dynamic_size=dynamic)
        report["dynamic_size"] = not detection and dynamic
        inputs = parity_inputs(channels, size, report["dynamic_size"], detection)

        def fastest() -> str:
            runtime, seconds = fastest_runtime(graph, inputs[0].numpy())
            report["runtime_timings"] = seconds
            timings = ", ".join(f"{name} {1000 * value:.1f} ms" for name, value in seconds.items())
            print(f"--runtime auto: {runtime} is faster here on the fp32 graph ({timings})")
            return runtime

        output, runtime = output_and_runtime(
            config.output, config.runtime, (lambda: "onnxruntime") if detection else fastest
        )
        if detection and runtime == "openvino":
            raise ConfigError(
                "a detector exports for onnxruntime only: OpenVINO does not convert the ONNX Loop of torchvision's "
                "traced post-processing; use --output F.onnx (or --runtime onnxruntime)"
            )
        report.update(output=str(output), runtime=runtime, precision=config.precision)
        if config.optimize:
            if runtime != "onnxruntime":
                raise ConfigError("--optimize is onnxruntime's graph optimizer: use it with an .onnx output")
            report["fused_operators"] = optimize_graph(graph, tmp / "optimized.onnx")
            graph = tmp / "optimized.onnx"
            print(f"onnxruntime transformer optimizer fused: {report['fused_operators'] or 'nothing'}")
        calibration = None
        if config.precision == "int8":
            calibration = calibration_batches(
                datamodule, config.calibration_images, None if report["dynamic_size"] else size
            )
        write_deployable(graph, output, runtime, config.precision, calibration)
        exported = ExportedModel(output, runtime=runtime)
        report["max_abs_diff"] = max(max_abs_difference(network, exported, x) for x in inputs)
        shapes = " and ".join("x".join(map(str, x.shape)) for x in inputs)
        print(
            f"{runtime} {config.precision} vs PyTorch on random {shapes}: max |difference| {report['max_abs_diff']:.2e}"
        )
        if config.evaluate:
            report["pytorch_metrics"] = test_metrics(task, datamodule, tmp)
            task.use_exported(exported)
            report["exported_metrics"] = test_metrics(task, datamodule, tmp)
            for name, value in report["pytorch_metrics"].items():
                exported_value = report["exported_metrics"][name]
                print(f"{name}: PyTorch {value:.4f}  {runtime} {config.precision} {exported_value:.4f}")
    print(f"wrote {output} ({runtime}, {config.precision})")
    return report
