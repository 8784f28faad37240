"""Throughput and peak memory of swinlab's Swin-T/S/B against timm and torchvision, in one process.

For every (model size, device, precision, torch.compile, batch size, mode) the three implementations get the same
random input, the same stochastic-depth rate and the same optimizer (AdamW); each is warmed up, then timed in
alternation (one step of each per round, so a noisy neighbour slows all of them alike) and the median step time
gives images/s. Modes: ``infer`` (forward under ``torch.inference_mode``) and ``train`` (forward, cross-entropy,
backward, optimizer step). Peak memory is measured in one extra step per implementation after the timed ones: on
CUDA the rise of ``torch.cuda.max_memory_allocated`` above the allocation before the step, on CPU the rise of
the process RSS above its level before the step (sampled every millisecond from /proc/self/statm, after
``malloc_trim`` hands freed heap pages back to the OS so that memory freed by an earlier step or implementation is
not silently reused). Parameters and optimizer state that exist before the step are not counted on either.

    python scripts/benchmark.py --sizes t --device cpu --batch-sizes 8 --modes infer train --json bench.json
    python scripts/benchmark.py --sizes t s b --device cuda --precisions fp32 bf16 --compile off on \\
        --batch-sizes 64 128 --json bench_cuda.json

CPU inference fast paths (``--impls``, infer mode, fp32 runs on the CPU only; elsewhere they are skipped): the
deployed models below and ``swinlab-bf16`` (swinlab under bf16 autocast).

    python scripts/benchmark.py --sizes t --batch-sizes 1 8 --modes infer --threads 1 --clock thread \\
        --impls timm swinlab onnxruntime-fp32 onnxruntime-int8 openvino-fp32 openvino-bf16 openvino-int8

Deployed models: ``onnxruntime-fp32``, ``onnxruntime-int8`` (static QDQ),
``openvino-fp32``, ``openvino-bf16``, ``openvino-int8`` (NNCF) are swinlab's own fp32 ONNX file of the same model
written by ``swinlab.deploy.runtime.write_deployable`` for that runtime and precision and run by its
``ExportedModel`` with as many threads as torch (INT8 calibrated on four random images: speed only). The CPU model
and its ISA flags (avx2, avx512*, vnni, bf16, amx) are printed with the table:

    python scripts/benchmark.py --sizes t --batch-sizes 1 8 --modes infer --threads 1 --repeats 10 \
        --impls timm onnxruntime-fp32 onnxruntime-int8 openvino-fp32 openvino-bf16 openvino-int8

``swinlab-compiled`` is swinlab under ``torch.compile`` in any mode and on any device, whatever ``--compile`` says, so
that the compiled model is timed in alternation with the eager peers; ``swinlab-compiled-fused`` also trains with
``AdamW(fused=True)``:

    python scripts/benchmark.py --sizes t --batch-sizes 8 --modes train --threads 2 \\
        --impls timm swinlab swinlab-compiled swinlab-compiled-fused

SimMIM pre-training (``--modes pretrain``, issue 26): a training step of swinlab's ``SimMIM`` (``simmim``) against
Hugging Face transformers' ``SwinForMaskedImageModeling`` (``simmim-hf``), the same Swin shape (window = image size
/ 32, Swin-T: 6 at 192), batch and input, the same masks (mask patch 32, ratio 0.6) and AdamW:

    python scripts/benchmark.py --sizes t --image-size 192 --batch-sizes 8 --modes pretrain --impls simmim simmim-hf

``--clock thread`` (CPU, one thread) times each step by the CPU time of the calling thread, where torch and
onnxruntime then do all their work, so time the core spends on other processes is not counted.

Prints a table with the ratios of every implementation over timm and torchvision (the headline) and writes every
measurement to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple, get_args

import numpy as np
import timm
import torch
import torchvision
from torch import nn

from swinlab.deploy.onnx_graph import export_onnx, min_dynamic_size
from swinlab.deploy.runtime import ExportedModel, write_deployable
from swinlab.models import MaskGenerator, SimMIM, create_model
from swinlab.models.kernels import AttentionKernel

PEERS = ("timm", "torchvision")
# CPU inference only: exported/quantized swinlab models under onnxruntime, and swinlab under bf16 autocast.
# swinlab's fp32 ONNX file written by ``swinlab.deploy.runtime.write_deployable`` for a runtime and precision, run by
# ``ExportedModel``: "<runtime>-<precision>".
DEPLOYED = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16", "openvino-int8")
FAST_PATHS = (*DEPLOYED, "swinlab-bf16")
# swinlab under torch.compile whatever --compile says, so that it is timed in alternation with the eager peers (what
# `compile: true` in a task gives); "-fused" also steps AdamW(fused=True) instead of the default foreach AdamW.
COMPILED_SWINLAB = ("swinlab-compiled", "swinlab-compiled-fused")
# SimMIM pre-training steps (mode ``pretrain`` only): swinlab's and Hugging Face transformers'.
PRETRAIN_PEER = "simmim-hf"
PRETRAINING = ("simmim", PRETRAIN_PEER)
IMPLEMENTATIONS = ("swinlab", *PEERS, *COMPILED_SWINLAB, *FAST_PATHS, *PRETRAINING)
# size -> (swinlab name, timm name, torchvision builder, the paper's stochastic-depth rate)
MODELS = {
    "t": ("swin_t", "swin_tiny_patch4_window7_224", torchvision.models.swin_t, 0.2),
    "s": ("swin_s", "swin_small_patch4_window7_224", torchvision.models.swin_s, 0.3),
    "b": ("swin_b", "swin_base_patch4_window7_224", torchvision.models.swin_b, 0.5),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# wall: elapsed time. thread: CPU time of the calling thread, which with one thread (torch's and onnxruntime's
# work both run on it) leaves out the time other processes take the core: steadier on a shared machine.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


class Result(NamedTuple):
    model: str
    impl: str
    device: str
    precision: str
    compiled: bool
    batch_size: int
    mode: str
    images_per_s: float
    median_step_s: float
    step_times_s: list[float]
    peak_memory_mb: float | None


def build_model(
    impl: str, size: str, num_classes: int, image_size: int = 224, swinlab_attention: str = "auto"
) -> nn.Module:
    """One implementation of Swin-{T,S,B}, window 7, randomly initialised (no weights are downloaded)."""
    swinlab_name, timm_name, torchvision_builder, drop_path = MODELS[size]
    if impl in ("swinlab", *COMPILED_SWINLAB):
        return create_model(
            swinlab_name,
            num_classes=num_classes,
            drop_path_rate=drop_path,
            img_size=image_size,
            attention=swinlab_attention,
        )
    if impl == "timm":
        return timm.create_model(
            timm_name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, img_size=image_size
        )
    if impl == "torchvision":
        return torchvision_builder(weights=None, num_classes=num_classes)  # its stochastic depth is the paper's, too
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLEMENTATIONS}")


_EXPORT_DIR: tempfile.TemporaryDirectory | None = None


@lru_cache
def onnx_model_path(size: str, num_classes: int, image_size: int) -> str:
    """swinlab's model exported as an fp32 ONNX graph, once per process, in a folder removed at exit."""
    global _EXPORT_DIR
    _EXPORT_DIR = _EXPORT_DIR or tempfile.TemporaryDirectory(prefix="swinlab-benchmark-")
    fp32 = Path(_EXPORT_DIR.name) / f"{size}_{num_classes}_{image_size}_fp32.onnx"
    torch.manual_seed(0)
    model = build_model("swinlab", size, num_classes, image_size).eval()
    # As ``export`` writes it: for any size unless the windows of image_size are smaller than the graph serves.
    dynamic = image_size >= min_dynamic_size(model)[0]
    export_onnx(model, fp32, (3, image_size, image_size), dynamic_size=dynamic)
    return str(fp32)


@lru_cache
def deployed_model_path(impl: str, size: str, num_classes: int, image_size: int) -> str:
    """swinlab's fp32 ONNX file written for ``impl`` ("<runtime>-<precision>"), once per process; INT8 is calibrated
    on four random images, which sets its speed, not a usable accuracy."""
    runtime, precision = impl.split("-")
    fp32 = Path(onnx_model_path(size, num_classes, image_size))
    output = fp32.with_name(f"{fp32.stem}_{impl}{'.onnx' if runtime == 'onnxruntime' else '.xml'}")
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, image_size, image_size), np.float32) for _ in range(4)]
    write_deployable(fp32, output, runtime, precision, calibration if precision == "int8" else None)
    return str(output)


def make_fast_path_step(
    impl: str, size: str, num_classes: int, images: torch.Tensor, swinlab_attention: str
) -> Callable[[], None]:
    """One inference step of a CPU fast path (``FAST_PATHS``) on ``images`` (B, 3, S, S)."""
    if impl == "swinlab-bf16":
        torch.manual_seed(0)
        model = build_model("swinlab", size, num_classes, images.shape[-1], swinlab_attention)
        return make_step(model, "infer", images, images.new_zeros(0, dtype=torch.long), torch.bfloat16)
    array = images.numpy()
    path = deployed_model_path(impl, size, num_classes, images.shape[-1])
    deployed = ExportedModel(path, threads=torch.get_num_threads())
    return lambda: deployed(array)


def make_pretrain_step(impl: str, size: str, images: torch.Tensor, swinlab_attention: str) -> Callable[[], None]:
    """One SimMIM training step (forward, masked L1 loss, backward, AdamW) of ``impl`` on ``images`` (B, 3, S, S)
    with window S / 32 and official masks (mask patch 32, ratio 0.6), no stochastic depth (SimMIM pre-training's)."""
    image_size = images.shape[-1]
    torch.manual_seed(0)
    encoder = create_model(
        MODELS[size][0],
        num_classes=0,
        img_size=image_size,
        window_size=image_size // 32,
        drop_path_rate=0.0,
        attention=swinlab_attention,
    )
    generator = torch.Generator().manual_seed(0)
    masks = MaskGenerator(image_size, 32, 4, 0.6)
    mask = torch.stack([masks(generator) for _ in range(len(images))]).to(images.device)
    if impl == "simmim":
        model = SimMIM(encoder).to(images.device).train()
        loss_of = lambda: model(images, mask)[0]  # noqa: E731
    else:
        from transformers import SwinConfig, SwinForMaskedImageModeling

        config = SwinConfig(
            image_size=image_size,
            patch_size=4,
            embed_dim=encoder.embed_dim,
            depths=list(encoder.depths),
            num_heads=list(encoder.num_heads),
            window_size=image_size // 32,
            drop_path_rate=0.0,
            encoder_stride=32,
        )
        model = SwinForMaskedImageModeling(config).to(images.device).train()
        bool_masked_pos = mask.flatten(1).bool()
        loss_of = lambda: model(pixel_values=images, bool_masked_pos=bool_masked_pos).loss  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    model: nn.Module,
    mode: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype | None,
    fused_optimizer: bool = False,
) -> Callable[[], None]:
    """A closure running one inference or training step on ``images`` (B, 3, 224, 224); ``dtype`` turns on autocast,
    ``fused_optimizer`` trains with ``AdamW(fused=True)`` (one kernel for all parameters) instead of the default."""
    device = images.device

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                model(images)

        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_optimizer or None)

    def step() -> None:
        with autocast():
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_rss_above_start() -> Iterator[list[int]]:
    """Samples the RSS every millisecond while the block runs; yields a list that ends up holding the peak rise."""
    start, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes() - start)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], rss_bytes() - start)


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one step in MiB: CUDA allocator peak, or the CPU RSS rise (None where /proc is missing)."""
    if device.type == "cuda":
        # The rise above what is allocated before the step: the other implementations' weights live on the
        # same device, so the absolute peak would count them too.
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not Path("/proc/self/statm").exists():
        return None
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with peak_rss_above_start() as peak:
        step()
    return peak[0] / 2**20


def benchmark_config(
    size: str,
    impls: list[str],
    device: torch.device,
    precision: str,
    compiled: bool,
    batch_size: int,
    mode: str,
    warmup: int,
    repeats: int,
    num_classes: int,
    measure_memory: bool,
    image_size: int = 224,
    swinlab_attention: str = "auto",
    clock: Callable[[], float] = time.perf_counter,
    compile_backend: str = "inductor",
) -> list[Result]:
    """Times every implementation on the same batch, in alternation; returns one Result per implementation.

    The CPU fast paths (``FAST_PATHS``) run only for fp32 inference on the CPU without torch.compile; elsewhere
    they are left out (and said so).
    """
    kept = [impl for impl in impls if (impl in PRETRAINING) == (mode == "pretrain")]
    if kept != impls:
        print(f"skipped {[impl for impl in impls if impl not in kept]} in mode {mode}: pretrain times simmim* only")
        impls = kept
    fast_paths_apply = mode == "infer" and device.type == "cpu" and precision == "fp32" and not compiled
    if not fast_paths_apply and any(impl in FAST_PATHS for impl in impls):
        print(f"skipped {[i for i in impls if i in FAST_PATHS]}: CPU fp32 inference without compile only")
        impls = [impl for impl in impls if impl not in FAST_PATHS]
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    steps, memory = {}, {}
    for impl in impls:
        if impl in FAST_PATHS:
            steps[impl] = make_fast_path_step(impl, size, num_classes, images, swinlab_attention)
        elif impl in PRETRAINING:
            steps[impl] = make_pretrain_step(impl, size, images, swinlab_attention)
        else:
            torch.manual_seed(0)
            model = build_model(impl, size, num_classes, image_size, swinlab_attention).to(device)
            if compiled or impl in COMPILED_SWINLAB:
                model = torch.compile(model, backend=compile_backend)
            fused = impl == "swinlab-compiled-fused"
            steps[impl] = make_step(model, mode, images, labels, PRECISIONS[precision], fused_optimizer=fused)
        for _ in range(warmup):
            steps[impl]()
        synchronize(device)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl in impls:
            synchronize(device)
            start = clock()
            steps[impl]()
            synchronize(device)
            times[impl].append(clock() - start)
    for impl in impls:
        memory[impl] = peak_memory_mb(steps[impl], device) if measure_memory else None
    results = []
    for impl in impls:
        median = statistics.median(times[impl])
        results.append(
            Result(
                MODELS[size][0],
                impl,
                str(device),
                precision,
                compiled,
                batch_size,
                mode,
                batch_size / median,
                median,
                times[impl],
                memory[impl],
            )
        )
    return results


def format_table(results: list[Result]) -> str:
    """One row per measurement; ``vs timm`` / ``vs tv`` are the row's images/s over the peer's (same precision,
    compile, batch and mode), on every row but the peers' own."""
    header = (
        f"{'model':8} {'impl':20} {'mode':8} {'prec':5} {'compile':7} {'batch':>5} {'img/s':>9} "
        f"{'peak MiB':>9} {'vs timm':>8} {'vs tv':>7} {'vs hf':>7}"
    )
    lines = [header, "-" * len(header)]
    key = lambda r: (r.model, r.device, r.precision, r.compiled, r.batch_size, r.mode)  # noqa: E731
    peers = {(key(r), r.impl): r.images_per_s for r in results if r.impl in (*PEERS, PRETRAIN_PEER)}
    for r in results:
        ratios = ""
        if r.impl not in (*PEERS, PRETRAIN_PEER):
            ratios = " ".join(
                f"{r.images_per_s / peers[(key(r), peer)]:>{w}.2f}x" if (key(r), peer) in peers else " " * (w + 1)
                for peer, w in (("timm", 7), ("torchvision", 6), (PRETRAIN_PEER, 6))
            )
        memory = f"{r.peak_memory_mb:9.0f}" if r.peak_memory_mb is not None else f"{'-':>9}"
        lines.append(
            f"{r.model:8} {r.impl:20} {r.mode:8} {r.precision:5} {r.compiled!s:7} {r.batch_size:>5} "
            f"{r.images_per_s:9.2f} {memory} {ratios}"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical cores"


# The instruction sets the CPU kernels choose between: vector width, int8 dot products, bf16, AMX tiles.
ISA_FLAG_PREFIXES = ("avx2", "avx512", "avx_vnni", "amx")


def cpu_isa_flags() -> list[str]:
    """The CPU's vector/matrix ISA flags from /proc/cpuinfo (avx2, avx512*, vnni, bf16, amx*); [] where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(flag for flag in flags if flag.startswith(ISA_FLAG_PREFIXES) or "vnni" in flag or "bf16" in flag)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=tuple(MODELS), default=["t"], help="Swin-T/S/B")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLEMENTATIONS,
        default=["swinlab", *PEERS],
        help=f"models to time; CPU fp32 inference also has {', '.join(FAST_PATHS)}",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=tuple(PRECISIONS),
        default=["fp32"],
        help="fp32 (TF32 matmuls on CUDA unless --no-tf32) or bf16 autocast",
    )
    parser.add_argument("--no-tf32", action="store_true", help="strict fp32 matmuls and convolutions on CUDA")
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"], help="torch.compile each model")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("infer", "train", "pretrain"),
        default=["infer", "train"],
        help="pretrain: SimMIM training steps of the simmim and simmim-hf implementations only",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation (compile happens here)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation; the median is reported")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224, help="square input side (the comparisons use 224)")
    parser.add_argument(
        "--swinlab-attention",
        choices=get_args(AttentionKernel),
        default="auto",
        help="swinlab's window-attention kernel (auto: what swinlab picks for the device and mode)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for this run (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time; thread: CPU time of this thread (CPU, --threads 1 only; for a loaded machine)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the extra step that measures peak memory")
    parser.add_argument("--json", type=Path, default=Path("benchmark.json"), help="where to write all results")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    if args.image_size < 32 or args.image_size % 32:
        parser.error(f"--image-size must be a multiple of 32 (the total stride of Swin), got {args.image_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.clock == "thread" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock thread counts only this thread's CPU time: use it with --device cpu --threads 1")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.benchmark = True
    results: list[Result] = []
    for size in args.sizes:
        for precision in args.precisions:
            for compile_flag in args.compile:
                for batch_size in args.batch_sizes:
                    for mode in args.modes:
                        rows = benchmark_config(
                            size,
                            args.impls,
                            device,
                            precision,
                            compile_flag == "on",
                            batch_size,
                            mode,
                            args.warmup,
                            args.repeats,
                            args.num_classes,
                            not args.no_memory,
                            args.image_size,
                            args.swinlab_attention,
                            CLOCKS[args.clock],
                            args.compile_backend,
                        )
                        for row in rows:
                            print(
                                f"{row.model} {row.impl} {mode} {precision} compile={compile_flag} "
                                f"batch={batch_size}: {row.images_per_s:.2f} img/s",
                                flush=True,
                            )
                        results.extend(rows)
    isa = cpu_isa_flags()
    print(f"device: {device_name(device)}; CPU ISA: {' '.join(isa) or 'unknown'}")
    print(format_table(results))
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": device_name(device),
        "cpu_isa_flags": isa,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        **{name: version(name) for name in ("onnxruntime", "openvino", "nncf")},
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "tf32": device.type == "cuda" and not args.no_tf32,
        "swinlab_attention": args.swinlab_attention,
        "clock": args.clock,
        "compile_backend": args.compile_backend,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": [r._asdict() for r in results]}, indent=2))
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
