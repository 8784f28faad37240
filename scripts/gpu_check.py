"""One-shot GPU check: bf16 Swin-T training speed and MFU of swinlab (torch.compile) vs timm, and the uint8 loader.

Three measurements, in one process, on one device:

1. Training: swinlab's Swin-T compiled with ``torch.compile`` against timm's ``swin_tiny_patch4_window7_224`` eager
   and compiled: same random batch, bf16 autocast, cross-entropy, backward and an AdamW step per training step,
   timed in alternation (one step of each per round) after ``--warmup`` untimed steps (compilation happens there);
   the median step time gives images/s.
2. MFU: model FLOPs per step (``swinlab.models.flops.count_macs`` x 2 FLOPs per multiply-add x 3 for forward and
   backward) / median step time / the device's dense bf16 peak (``PEAK_BF16_TFLOPS``, matched on the device name,
   or ``--peak-tflops``).
3. Loader: a pinned uint8 (B, 3, S, S) batch copied to the device and turned into normalised float32 there, against
   copying the same batch already normalised as float32 (4x the bytes): images/s of each.

Prints a table and writes everything to ``--json``.

    python scripts/gpu_check.py --json gpu_check.json                       # CUDA, Swin-T 224, batch 128
    python scripts/gpu_check.py --device cpu --tiny --compile-backend aot_eager --json gpu_check_cpu.json

``--tiny`` runs the same code paths with a two-stage Swin at 32x32 (seconds on a CPU); ``--compile-backend
aot_eager`` traces forward and backward with dynamo and AOTAutograd without generating kernels (no compiler needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is no package: reuse benchmark.py's step
from benchmark import device_name, make_step, synchronize

from swinlab.models import create_model
from swinlab.models.flops import count_macs

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first name contained in
# torch.cuda.get_device_name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
# (timm name, swinlab name, overrides shared by both)
FULL = ("swin_tiny_patch4_window7_224", "swin_t", {"img_size": 224})
TINY = (
    "swin_tiny_patch4_window7_224",
    "swin_t",
    {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)},
)
IMPLEMENTATIONS = ("swinlab-compiled", "timm-eager", "timm-compiled")


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the device called ``name`` (``torch.cuda.get_device_name``), None if unknown."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def build(impl: str, tiny: bool, num_classes: int, device: torch.device) -> nn.Module:
    """Swin-T (or the tiny Swin) of ``impl``'s library, randomly initialised, on ``device``."""
    timm_name, swinlab_name, overrides = TINY if tiny else FULL
    torch.manual_seed(0)
    if impl.startswith("timm"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **overrides)
    else:
        model = create_model(swinlab_name, num_classes=num_classes, **overrides)
    return model.to(device)


def time_in_alternation(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per step of each closure, and all its step times: ``warmup`` untimed calls each, then one
    timed call of each per round for ``repeats`` rounds."""
    for step in steps.values():
        for _ in range(warmup):
            step()
        synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, times


def training_check(args: argparse.Namespace, device: torch.device) -> dict:
    """bf16 training steps (AdamW included) of swinlab compiled, timm eager and timm compiled; MFU of each."""
    size = TINY[2]["img_size"] if args.tiny else FULL[2]["img_size"]
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    flops_per_step = 2 * 3 * count_macs(build("swinlab", args.tiny, args.num_classes, device), (3, size, size))
    flops_per_step *= args.batch_size
    steps = {}
    for impl in IMPLEMENTATIONS:
        model = build(impl, args.tiny, args.num_classes, device)
        if impl.endswith("compiled"):
            model = torch.compile(model, backend=args.compile_backend)
        steps[impl] = make_step(model, "train", images, labels, torch.bfloat16)
    medians, all_times = time_in_alternation(steps, device, args.warmup, args.repeats)
    peak = args.peak_tflops or peak_tflops(device_name(device))
    rows = {}
    for impl, seconds in medians.items():
        achieved = flops_per_step / seconds
        rows[impl] = {
            "median_step_s": seconds,
            "step_times_s": all_times[impl],
            "images_per_s": args.batch_size / seconds,
            "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (peak * 1e12) if peak else None,
        }
    return {"image_size": size, "flops_per_step": flops_per_step, "peak_bf16_tflops": peak, "rows": rows}


def loader_check(args: argparse.Namespace, device: torch.device) -> dict:
    """images/s of a uint8 batch copied to ``device`` and normalised there vs a float32 batch normalised before."""
    size = TINY[2]["img_size"] if args.tiny else FULL[2]["img_size"]
    generator = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    pin = device.type == "cuda"
    uint8 = uint8.pin_memory() if pin else uint8
    normalised = normalise(uint8)
    normalised = normalised.pin_memory() if pin else normalised

    def uint8_step() -> torch.Tensor:
        return normalise(uint8.to(device, non_blocking=True))

    def float32_step() -> torch.Tensor:
        return normalised.to(device, non_blocking=True)

    # Same arithmetic on either side of the copy: the device result equals the CPU-normalised batch.
    max_difference = float((uint8_step() - float32_step()).abs().max())
    medians, _ = time_in_alternation(
        {"uint8 -> normalise on device": uint8_step, "float32 normalised on host": float32_step},
        device,
        warmup=1,
        repeats=args.loader_repeats,
    )
    return {
        "image_size": size,
        "max_abs_difference": max_difference,
        "images_per_s": {name: args.batch_size / seconds for name, seconds in medians.items()},
    }


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 scaled to [0, 1] and normalised with the ImageNet mean and std, on its device."""
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def format_table(report: dict) -> str:
    training, loader = report["training"], report["loader"]
    timm_eager = training["rows"]["timm-eager"]["images_per_s"]
    lines = [
        f"{report['device']}, batch {report['batch_size']}, {training['image_size']}px, bf16 autocast + AdamW, "
        f"{training['flops_per_step'] / 1e12:.3f} TFLOP/step, peak {training['peak_bf16_tflops'] or '?'} TFLOP/s",
        f"{'impl':18} {'img/s':>10} {'vs timm eager':>14} {'TFLOP/s':>9} {'MFU':>7}",
    ]
    for impl, row in training["rows"].items():
        mfu = f"{100 * row['mfu']:6.1f}%" if row["mfu"] is not None else f"{'-':>7}"
        lines.append(
            f"{impl:18} {row['images_per_s']:10.1f} {row['images_per_s'] / timm_eager:13.2f}x "
            f"{row['achieved_tflops']:9.2f} {mfu}"
        )
    lines.append(
        f"loader ({loader['image_size']}px): "
        + ", ".join(f"{name} {speed:.0f} img/s" for name, speed in loader["images_per_s"].items())
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (with --tiny for a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="a two-stage Swin at 32x32 instead of Swin-T at 224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation (compile happens here)")
    parser.add_argument("--repeats", type=int, default=20, help="timed training steps per implementation")
    parser.add_argument("--loader-repeats", type=int, default=50, help="timed copies per loader variant")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if its name is not known")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.warmup < 1 or args.repeats < 1 or args.loader_repeats < 1:
        parser.error("--batch-size, --warmup, --repeats and --loader-repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu --tiny for a smoke run")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    report = {
        "device": device_name(device),
        "batch_size": args.batch_size,
        "tiny": args.tiny,
        "compile_backend": args.compile_backend,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": training_check(args, device),
        "loader": loader_check(args, device),
    }
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
