"""scripts/gpu_check.py on the CPU at tiny sizes: the same training, MFU and loader code paths as on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swinlab.models.flops import flop_counter_mode
from tests.helpers import load_script

pytestmark = pytest.mark.slow


@pytest.fixture
def gpu_check():
    return load_script("gpu_check")


def test_peak_is_matched_on_the_device_name(gpu_check) -> None:
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_check.peak_tflops("AMD EPYC, 2 logical cores") is None


def test_tiny_cpu_run_measures_training_mfu_and_loader(gpu_check, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--tiny", "--batch-size", "2", "--num-classes", "10", "--warmup", "1"]
    args += ["--repeats", "2", "--loader-repeats", "2", "--compile-backend", "aot_eager", "--peak-tflops", "1"]
    report = gpu_check.main([*args, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))

    training = report["training"]
    assert set(training["rows"]) == {"swinlab-compiled", "timm-eager", "timm-compiled"}
    for row in training["rows"].values():
        assert len(row["step_times_s"]) == 2 and row["images_per_s"] == pytest.approx(2 / row["median_step_s"])
        assert row["mfu"] == pytest.approx(training["flops_per_step"] / row["median_step_s"] / 1e12)

    # "x 3 for forward and backward" against the FLOPs PyTorch counts in a real training step of the tiny Swin
    # (the first layer needs no input gradient, so the count is a little below 3x the forward).
    model = gpu_check.build("swinlab", True, 10, torch.device("cpu"))
    with flop_counter_mode() as counter:
        torch.nn.functional.cross_entropy(model(torch.zeros(2, 3, 32, 32)), torch.zeros(2, dtype=torch.long)).backward()
    assert training["flops_per_step"] == pytest.approx(counter.get_total_flops(), rel=0.05)

    loader = report["loader"]
    assert loader["max_abs_difference"] == 0
    assert all(speed > 0 for speed in loader["images_per_s"].values()) and len(loader["images_per_s"]) == 2
    table = capsys.readouterr().out
    assert "timm-eager" in table and "1.00x" in table and "MFU" in table


def test_cuda_without_a_gpu_is_refused(gpu_check) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cuda"])
