"""A bad configuration fails with one error naming the key and the fix, before any training starts."""

import json
from pathlib import Path

import pytest
import torch

from swinlab import validation
from swinlab.cli import main
from swinlab.data import ADE20KDataModule
from swinlab.models import create_model, list_models
from swinlab.tasks import SegmentationTask
from swinlab.validation import ConfigError, check_num_classes
from tests.helpers import REPO

QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"


def fit_args(data_dir: Path, root: Path, backbone: dict) -> list[str]:
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        f"--model.init_args.backbone_kwargs={json.dumps(backbone)}",
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--model.init_args.backbone=swin_x"],
            r"model\.init_args\.backbone='swin_x' is not a registered model; choose one of .*swin_t",
        ),
        (
            # Clipping the window to the map is the default (the official function); without it, too large a window
            # is a config error.
            [
                "--model.init_args.backbone_kwargs.window_size=32",
                "--model.init_args.backbone_kwargs.clip_window_to_feature=false",
            ],
            r"model\.init_args\.backbone_kwargs\.window_size=32 is larger than the first feature map 16x16 "
            r".*set window_size <= 16",
        ),
        (
            ["--model.init_args.backbone_kwargs.embed_dim=24"],
            r"model\.init_args\.backbone_kwargs: embed_dim=24 gives 48 channels in stage 1, "
            r"not divisible by num_heads\[1\]=5",
        ),
        (["--model.init_args.optimizer.init_args.lr=0"], r"model\.init_args\.optimizer\.init_args\.lr=0.* must be > 0"),
        (
            ["--data.init_args.data_dir=/no/such/folder"],
            r"data\.init_args\.data_dir='/no/such/folder' is not a folder; pass --data\.init_args\.data_dir=",
        ),
        (
            ["--model.init_args.num_classes=5"],
            r"model\.init_args\.num_classes=5 but the data has 10 classes .*drop model\.init_args\.num_classes",
        ),
    ],
    ids=["unknown-backbone", "window-too-large", "heads", "lr", "data-dir", "num-classes"],
)
def test_bad_config_is_named_before_training(override, message, fashion_mnist_dir, tiny_swin, tmp_path):
    backbone = {
        **tiny_swin,
        "in_chans": 1,
        "num_heads": [1, 5] if "embed_dim=24" in override[0] else tiny_swin["num_heads"],
    }
    with pytest.raises(ConfigError, match=message):
        main([*fit_args(fashion_mnist_dir, tmp_path, backbone), *override])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "lightning_logs").exists()


def test_every_problem_is_listed_in_one_error(fashion_mnist_dir, tiny_swin, tmp_path):
    args = fit_args(fashion_mnist_dir, tmp_path, {**tiny_swin, "in_chans": 1})
    with pytest.raises(ConfigError) as error:
        main([*args, "--model.init_args.backbone=swin_x", "--model.init_args.optimizer.init_args.lr=-1"])
    assert "backbone='swin_x'" in str(error.value) and "lr=-1" in str(error.value)


def test_checkpoint_for_other_classes_is_refused_before_training(fashion_mnist_dir, tiny_swin, tmp_path):
    checkpoint = tmp_path / "other.ckpt"
    backbone = {**tiny_swin, "in_chans": 1}
    hyper_parameters = {
        "_class_path": "swinlab.tasks.ClassificationTask",
        "num_classes": 3,
        "backbone_kwargs": backbone,
    }
    torch.save({"hyper_parameters": hyper_parameters, "state_dict": {}}, checkpoint)
    args = fit_args(fashion_mnist_dir, tmp_path / "run", backbone)
    with pytest.raises(ConfigError, match=r"other\.ckpt was trained with num_classes=3 but the data has 10 classes"):
        main([*args, f"--ckpt_path={checkpoint}"])


def test_segmentation_num_classes_is_checked_against_the_data(tmp_path):
    """SegmentationTask exposes num_classes like the other tasks, so a mismatch with the data is caught."""
    backbone = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}
    task = SegmentationTask(num_classes=4, backbone_kwargs=backbone, decode_channels=8, aux_channels=8)
    check_num_classes(task, ADE20KDataModule(str(tmp_path), class_names=["a", "b", "c", "d"]))
    five = ADE20KDataModule(str(tmp_path), class_names=["a", "b", "c", "d", "e"])
    with pytest.raises(ConfigError, match=r"the model's num_classes=4 but the data has 5 classes \(ADE20KDataModule"):
        check_num_classes(task, five)


def test_config_checks_build_every_registered_backbone_on_the_meta_device(monkeypatch):
    """No weights are made to check a config: every registered backbone is built on the meta device, whole."""
    built = []

    def recording_create_model(*args, **kwargs):
        model = create_model(*args, **kwargs)
        built.append({parameter.device.type for parameter in model.parameters()})
        return model

    monkeypatch.setattr(validation, "create_model", recording_create_model)
    for name in list_models():
        assert validation.backbone_problems(name, {"drop_path_rate": 0.1}, "model.init_args") == [], name
    assert built == [{"meta"}] * len(list_models())
