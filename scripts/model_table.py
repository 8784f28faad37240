"""Print swinlab's parameter counts and multiply-adds next to the papers' (Swin Table 1; Swin V2 model hub).

    python scripts/model_table.py                 # all variants, markdown table
    python scripts/model_table.py --models swin_t --json table.json

Multiply-adds come from ``swinlab.models.flops.count_macs`` (matmuls, convolutions and attention, as the
paper and fvcore count them); the model is built on the CPU and run once on a zero image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swinlab.models import create_model
from swinlab.models.flops import count_macs

# (model, input size, window): paper params (M) and GFLOPs (multiply-adds): Swin Table 1, and the official Swin V2
# model hub (ImageNet-1K at 256; params rounded as published, timm's exact counts are in tests/models).
PAPER = {
    ("swin_t", 224, 7): (28, 4.5),
    ("swin_s", 224, 7): (50, 8.7),
    ("swin_b", 224, 7): (88, 15.4),
    ("swin_b", 384, 12): (88, 47.0),
    ("swin_l", 224, 7): (197, 34.5),
    ("swin_l", 384, 12): (197, 103.9),
    ("swinv2_t", 256, 8): (28, 5.9),
    ("swinv2_t", 256, 16): (28, 6.6),
    ("swinv2_s", 256, 8): (50, 11.5),
    ("swinv2_s", 256, 16): (50, 12.6),
    ("swinv2_b", 256, 8): (88, 20.3),
    ("swinv2_b", 256, 16): (88, 21.8),
}


def measure(name: str, img_size: int, window: int) -> dict:
    model = create_model(name, img_size=img_size, window_size=window)
    paper_params, paper_gmacs = PAPER[(name, img_size, window)]
    return {
        "model": name,
        "input": img_size,
        "window": window,
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": count_macs(model, (3, img_size, img_size)) / 1e9,
        "paper_params_m": paper_params,
        "paper_gmacs": paper_gmacs,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | input | window | params | paper params | GMACs | paper GMACs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['window']} | {r['params']:,} ({r['params'] / 1e6:.1f}M) | "
            f"{r['paper_params_m']}M | {r['gmacs']:.2f} ({r['gmacs']:.1f}) | {r['paper_gmacs']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = sorted({name for name, _, _ in PAPER})
    parser.add_argument("--models", nargs="+", default=names, choices=names)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = [measure(*key) for key in PAPER if key[0] in args.models]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
