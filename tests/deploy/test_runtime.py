"""swinlab.deploy.runtime: every runtime x precision of a tiny exported Swin classifier against PyTorch, the
precision an OpenVINO IR records, and the errors for a wrong file, suffix or precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from swinlab.deploy import runtime
from swinlab.deploy.onnx_graph import export_onnx
from swinlab.deploy.runtime import ExportedModel, cpu_has_bf16, fastest_runtime, write_deployable
from swinlab.tasks import ClassificationTask
from swinlab.validation import ConfigError
from tests.helpers import TINY_SWIN

# bf16 and INT8 change the logits; the tiny classifier's top-1 (logits of a few units, as trained ones) must
# agree with PyTorch's on at least this share of random images.
TOP1_AGREEMENT = 0.9
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    """The tiny 10-class classifier of tests/test_export.py's ``classifier_checkpoint``: head scaled to logits of a
    few units (a trained model's size) instead of the initialisation's ~0.1."""
    torch.manual_seed(123)
    task = ClassificationTask(backbone_kwargs={**TINY_SWIN, "in_chans": 1}, num_classes=10).eval()
    with torch.no_grad():
        task.backbone.head.weight.mul_(30)
    return task.eval_network.eval()


@pytest.fixture(scope="module")
def fp32_onnx(classifier: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(classifier, path, (1, 32, 32))
    return path


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 32, 32), np.float32)


def pytorch_logits(classifier: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return classifier(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(
    ("kind", "precision"),
    [
        ("onnxruntime", "fp32"),
        ("onnxruntime", "int8"),
        ("openvino", "fp32"),
        pytest.param("openvino", "bf16", marks=needs_bf16),
        ("openvino", "int8"),
    ],
)
def test_every_runtime_and_precision_matches_pytorch(classifier, fp32_onnx, tmp_path, kind, precision):
    suffix = ".onnx" if kind == "onnxruntime" else ".xml"
    output = tmp_path / f"model{suffix}"
    # Calibration as arrays for one runtime and as name -> array dicts for the other: both forms are accepted.
    calibration = [images(8, seed) for seed in (1, 2, 3)]
    if kind == "onnxruntime":
        calibration = [{"images": batch} for batch in calibration]
    report = write_deployable(fp32_onnx, output, kind, precision, calibration if precision == "int8" else None)
    assert report["output"] == str(output) and report["precision"] == precision
    if precision == "int8":
        assert report["calibration_batches"] == 3 and report["quantized_ops"] > 0

    model = ExportedModel(output, threads=1)
    assert (model.runtime, model.precision, model.input_names) == (kind, precision, ["images"])
    x = images(64)
    (logits,) = model(x)
    expected = pytorch_logits(classifier, x)
    assert logits.shape == (64, 10)
    difference = np.abs(logits - expected).max()
    if precision == "fp32":
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        (single,) = model(x[:1])  # the batch dimension is dynamic
        np.testing.assert_allclose(single, expected[:1], atol=1e-4, rtol=0)
    else:
        # Lower precision did run: fp32 would match to 1e-6.
        assert difference > 1e-3
        assert (logits.argmax(1) == expected.argmax(1)).mean() >= TOP1_AGREEMENT


def test_openvino_runs_an_onnx_file_in_fp32_and_bf16(classifier, fp32_onnx):
    x = images(4)
    expected = pytorch_logits(classifier, x)
    fp32 = ExportedModel(fp32_onnx, "openvino", threads=1)
    # OpenVINO's CPU plugin would pick bf16 itself on a bf16 CPU: fp32 is asked for explicitly.
    assert fp32.precision == "fp32" and fp32.session.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    np.testing.assert_allclose(fp32(x)[0], expected, atol=1e-4, rtol=0)
    if cpu_has_bf16():
        bf16 = ExportedModel(fp32_onnx, "openvino", "bf16", threads=1)
        assert bf16.session.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"


@needs_bf16
def test_openvino_ir_round_trips_its_precision(fp32_onnx, tmp_path):
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        xml = tmp_path / f"{precision}.xml"
        write_deployable(fp32_onnx, xml, "openvino", precision)
        assert xml.with_suffix(".bin").is_file()
        model = ExportedModel(xml, threads=1)
        assert (
            model.precision == precision and model.session.get_property("INFERENCE_PRECISION_HINT").to_string() == hint
        )
    # An explicit precision overrides the recorded one.
    assert ExportedModel(tmp_path / "bf16.xml", precision="fp32", threads=1).precision == "fp32"


def test_bad_files_suffixes_and_precisions_are_named(fp32_onnx, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"model\.pt: a model file must be an ONNX graph \(\.onnx\) or an OpenVINO"):
        ExportedModel(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx does not exist"):
        ExportedModel(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match=r"wrong\.onnx: runtime openvino writes a \.xml file, e\.g\. .*wrong\.xml"):
        write_deployable(fp32_onnx, tmp_path / "wrong.onnx", "openvino", "fp32")
    with pytest.raises(ConfigError, match=r"runtime onnxruntime writes a \.onnx file"):
        write_deployable(fp32_onnx, tmp_path / "wrong.xml", "onnxruntime", "fp32")
    no_bf16 = "onnxruntime's CPU provider has no bf16 kernels: use --runtime openvino"
    with pytest.raises(ConfigError, match=no_bf16):
        write_deployable(fp32_onnx, tmp_path / "bf16.onnx", "onnxruntime", "bf16")
    with pytest.raises(ConfigError, match=no_bf16):
        ExportedModel(fp32_onnx, "onnxruntime", "bf16")
    with pytest.raises(ConfigError, match="tiny.onnx is not quantized: write an INT8 copy first"):
        ExportedModel(fp32_onnx, precision="int8")
    with pytest.raises(ConfigError, match="pass at least one calibration batch"):
        write_deployable(fp32_onnx, tmp_path / "int8.xml", "openvino", "int8", [])

    real_core = runtime._openvino_core

    class CoreWithoutBf16:
        """OpenVINO's Core as on a CPU without bf16 instructions."""

        def __init__(self) -> None:
            self.core = real_core()

        def get_property(self, device: str, name: str):
            if name == "OPTIMIZATION_CAPABILITIES":
                return ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]
            return self.core.get_property(device, name)

        def __getattr__(self, name: str):
            return getattr(self.core, name)

    monkeypatch.setattr(runtime, "_openvino_core", CoreWithoutBf16)
    with pytest.raises(ConfigError, match="this CPU has no bf16 instructions.*use --precision fp32"):
        ExportedModel(fp32_onnx, "openvino", "bf16")
    with pytest.raises(ConfigError, match="this CPU has no bf16 instructions"):
        write_deployable(fp32_onnx, tmp_path / "bf16.xml", "openvino", "bf16")


def test_fastest_runtime_times_both(fp32_onnx):
    fastest, seconds = fastest_runtime(fp32_onnx, images(1), threads=1, runs=2)
    assert set(seconds) == {"onnxruntime", "openvino"} and all(s > 0 for s in seconds.values())
    assert seconds[fastest] == min(seconds.values())
