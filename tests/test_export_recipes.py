"""Every shipped recipe exports with random weights: ``python -m swinlab export --config RECIPE --output F``."""

from __future__ import annotations

from pathlib import Path

import pytest

from swinlab.export import main
from tests.test_configs import IDS, SHIPPED

# The recipes' data folders are relative to the working folder; the test runs in an empty one, so no recipe finds
# data and num_classes comes from the recipe itself, or from here.
NUM_CLASSES = "--model.init_args.num_classes=7"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SHIPPED, ids=IDS)
def test_every_shipped_recipe_exports_with_random_weights(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Random weights: no published weights to start from (loading them would need the Hub).
    args = ["--config", str(recipe), "--model.init_args.pretrained=null", f"--output={tmp_path / 'model.onnx'}"]
    if "pretraining" not in recipe.parts:
        args.append(NUM_CLASSES)
    report = main(args)
    assert Path(report["output"]).is_file()
    assert report["max_abs_diff"] < 1e-3, report
