"""How cost grows with input size: Swin-T (window attention) against a ViT of similar size (global attention).

For each side length S (input S x S, batch 1, inference) it measures, per model: attention multiply-adds
(the attention kernel itself: QK^T and AV), total multiply-adds (``swinlab.models.flops``), peak resident
memory of the forward pass, and forward latency. It then fits the log-log slope of each cost against the
pixel count S^2 (1 = linear, 2 = quadratic) and writes ``complexity.csv``, ``complexity.md`` and
``complexity.png`` to ``--out``.

The ViT is DeiT-S (timm ``VisionTransformer``: patch 16, width 384, depth 12, 6 heads; 22M params, 4.6 GMACs
at 224), the model the paper sets against Swin-T (28M, 4.5 GMACs). Peak memory is the rise of the process's
peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) over its size before the pass,
with glibc told to hand freed blocks back at once so that the resident set follows the live tensors.

    python scripts/complexity.py --sizes 112 224 448 672 896 --out docs/complexity/fused_attention
    python scripts/complexity.py --sizes 112 224 448 672 896 --math-attention --out docs/complexity/math_attention

``--math-attention`` forces PyTorch's unfused attention, which stores the (tokens x tokens) attention matrix;
the default fused kernels do not, so there the ViT's memory grows only linearly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import ctypes.util
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from swinlab.models import create_model
from swinlab.models.flops import flop_counter_mode

COSTS = ("attention_gmacs", "total_gmacs", "peak_mem_mb", "latency_ms")
LABELS = {
    "attention_gmacs": "attention GMACs",
    "total_gmacs": "total GMACs",
    "peak_mem_mb": "peak memory (MB)",
    "latency_ms": "forward latency (ms)",
}


def swin_t(
    embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24)
) -> nn.Module:
    """Swin-T (window 7, 224 px) by default."""
    return create_model("swin_t", embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads))


def vit(embed_dim: int = 384, depth: int = 12, num_heads: int = 6) -> nn.Module:
    """DeiT-S by default; ``dynamic_img_size`` interpolates its position embedding to any input size."""
    return VisionTransformer(
        img_size=224, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads, dynamic_img_size=True
    )


def is_attention_op(op: object) -> bool:
    """The attention kernels (fused SDPA, or the batched matmuls of an unfused one), not linears or convolutions."""
    name = str(op)
    return "scaled_dot_product" in name or name in ("aten.bmm", "aten.baddbmm")


def count(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(attention, total) multiply-adds of one forward pass, in G."""
    with torch.no_grad(), flop_counter_mode() as counter:
        model(x)
    flops = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in flops.items() if is_attention_op(op))
    return attention / 2e9, sum(flops.values()) / 2e9


def _resident_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


def release_freed_memory_at_once() -> None:
    """Make glibc return every block of 64 KiB or more to the OS when freed (a fixed ``M_MMAP_THRESHOLD``).

    By default glibc raises that threshold as big blocks are freed, keeping later tensors inside the already
    resident heap: the resident set would then stay flat across passes and hide their peak.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if libc.mallopt(-3, 64 * 1024) != 1:  # -3: M_MMAP_THRESHOLD
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: peak memory needs Linux with glibc")


def peak_memory_mb(run: Callable[[], object]) -> float:
    """Rise of the peak resident set while ``run()`` executes, in MB (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _resident_kb("VmRSS")
    run()
    return (_resident_kb("VmHWM") - before) / 1024


def latency_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def measure(name: str, model: nn.Module, size: int, repeats: int, math_attention: bool = False) -> dict:
    """One row: the costs of ``model`` on a (1, 3, size, size) input."""
    x = torch.randn(1, 3, size, size)
    # The unfused kernel materialises the (tokens x tokens) attention matrix, as the paper-era code did.
    kernel = partial(sdpa_kernel, SDPBackend.MATH) if math_attention else contextlib.nullcontext

    def forward() -> None:
        with torch.inference_mode(), kernel():
            model(x)

    with kernel():
        attention, total = count(model, x)
    row = {"model": name, "size": size, "pixels": size * size, "attention_gmacs": attention, "total_gmacs": total}
    row["peak_mem_mb"] = peak_memory_mb(forward)
    row["latency_ms"] = latency_ms(forward, repeats)
    return row


def loglog_slope(pixels: Sequence[float], cost: Sequence[float]) -> float:
    """Least-squares slope of log(cost) against log(pixels); NaN with fewer than two positive points."""
    points = [(p, c) for p, c in zip(pixels, cost) if c > 0]
    if len(points) < 2:
        return math.nan
    p, c = np.log(np.array(points)).T
    return float(np.polyfit(p, c, 1)[0])


def slopes(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{model: {cost: slope over all sizes}}, plus ``<cost>_top``: the slope between the two largest sizes."""
    result = {}
    for name in dict.fromkeys(row["model"] for row in rows):
        mine = sorted((row for row in rows if row["model"] == name), key=lambda row: row["pixels"])
        pixels = [row["pixels"] for row in mine]
        result[name] = {cost: loglog_slope(pixels, [row[cost] for row in mine]) for cost in COSTS}
        result[name].update(
            {f"{cost}_top": loglog_slope(pixels[-2:], [row[cost] for row in mine[-2:]]) for cost in COSTS}
        )
    return result


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["model", "size", "pixels", *COSTS]
    with (out / "complexity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: row[c] for c in columns} for row in rows)
    fits = slopes(rows)
    lines = ["| model | input | attention GMACs | total GMACs | peak memory (MB) | latency (ms) |", "|---" * 6 + "|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['size']} | {row['attention_gmacs']:.4g} | {row['total_gmacs']:.4g} | "
            f"{row['peak_mem_mb']:.4g} | {row['latency_ms']:.4g} |"
        )
    lines += [
        "",
        "Log-log slope of cost against pixel count (1 = linear, 2 = quadratic): over all sizes "
        "(between the two largest).",
        "",
        "| model | " + " | ".join(LABELS[c] for c in COSTS) + " |",
        "|---" * (len(COSTS) + 1) + "|",
    ]
    for name, fit in fits.items():
        lines.append(f"| {name} | " + " | ".join(f"{fit[c]:.2f} ({fit[c + '_top']:.2f})" for c in COSTS) + " |")
    (out / "complexity.md").write_text("\n".join(lines) + "\n")
    plot(rows, fits, out / "complexity.png")


def plot(rows: list[dict], fits: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    sizes = sorted({row["size"] for row in rows})
    for ax, cost in zip(axes.flat, COSTS):
        for name in fits:
            mine = sorted((row for row in rows if row["model"] == name), key=lambda row: row["pixels"])
            ax.loglog(
                [r["pixels"] for r in mine],
                [r[cost] for r in mine],
                "o-",
                label=f"{name}: slope {fits[name][cost]:.2f}",
            )
        ax.set_xticks([s * s for s in sizes], [f"{s}²" for s in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("input pixels")
        ax.set_title(LABELS[cost])
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224, 448, 672, 896], help="input side lengths")
    parser.add_argument("--vit-max-size", type=int, default=None, help="skip the ViT above this side (it is quadratic)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per point (median)")
    parser.add_argument(
        "--math-attention",
        action="store_true",
        help="force the unfused attention kernel, which stores the attention matrix (default: fused)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/complexity"), help="folder for the csv, md and png")
    parser.add_argument(
        "--swin-dims",
        type=int,
        nargs=3,
        metavar=("EMBED_DIM", "DEPTH", "HEADS"),
        default=None,
        help="a smaller Swin for quick checks: embed_dim, blocks per stage (4 stages), heads of stage 1",
    )
    parser.add_argument(
        "--vit-dims",
        type=int,
        nargs=3,
        metavar=("EMBED_DIM", "DEPTH", "HEADS"),
        default=None,
        help="a smaller ViT for quick checks: width, depth, heads",
    )
    args = parser.parse_args(argv)
    if min(args.sizes) < 32:
        raise ValueError(f"--sizes must be >= 32 (the ViT patch is 16 and Swin downsamples 32x), got {args.sizes}")
    release_freed_memory_at_once()
    if args.swin_dims:
        dim, depth, heads = args.swin_dims
        swin = swin_t(dim, (depth,) * 4, (heads, 2 * heads, 4 * heads, 8 * heads))
    else:
        swin = swin_t()
    models = {
        "Swin (window attention)": swin.eval(),
        "ViT (global attention)": (vit(*args.vit_dims) if args.vit_dims else vit()).eval(),
    }
    rows = []
    for size in sorted(args.sizes):
        for name, model in models.items():
            if name.startswith("ViT") and args.vit_max_size and size > args.vit_max_size:
                continue
            rows.append(measure(name, model, size, args.repeats, args.math_attention))
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                flush=True,
            )
    write_outputs(rows, args.out)
    print(f"wrote {args.out / 'complexity.md'}, .csv and .png")
    return rows


if __name__ == "__main__":
    main()
