"""create_model names: registered, ``timm/<name>`` (tests/models/test_timm_backbone.py), and a user's
``<module>:<function>`` registered in the user's own module (the shipped examples/my_backbone.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swinlab.models import create_model, register_model
from swinlab.tasks import ClassificationTask, SegmentationTask
from tests.helpers import REPO

EXAMPLE = REPO / "examples" / "my_backbone.py"
QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """examples/my_backbone.py as the user's own ``my_models.py`` on sys.path (imported afresh per test)."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "my_models.py")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    return folder


def test_user_backbone_is_built_by_module_and_name(user_module: Path) -> None:
    model = create_model("my_models:tiny_cnn", num_classes=3, in_chans=1, patch_size=4)  # Swin keys ignored
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    features = create_model("my_models:tiny_cnn", num_classes=0, out_indices=(0, 1, 2, 3))
    maps = features.forward_features(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert features.feature_strides == [4, 8, 16, 32]
    assert create_model("tiny_cnn", num_classes=3).__class__.__name__ == "TinyCNN"  # registered once imported


def test_user_backbone_in_the_tasks(user_module: Path) -> None:
    task = ClassificationTask(backbone="my_models:tiny_cnn", num_classes=4, layer_decay=0.5)
    scale_of = {name: group["lr_scale"] for group in task.parameter_groups() for name in group["names"]}
    assert scale_of["backbone.stem.0.weight"] == 0.5**5  # stem: layer 0 of 5
    assert scale_of["backbone.stages.3.0.weight"] == 0.5  # last stage: layer 4
    assert scale_of["backbone.head.weight"] == 1.0
    seg = SegmentationTask(num_classes=3, backbone="my_models:tiny_cnn", decode_channels=8, aux_channels=8)
    masks = torch.randint(0, 3, (2, 32, 32))
    loss = seg.training_step({"image": torch.randn(2, 3, 32, 32), "mask": masks}, 0)
    loss.backward()
    assert torch.isfinite(loss) and seg.backbone.stem[0].weight.grad.abs().sum() > 0


def test_unknown_module_or_name_is_a_clear_error(user_module: Path) -> None:
    with pytest.raises(ValueError, match="cannot import module 'no_such_models'.*PYTHONPATH"):
        create_model("no_such_models:tiny_cnn")
    with pytest.raises(ValueError, match="'my_models' has no function 'tiny_rnn' registered.*registers: tiny_cnn"):
        create_model("my_models:tiny_rnn")
    # A function the module has but did not register is refused too: configs name registered constructors only.
    with pytest.raises(ValueError, match="no function 'conv_bn_relu' registered"):
        create_model("my_models:conv_bn_relu", in_channels=1, out_channels=1, stride=1)
    with pytest.raises(ValueError, match="unknown model 'tiny_rnn'.*'timm/<name>'.*'<module>:<function>'"):
        create_model("tiny_rnn")


def test_a_module_missing_an_import_shows_that_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_models.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency"):
        create_model("broken_models:anything")


def test_registering_a_taken_name_from_another_module_is_refused() -> None:
    def swin_t() -> torch.nn.Module:
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="'swin_t' of tests.models.test_registry is already registered by"):
        register_model(swin_t)


def test_cli_quickstart_with_the_user_backbone(user_module: Path, fashion_mnist_dir: Path, tmp_path: Path) -> None:
    args = [
        "fit",
        f"--config={QUICKSTART}",
        "--model.init_args.backbone=my_models:tiny_cnn",
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
    ]
    # Run from the user's project folder, as a user would: `python -m` puts it on sys.path.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "swinlab", *args], cwd=user_module, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_cnn ignores backbone_kwargs" in done.stderr and "TinyCNN" in done.stdout + done.stderr
