import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from swinlab.__main__ import run as command_line
from swinlab.cli import FIT_ONLY_KEYS, main
from swinlab.models import create_model
from swinlab.validation import ConfigError
from tests.helpers import REPO

QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


def tiny_model_args(tiny_swin: dict, **overrides) -> list[str]:
    return [f"--model.init_args.backbone_kwargs={json.dumps({**tiny_swin, **overrides})}"]


def fashion_args(fashion_mnist_dir: Path, tiny_swin: dict) -> list[str]:
    data = [
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
    ]
    return ["--config", str(QUICKSTART), *CPU, *data, *tiny_model_args(tiny_swin, in_chans=1)]


def read_metrics(root: Path) -> list[dict]:
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics) as f:
        return list(csv.DictReader(f))


def test_help_lists_tasks_and_data_modules(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "swinlab.tasks.ClassificationTask" in text and "swinlab.data.FashionMNISTDataModule" in text
    assert "swinlab.data.ImageNetDataModule" in text and "swinlab.data.ImageFolderDataModule" in text


def test_interpolated_value_follows_command_line_override(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICKSTART), "--data.init_args.image_size=48", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["backbone_kwargs"]["img_size"] == 48
    assert config["checkpoint"]["monitor"] == "val/top1"


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "classification").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_classification_config_fits(config, tiny_swin, image_folder, fashion_mnist_dir, tmp_path):
    args = ["fit", "--config", str(config), *CPU, "--trainer.fast_dev_run=true"]
    args += [f"--trainer.default_root_dir={tmp_path}"]
    if "fashion_mnist" in config.name:
        args += [
            f"--data.init_args.data_dir={fashion_mnist_dir}",
            "--data.init_args.val_size=8",
            "--data.init_args.batch_size=4",
        ]
        args += tiny_model_args(tiny_swin, in_chans=1)
    else:
        args += [
            f"--data.init_args.data_dir={image_folder}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--data.init_args.pin_memory=false",
        ]
        if "finetune" in config.name:
            # A 32x32 / window-4 checkpoint fine-tuned at 64x64 / window 8: the bias tables are interpolated.
            checkpoint = tmp_path / "tiny_224.pth"
            torch.save({"model": create_model("swin_t", num_classes=1000, **tiny_swin).state_dict()}, checkpoint)
            args += ["--data.init_args.image_size=64", f"--model.init_args.pretrained={checkpoint}"]
            args += tiny_model_args(tiny_swin, img_size=64, window_size=8)
        else:
            args += ["--data.init_args.image_size=32", *tiny_model_args(tiny_swin)]
    cli = main(args)
    # The run did what fit claims: finished, took its one optimizer step and evaluated (the last loop's loss and
    # top-1 are logged: val/*, or test/* where the config tests after fitting).
    trainer, stage = cli.trainer, "test" if cli.config.fit.test_after_fit else "val"
    assert trainer.state.finished and trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics[f"{stage}/loss"])
    assert 0.0 <= float(trainer.callback_metrics[f"{stage}/top1"]) <= 1.0


def test_fit_then_test_and_predict_from_the_checkpoint_folder(tiny_swin, fashion_mnist_dir, predict_folder, tmp_path):
    common = [
        *fashion_args(fashion_mnist_dir, tiny_swin),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    cli = main(
        ["fit", *common, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1"]
    )
    # test_after_fit and ``--ckpt_path best`` use the monitored checkpoint, not the periodic last-only one
    assert cli.trainer.checkpoint_callback.monitor == "val/top1"
    assert cli.trainer.checkpoint_callback.best_model_path.endswith(".ckpt")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("best-epoch=") and names[1] == "last.ckpt"
    (config,) = tmp_path.glob("lightning_logs/version_0/config.yaml")
    assert yaml.safe_load(config.read_text())["data"]["init_args"]["data_dir"] == str(fashion_mnist_dir)
    rows = read_metrics(tmp_path)
    assert any(row["val/top1"] for row in rows) and any(row["train/lr"] for row in rows)
    assert any(row["test/top1"] for row in rows)  # test_after_fit: true in the quickstart

    main(["test", *common, "--ckpt_path=last"])
    predict = ["predict", *common, "--ckpt_path=last", f"--data.init_args.predict_dir={predict_folder}"]
    main(predict)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 4 and rows[1][0] == "img_0.JPEG" and len(rows[1]) == 12 and rows[0][-1] == "error"
    # Where predictions go is a run-time option: the hyperparameters LightningCLI reads from a checkpoint file
    # (a path: ``last`` is resolved later) must not override it.
    elsewhere = tmp_path / "elsewhere.csv"
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    main([*predict, f"--ckpt_path={checkpoint}", f"--model.init_args.predictions_file={elsewhere}"])
    assert elsewhere.read_text() == (tmp_path / "predictions.csv").read_text()


def test_num_classes_is_linked_from_the_data_module(tiny_swin, image_folder, fashion_mnist_dir, tmp_path):
    data = [
        f"--data.init_args.data_dir={image_folder}",
        "--data.init_args.image_size=32",
        "--data.init_args.num_workers=0",
    ]
    config = REPO / "configs" / "classification" / "swin_t_imagenet1k.yaml"
    root = f"--trainer.default_root_dir={tmp_path}"
    cli = main(["--config", str(config), *CPU, *data, *tiny_model_args(tiny_swin), root], run=False)
    assert cli.model.num_classes == 3 and cli.model.backbone.head.out_features == 3
    # A model without a num_classes argument is left alone.
    boring = "--model=lightning.pytorch.demos.boring_classes.BoringModel"
    fashion = ["--data=swinlab.data.FashionMNISTDataModule", f"--data.init_args.data_dir={fashion_mnist_dir}"]
    cli = main([boring, *fashion, root], run=False)
    assert type(cli.model).__name__ == "BoringModel"


def test_ddp_fit_and_predict_on_two_cpu_processes(tiny_swin, fashion_mnist_dir, predict_folder, tmp_path):
    common = [
        *fashion_args(fashion_mnist_dir, tiny_swin),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.enable_progress_bar=false",
    ]
    # Two processes on two cores, importing this tree's swinlab (not an installed copy).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for args in (
        ["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"],
        ["predict", *common, "--ckpt_path=last", f"--data.init_args.predict_dir={predict_folder}"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "swinlab", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert any(row["val/top1"] for row in rows) and any(row["test/top1"] for row in rows)
    with open(tmp_path / "predictions.csv") as f:
        files = [row[0] for row in list(csv.reader(f))[1:]]
    assert files == ["img_0.JPEG", "img_1.JPEG", "more/img_0.JPEG"]  # both ranks' parts, once each


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_fit_only_arguments_are_offered_by_fit_alone(subcommand, capsys):
    for flag in ("--overwrite=true", "--collective_timeout=9", "--checkpoint_every_minutes=5", "--test_after_fit=1"):
        with pytest.raises(ConfigError, match=f"unknown config key `{flag[2:].split('=')[0]}`"):
            main([subcommand, "--config", str(QUICKSTART), flag])
    # The recipe's own fit-only setting (test_after_fit) is dropped for the other commands, kept for fit.
    printed = {}
    for command in (subcommand, "fit"):
        with pytest.raises(SystemExit):
            main([command, "--config", str(QUICKSTART), "--print_config"])
        printed[command] = yaml.safe_load(capsys.readouterr().out)
    assert not set(FIT_ONLY_KEYS) & set(printed[subcommand])
    assert set(FIT_ONLY_KEYS) <= set(printed["fit"]) and printed["fit"]["test_after_fit"] is True
    for group in ("model", "data", "trainer", "checkpoint"):  # the rest of the recipe reads the same
        assert printed["fit"][group] == printed[subcommand][group], group


@pytest.mark.parametrize(
    ("error", "one_line"),
    [(ConfigError("model.init_args.x=1 is bad"), True), (OSError("disk full"), True), (KeyError("a bug"), False)],
    ids=["swinlab-error", "os-error", "bug"],
)
def test_only_swinlabs_own_errors_and_os_errors_are_one_line(error, one_line, monkeypatch, capsys, tmp_path):
    """Raised after parsing, where the config is checked: a bug inside swinlab keeps its traceback."""

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("swinlab.cli.validate_run_config", fail)
    monkeypatch.setattr(
        sys, "argv", ["swinlab", "fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}"]
    )
    monkeypatch.delenv("SWINLAB_DEBUG", raising=False)
    if not one_line:
        with pytest.raises(type(error)):
            command_line()
        return
    with pytest.raises(SystemExit) as done:
        command_line()
    assert done.value.code == 2
    assert capsys.readouterr().err == f"swinlab: error: {error} (SWINLAB_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("SWINLAB_DEBUG", "1")
    with pytest.raises(type(error)):
        command_line()
