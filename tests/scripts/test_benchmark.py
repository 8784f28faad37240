"""Smoke runs of the benchmark scripts: every implementation and mode runs and lands in the JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, load_script

pytestmark = pytest.mark.slow


@pytest.fixture
def restore_threads():
    """The script's --threads changes torch's global thread count; later tests in this process get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_model_benchmark_writes_every_implementation_and_mode(tmp_path: Path, capsys, restore_threads) -> None:
    out = tmp_path / "bench.json"
    # One thread and 64x64 images keep it short on a shared CPU (two threads spin badly when cores are busy).
    load_script("benchmark").main(
        [
            "--sizes",
            "t",
            "--batch-sizes",
            "1",
            "--modes",
            "infer",
            "train",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--image-size",
            "64",
            "--num-classes",
            "10",
            "--threads",
            "1",
            "--impls",
            "swinlab",
            "timm",
            "torchvision",
            "swinlab-compiled",
            "swinlab-compiled-fused",
            # Dynamo + AOTAutograd without inductor's C++ build: the compiled paths run, in seconds.
            "--compile-backend",
            "aot_eager",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    rows = {(r["impl"], r["mode"]): r for r in report["results"]}
    impls = ("swinlab", "timm", "torchvision", "swinlab-compiled", "swinlab-compiled-fused")
    assert set(rows) == {(impl, mode) for impl in impls for mode in ("infer", "train")}
    assert report["meta"]["compile_backend"] == "aot_eager"
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] is not None and len(row["step_times_s"]) == 1
    assert report["meta"]["device"] and report["meta"]["torch_threads"] == 1
    table = capsys.readouterr().out
    assert "vs timm" in table and "swin_t   swinlab" in table


def test_cpu_fast_paths_are_timed_against_timm(tmp_path: Path) -> None:
    """Run as its own process: after OpenVINO's and onnxruntime's thread pools ran in a process, a later
    ``torch.compile``d step in that process (tests/tasks/test_base.py) died of a segfault in the dynamic loader."""
    out = tmp_path / "bench.json"
    # swinlab's ONNX file deployed by swinlab.deploy.runtime, and swinlab under bf16 autocast.
    fast_paths = ["onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16", "openvino-int8"]
    fast_paths += ["swinlab-bf16"]
    args = ["--sizes", "t", "--batch-sizes", "2", "--modes", "infer", "train", "--warmup", "0", "--repeats", "1"]
    args += ["--image-size", "64", "--num-classes", "10", "--threads", "1", "--no-memory", "--json", str(out)]
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), *args, "--clock", "thread"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's swinlab
    run = subprocess.run([*command, "--impls", "timm", *fast_paths], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["clock"] == "thread"
    rows = {(r["impl"], r["mode"]): r for r in report["results"]}
    # Inference only: training rows exist for timm alone.
    assert set(rows) == {("timm", "infer"), ("timm", "train")} | {(impl, "infer") for impl in fast_paths}
    assert all(row["images_per_s"] > 0 for row in rows.values())
    output = run.stdout
    assert f"skipped {fast_paths}" in output
    # The CPU and its ISA flags come with the table, as in the JSON.
    isa = report["meta"]["cpu_isa_flags"]
    assert f"device: {report['meta']['device']}; CPU ISA: {' '.join(isa) or 'unknown'}" in output
    assert all(flag.startswith(("avx", "amx")) or "vnni" in flag or "bf16" in flag for flag in isa)
    table = output[output.index("vs timm") :]
    table_rows = [line.split() for line in table.splitlines() if line.startswith("swin_t") and "infer" in line]
    ratios = {row[1]: float(row[-1].rstrip("x")) for row in table_rows if row[1] in fast_paths}
    timm_speed = rows[("timm", "infer")]["images_per_s"]
    expected = {impl: rows[(impl, "infer")]["images_per_s"] / timm_speed for impl in ratios}
    assert set(ratios) == set(fast_paths) and ratios == pytest.approx(expected, abs=0.006)


def test_model_benchmark_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        load_script("benchmark").main(["--repeats", "0"])
    # Thread CPU time misses the work of other threads.
    with pytest.raises(SystemExit):
        load_script("benchmark").main(["--clock", "thread", "--threads", "2"])
    assert "use it with --device cpu --threads 1" in capsys.readouterr().err


def test_loader_benchmark_on_generated_imagenet_folder(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    # mmax9: the recipe's magnitude 10 makes timm ask Pillow 13 for posterize(bits=0), which raises
    # (see docs/benchmarks.md).
    result = load_script("benchmark_loader").main(
        [
            "--generate",
            "8",
            "--workers",
            "0",
            "--batch-size",
            "2",
            "--batches",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--auto-augment",
            "rand-m9-mstd0.5-inc1-mmax9",
        ]
    )
    assert json.loads(out.read_text()) == result
    assert result["decode_images_per_s_per_worker"] > result["train_transform_images_per_s_per_worker"] > 0
    assert result["loader_images_per_s"]["0"] > 0


def test_loader_benchmark_names_a_folder_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--generate more"):
        load_script("benchmark_loader").main(
            [
                "--generate",
                "4",
                "--workers",
                "0",
                "--batch-size",
                "2",
                "--batches",
                "4",
                "--repeats",
                "1",
                "--json",
                str(tmp_path / "x.json"),
            ]
        )


def test_pretrain_mode_times_simmim_against_transformers(tmp_path: Path, capsys, restore_threads) -> None:
    out = tmp_path / "bench.json"
    args = ["--sizes", "t", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--image-size", "64"]
    args += ["--threads", "1", "--modes", "pretrain", "infer", "--impls", "simmim", "simmim-hf", "--json", str(out)]
    load_script("benchmark").main(args)
    rows = {(r["impl"], r["mode"]) for r in json.loads(out.read_text())["results"]}
    assert rows == {("simmim", "pretrain"), ("simmim-hf", "pretrain")}  # no inference rows of pre-training models
    table = capsys.readouterr().out
    assert "vs hf" in table and "swin_t   simmim               pretrain" in table
