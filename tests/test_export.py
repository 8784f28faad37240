"""``python -m swinlab export``: parity with PyTorch in both runtimes, any image size, INT8, --evaluate, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from swinlab.__main__ import run as command_line
from swinlab.data import FashionMNISTDataModule
from swinlab.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from swinlab.deploy.runtime import ExportedModel
from swinlab.export import build_task, main, parse_config
from swinlab.tasks import ClassificationTask, SegmentationTask
from swinlab.validation import ConfigError
from tests.helpers import REPO

QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"
SEGMENTATION = REPO / "configs" / "segmentation" / "quickstart_shapes.yaml"
DETECTION = REPO / "configs" / "detection" / "quickstart_shapes.yaml"


def classification_args(tiny_swin: dict, data_dir: Path, *extra: str) -> list[str]:
    """The quickstart config with the tiny Swin (1 channel, 32x32) on ``data_dir``, loaded in this process."""
    backbone = json.dumps({**tiny_swin, "in_chans": 1})
    return [
        "--config",
        str(QUICKSTART),
        f"--model.init_args.backbone_kwargs={backbone}",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        *extra,
    ]


@pytest.fixture
def classifier_checkpoint(tiny_swin: dict, tmp_path: Path) -> tuple[ClassificationTask, Path]:
    """A tiny 10-class classifier with its own random weights, saved as a Lightning checkpoint. Its head is scaled
    up to give logits of a trained model's size (a few units) rather than the ~0.1 of the initialisation."""
    torch.manual_seed(123)
    task = ClassificationTask(backbone_kwargs={**tiny_swin, "in_chans": 1}, num_classes=10).eval()
    with torch.no_grad():
        task.backbone.head.weight.mul_(30)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {"num_classes": 10}}, path)
    return task, path


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def pytorch_test_top1(network: torch.nn.Module, data_dir: Path) -> float:
    """The test split's top-1 of ``network`` as plain PyTorch computes it."""
    data = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=8)
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct += int((network(batch["image"]).argmax(dim=1) == batch["label"]).sum())
            total += len(batch["label"])
    assert total == 20
    return correct / total


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_one_file_of_any_size_matches_pytorch_and_its_test_top1(
    suffix, tiny_swin, fashion_mnist_dir, classifier_checkpoint, tmp_path
):
    task, ckpt = classifier_checkpoint
    output = tmp_path / f"model{suffix}"
    report = main(
        classification_args(tiny_swin, fashion_mnist_dir, f"--ckpt_path={ckpt}", f"--output={output}", "--evaluate")
    )
    assert report["runtime"] == {".onnx": "onnxruntime", ".xml": "openvino"}[suffix] and report["dynamic_size"]
    model = ExportedModel(output)
    torch.manual_seed(0)
    # One file: the batch, the height and the width are free (32 is the training size; 40 x 24 needs padding).
    for shape in ((1, 1, 32, 32), (3, 1, 32, 32), (2, 1, 40, 24), (2, 1, 64, 48)):
        images = torch.randn(shape)
        with torch.no_grad():
            expected = task.backbone(images).numpy()
        np.testing.assert_allclose(model(images.numpy())[0], expected, atol=1e-4, rtol=0)
    assert report["max_abs_diff"] < 1e-4
    # --evaluate: the task's own test loop, with the checkpoint's weights and with the file, gives plain PyTorch's.
    expected_top1 = pytest.approx(pytorch_test_top1(task.backbone, fashion_mnist_dir))
    assert report["pytorch_metrics"]["test/top1"] == expected_top1
    assert report["exported_metrics"]["test/top1"] == expected_top1


def test_a_fixed_size_graph_names_its_size(tiny_swin, classifier_checkpoint, tmp_path):
    _, ckpt = classifier_checkpoint
    output = tmp_path / "fixed.onnx"
    main(
        classification_args(
            tiny_swin, tmp_path / "no-data", f"--ckpt_path={ckpt}", f"--output={output}", "--input_size=[32, 32]"
        )
    )
    with pytest.raises(
        ValueError, match=r"takes images of shape \(any, 1, 32, 32\), got \(1, 1, 64, 64\).*--input_size"
    ):
        ExportedModel(output)(np.zeros((1, 1, 64, 64), dtype=np.float32))


def input_quantization_scale(path: Path) -> float:
    """The scale of the QuantizeLinear on the input of the patch embedding's convolution (the images, padded to the
    patch grid)."""
    graph = onnx.load(str(path)).graph
    producers = {output: node for node in graph.node for output in node.output}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    dequantize = producers[conv.input[0]]
    quantize = producers[dequantize.input[0]]
    assert quantize.op_type == "QuantizeLinear"
    (scale,) = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == quantize.input[1]]
    return float(scale)


def test_onnxruntime_int8_is_calibrated_on_training_images(
    tiny_swin, fashion_mnist_dir, classifier_checkpoint, tmp_path
):
    _, ckpt = classifier_checkpoint
    output = tmp_path / "int8.onnx"
    extra = (f"--ckpt_path={ckpt}", f"--output={output}", "--precision=int8", "--calibration_images=24", "--evaluate")
    report = main(classification_args(tiny_swin, fashion_mnist_dir, *extra))
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(output)
    # The input's uint8 range is the min/max of the normalised training images: the fixture's random pixels
    # span 0..255, i.e. (0 - mean) / std .. (1 - mean) / std.
    low, high = (0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0], (1 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    assert input_quantization_scale(output) == pytest.approx((high - low) / 255, rel=1e-5)
    # 20 test images: at most two change their predicted class.
    delta = report["exported_metrics"]["test/top1"] - report["pytorch_metrics"]["test/top1"]
    assert abs(delta) <= 0.1 + 1e-9


def test_openvino_int8_is_nncf_quantized_and_keeps_top1(tiny_swin, fashion_mnist_dir, classifier_checkpoint, tmp_path):
    import openvino as ov

    _, ckpt = classifier_checkpoint
    output = tmp_path / "int8.xml"
    extra = (f"--ckpt_path={ckpt}", f"--output={output}", "--precision=int8", "--calibration_images=24", "--evaluate")
    report = main(classification_args(tiny_swin, fashion_mnist_dir, *extra))
    ops = {op.get_type_name() for op in ov.Core().read_model(str(output)).get_ops()}
    assert "FakeQuantize" in ops and output.with_suffix(".bin").is_file()
    assert ExportedModel(output).precision == "int8"
    delta = report["exported_metrics"]["test/top1"] - report["pytorch_metrics"]["test/top1"]
    assert abs(delta) <= 0.1 + 1e-9


def test_optimized_fp32_matches_pytorch(tiny_swin, classifier_checkpoint, tmp_path):
    _, ckpt = classifier_checkpoint
    output = tmp_path / "opt.onnx"
    report = main(
        classification_args(tiny_swin, tmp_path / "no-data", f"--ckpt_path={ckpt}", "--optimize", f"--output={output}")
    )
    # The optimizer rewrote the graph: each block's fc1 bias + GELU became one fused operator.
    assert report["fused_operators"]["BiasGelu"] == sum(tiny_swin["depths"])
    assert "BiasGelu" in op_types(output) and "Gelu" not in op_types(output)
    assert report["max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--precision=int8",), "--precision int8 is calibrated on the config's training images"),
        (("--output=m.xml", "--runtime=onnxruntime"), r"m.xml is a openvino file, not onnxruntime's: name it m.onnx"),
        (("--output=m.pt",), r"--output m.pt: use a .onnx \(onnxruntime\) or .xml \(OpenVINO\) file"),
        (("--output=m.onnx", "--precision=bf16"), "onnxruntime's CPU provider has no bf16 kernels"),
        (("--output=m.xml", "--optimize"), "--optimize is onnxruntime's graph optimizer"),
    ],
)
def test_bad_export_choices_are_named(extra, message, tiny_swin, classifier_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, ckpt = classifier_checkpoint
    args = classification_args(tiny_swin, tmp_path / "no-data", f"--ckpt_path={ckpt}", "--output=m.onnx", *extra)
    with pytest.raises(ConfigError, match=message):
        main(args)


def test_segmentation_file_of_any_size_matches_pytorch(tmp_path):
    output = tmp_path / "seg.onnx"
    backbone = json.dumps({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4})
    args = [
        "--config",
        str(SEGMENTATION),
        f"--model.init_args.backbone_kwargs={backbone}",
        "--model.init_args.num_classes=4",
        f"--data.init_args.data_root={tmp_path / 'no-data'}",
        f"--output={output}",
    ]
    report = main(args)
    assert report["max_abs_diff"] < 1e-4 and report["dynamic_size"]
    task = build_task(parse_config(args), None)  # the config's seed makes the same weights
    assert isinstance(task, SegmentationTask)
    model = ExportedModel(output)
    for height, width in ((128, 128), (192, 160), (97, 130)):
        images = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected = task(images).numpy()
        assert expected.shape == (2, 4, height, width)
        np.testing.assert_allclose(model(images.numpy())[0], expected, atol=1e-4, rtol=0)
    # Below 97 (window 4, 4 stages of patch 4) the last map is smaller than the window, which the official rule
    # shrinks: the graph does not, so it refuses.
    assert model.min_size == (97, 97)
    with pytest.raises(ValueError, match="serves images of at least 97x97, got 96x128.*--input_size H W"):
        model(np.zeros((1, 3, 96, 128), dtype=np.float32))


def test_detection_exports_at_the_test_size(tmp_path):
    output = tmp_path / "det.onnx"
    backbone = json.dumps({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4})
    args = [
        "--config",
        str(DETECTION),
        f"--model.init_args.backbone_kwargs={backbone}",
        "--model.init_args.num_classes=3",
        f"--data.init_args.root={tmp_path / 'no-data'}",
        f"--output={output}",
    ]
    report = main(args)
    assert report["max_abs_diff"] < 1e-3 and not report["dynamic_size"]
    assert ExportedModel(output).input_shapes == [(3, 128, 128)]


def test_checkpoint_of_another_model_is_named(fashion_mnist_dir, classifier_checkpoint, tmp_path):
    _, ckpt = classifier_checkpoint
    # The quickstart's own (larger) Swin, not the tiny one of the checkpoint.
    args = ["--config", str(QUICKSTART), f"--data.init_args.data_dir={fashion_mnist_dir}", "--output=x.onnx"]
    with pytest.raises(ValueError, match=rf"--ckpt_path {ckpt} does not fit the model of the config"):
        build_task(parse_config(args), str(ckpt))


def test_num_classes_unknown_without_data_or_checkpoint(tmp_path):
    # The data folder named explicitly (one that does not exist): the config's default, data/shapes_segmentation,
    # is relative to the working folder, where a quickstart may have written it.
    no_data = f"--data.init_args.data_root={tmp_path / 'no-data'}"
    args = ["--config", str(SEGMENTATION), no_data, f"--output={tmp_path / 'seg.onnx'}"]
    with pytest.raises(ConfigError, match="num_classes is unknown.*--model.init_args.num_classes N"):
        main(args)


def test_export_parses_as_fit_without_fit_only_arguments(tmp_path):
    """``export`` composes ``__base__`` as ``fit`` does (this recipe names its model size over a base), and offers
    none of fit's own arguments."""
    recipe = REPO / "configs" / "classification" / "swin_t_imagenet1k.yaml"
    args = ["--config", str(recipe), f"--data.init_args.data_dir={tmp_path / 'no-data'}", "--output=m.onnx"]
    config = parse_config([*args, "--model.init_args.num_classes=7"])
    assert config.model.init_args.backbone == "swin_t" and config.model.init_args.backbone_kwargs["img_size"] == 224
    assert not {"overwrite", "checkpoint_every_minutes", "test_after_fit"} & set(config.as_dict())
    for fit_only in ("--overwrite=true", "--checkpoint_every_minutes=5", "--collective_timeout=9"):
        with pytest.raises(ConfigError, match=f"unknown config key `{fit_only[2:].split('=')[0]}`"):
            parse_config([*args, fit_only])


def test_a_bad_export_config_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
    argv = ["swinlab", "export", "--config", str(QUICKSTART), "--model.init_args.backbon=swin_t", "--output=m.onnx"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("SWINLAB_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        command_line()
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("swinlab: error: unknown config key `model.init_args.backbon`")
    assert "did you mean `model.init_args.backbone`" in line


def test_the_ema_weights_are_exported(tiny_swin, tmp_path):
    """A classifier trained with ``ema_decay`` exports its EMA weights (what it validates with), not the raw ones."""
    torch.manual_seed(0)
    task = ClassificationTask(backbone_kwargs={**tiny_swin, "in_chans": 1}, num_classes=10, ema_decay=0.5)
    optimizer = torch.optim.SGD(task.backbone.parameters(), lr=1.0)
    images, labels = torch.randn(4, 1, 32, 32), torch.arange(4)
    for step in range(3):  # training steps, each followed by the task's EMA update
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(task.backbone(images), labels).backward()
        optimizer.step()
        task.ema.update(task.backbone, step=step + 1)
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {"num_classes": 10}}, path)
    args = classification_args(tiny_swin, tmp_path / "no-data", "--model.init_args.ema_decay=0.5", "--output=m.onnx")
    network = build_task(parse_config(args), str(path)).export_network()
    task.eval()
    with torch.no_grad():
        ema, raw, exported = task.ema.module(images), task.backbone(images), network(images)
    assert (ema - raw).abs().max() > 1e-3  # the EMA is not the raw weights
    torch.testing.assert_close(exported, ema, rtol=0, atol=0)
