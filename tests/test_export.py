"""``python -m swinlab export``: ONNX parity with PyTorch, INT8 (static and dynamic), errors, at tiny sizes."""

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
from swinlab.export import OnnxModel, build_task, inference_network, main, parse_config
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


def test_fp32_export_matches_pytorch_and_its_test_top1(tiny_swin, fashion_mnist_dir, classifier_checkpoint, tmp_path):
    task, ckpt = classifier_checkpoint
    output = tmp_path / "model.onnx"
    report = main(
        classification_args(tiny_swin, fashion_mnist_dir, f"--ckpt_path={ckpt}", f"--output={output}", "--evaluate")
    )
    model = OnnxModel(output)
    torch.manual_seed(0)
    for batch in (1, 3):  # the batch dimension is dynamic
        images = torch.randn(batch, 1, 32, 32)
        with torch.no_grad():
            expected = task.backbone(images).numpy()
        np.testing.assert_allclose(model(images), expected, atol=1e-4, rtol=0)
    assert report["fp32_max_abs_diff"] < 1e-4

    # --evaluate: the test split's top-1 as PyTorch computes it with the checkpoint's weights.
    data = FashionMNISTDataModule(data_dir=str(fashion_mnist_dir), batch_size=8)
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            labels = batch["label"]
            correct += int((task.backbone(batch["image"]).argmax(dim=1) == labels).sum())
            total += len(labels)
    assert total == 20 and report["fp32_top1"] == pytest.approx(correct / total)

    with pytest.raises(ValueError, match=r"exported for images of shape \(batch, 1, 32, 32\).*--input_size"):
        model(np.zeros((1, 1, 64, 64), dtype=np.float32))


def input_quantization_scale(path: Path) -> float:
    """The scale of the QuantizeLinear applied to the model's input images."""
    graph = onnx.load(str(path)).graph
    (node,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images"]
    (scale,) = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == node.input[1]]
    return float(scale)


def test_static_int8_is_calibrated_on_training_images(tiny_swin, fashion_mnist_dir, classifier_checkpoint, tmp_path):
    _, ckpt = classifier_checkpoint
    output = tmp_path / "int8.onnx"
    extra = (f"--ckpt_path={ckpt}", f"--output={output}", "--quantize=int8", "--calibration_images=24")
    report = main(classification_args(tiny_swin, fashion_mnist_dir, *extra))
    assert report["quantization"] == "static"
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(output)
    # The input's uint8 range is the min/max of the normalised training images: the fixture's random pixels
    # span 0..255, i.e. (0 - mean) / std .. (1 - mean) / std.
    low, high = (0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0], (1 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    assert input_quantization_scale(output) == pytest.approx((high - low) / 255, rel=1e-5)


def test_dynamic_int8_without_data(tiny_swin, classifier_checkpoint, tmp_path, capsys):
    task, ckpt = classifier_checkpoint
    output = tmp_path / "int8.onnx"
    report = main(
        classification_args(
            tiny_swin, tmp_path / "no-data", f"--ckpt_path={ckpt}", f"--output={output}", "--quantize=int8"
        )
    )
    assert report["quantization"] == "dynamic" and "no calibration data" in capsys.readouterr().out
    assert "DynamicQuantizeLinear" in op_types(output) and "QuantizeLinear" not in op_types(output)
    torch.manual_seed(0)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = task.backbone(images).numpy()
    assert np.abs(OnnxModel(output)(images) - expected).max() < 0.1 * np.abs(expected).max()


def test_optimized_fp32_matches_pytorch_and_its_int8_keeps_top1(
    tiny_swin, fashion_mnist_dir, classifier_checkpoint, tmp_path
):
    task, ckpt = classifier_checkpoint
    fp32_out, int8_out = tmp_path / "opt.onnx", tmp_path / "opt_int8.onnx"
    common = (f"--ckpt_path={ckpt}", "--optimize", "--evaluate")
    fp32_report = main(classification_args(tiny_swin, fashion_mnist_dir, *common, f"--output={fp32_out}"))
    # The optimizer rewrote the graph: each block's fc1 bias + GELU became one fused operator.
    assert fp32_report["fused_operators"]["BiasGelu"] == sum(tiny_swin["depths"])
    assert "BiasGelu" in op_types(fp32_out) and "Gelu" not in op_types(fp32_out)
    torch.manual_seed(0)
    for batch in (1, 3):
        images = torch.randn(batch, 1, 32, 32)
        with torch.no_grad():
            expected = task.backbone(images).numpy()
        np.testing.assert_allclose(OnnxModel(fp32_out)(images), expected, atol=1e-4, rtol=0)

    int8_args = (*common, f"--output={int8_out}", "--quantize=int8", "--int8_method=dynamic")
    int8_report = main(classification_args(tiny_swin, fashion_mnist_dir, *int8_args))
    assert int8_report["quantization"] == "dynamic"
    assert {"DynamicQuantizeLinear", "BiasGelu"} <= op_types(int8_out)
    assert int8_report["fp32_top1"] == pytest.approx(fp32_report["fp32_top1"])
    # 20 test images: at most one changes its predicted class.
    assert abs(int8_report["int8_top1"] - int8_report["fp32_top1"]) <= 0.05 + 1e-9


def test_static_int8_method_needs_data(tiny_swin, classifier_checkpoint, tmp_path):
    _, ckpt = classifier_checkpoint
    extra = (f"--ckpt_path={ckpt}", f"--output={tmp_path / 'x.onnx'}", "--quantize=int8", "--int8_method=static")
    with pytest.raises(ValueError, match="--int8_method static needs the config's training images"):
        main(classification_args(tiny_swin, tmp_path / "no-data", *extra))


def test_segmentation_export_matches_pytorch(tmp_path):
    output = tmp_path / "seg.onnx"
    backbone = json.dumps({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4})
    args = [
        "--config",
        str(SEGMENTATION),
        f"--model.init_args.backbone_kwargs={backbone}",
        "--model.init_args.num_classes=4",
        "--input_size=[64, 96]",
        f"--output={output}",
    ]
    report = main(args)
    assert report["fp32_max_abs_diff"] < 1e-4
    task = build_task(parse_config(args), None)  # the config's seed makes the same weights
    assert isinstance(task, SegmentationTask)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = task(images).numpy()
    assert expected.shape == (2, 4, 64, 96)
    np.testing.assert_allclose(OnnxModel(output)(images), expected, atol=1e-4, rtol=0)


def test_detection_export_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="DetectionTask cannot be exported"):
        main(["--config", str(DETECTION), "--model.init_args.num_classes=3", f"--output={tmp_path / 'det.onnx'}"])


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


def test_a_composed_paper_recipe_exports_with_random_weights(tmp_path):
    """``export`` composes ``__base__`` as ``fit`` does (this recipe names its model size over a base), and offers
    none of fit's own arguments."""
    recipe = REPO / "configs" / "classification" / "swin_t_imagenet1k.yaml"
    args = ["--config", str(recipe), f"--data.init_args.data_dir={tmp_path / 'no-data'}", "--output=m.onnx"]
    config = parse_config([*args, "--model.init_args.num_classes=7"])
    assert config.model.init_args.backbone == "swin_t" and config.model.init_args.backbone_kwargs["img_size"] == 224
    assert not {"overwrite", "checkpoint_every_minutes", "test_after_fit"} & set(config.as_dict())
    network = inference_network(build_task(config, None))
    assert network.head.out_features == 7 and sum(p.numel() for p in network.parameters()) > 27e6  # Swin-T
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
    network = inference_network(build_task(parse_config(args), str(path)))
    task.eval()
    with torch.no_grad():
        ema, raw, exported = task.ema.module(images), task.backbone(images), network(images)
    assert (ema - raw).abs().max() > 1e-3  # the EMA is not the raw weights
    torch.testing.assert_close(exported, ema, rtol=0, atol=0)
