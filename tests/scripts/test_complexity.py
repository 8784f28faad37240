import csv

import pytest

from tests.helpers import load_script

pytestmark = pytest.mark.slow

complexity = load_script("complexity")


def test_slope_is_one_for_linear_and_two_for_quadratic_cost():
    pixels = [1e4, 4e4, 16e4]
    assert complexity.loglog_slope(pixels, [3 * p for p in pixels]) == pytest.approx(1.0)
    assert complexity.loglog_slope(pixels, [5 * p * p for p in pixels]) == pytest.approx(2.0)


def test_tiny_run_writes_table_csv_and_plot(tmp_path):
    rows = complexity.main(
        [
            "--sizes",
            "64",
            "128",
            "--swin-dims",
            "16",
            "1",
            "1",
            "--vit-dims",
            "32",
            "2",
            "2",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert [(r["model"].split()[0], r["size"]) for r in rows] == [
        ("Swin", 64),
        ("ViT", 64),
        ("Swin", 128),
        ("ViT", 128),
    ]
    vit_64, vit_128 = rows[1], rows[3]
    # Global attention over 16 and 64 patches plus the class token: QK^T and AV grow with tokens squared.
    assert vit_128["attention_gmacs"] == pytest.approx((65 / 17) ** 2 * vit_64["attention_gmacs"])
    swin_64, swin_128 = rows[0], rows[2]
    assert swin_128["total_gmacs"] > swin_64["total_gmacs"] > 0 and swin_64["attention_gmacs"] > 0
    with open(tmp_path / "complexity.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    table = (tmp_path / "complexity.md").read_text()
    assert "| ViT (global attention) | 1.93 (1.93) |" in table  # (65 / 17)^2 over 4x the pixels: slope 1.93
    assert (tmp_path / "complexity.png").stat().st_size > 0


def test_attention_counts_the_same_fused_or_unfused():
    vit = complexity.vit(32, 1, 2).eval()
    fused = complexity.measure("vit", vit, 64, repeats=1)
    unfused = complexity.measure("vit", vit, 64, repeats=1, math_attention=True)
    assert fused["attention_gmacs"] == pytest.approx(unfused["attention_gmacs"]) and fused["attention_gmacs"] > 0
    assert fused["total_gmacs"] == pytest.approx(unfused["total_gmacs"])
