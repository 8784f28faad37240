"""MaskedImageModelingTask: every pre-training recipe fits (loss, pictures), the optimizer groups follow SimMIM's,
bad backbones and files are refused, and a SIGKILLed pre-training resumes to the uninterrupted weights."""

import json
import signal
from pathlib import Path

import pytest
import torch

from swinlab.cli import main
from swinlab.tasks import MaskedImageModelingTask
from tests.helpers import REPO, TINY_SWIN, write_fashion_mnist
from tests.test_callbacks import last_checkpoint, run_until_signal

CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
RECIPES = sorted((REPO / "configs" / "pretraining").glob("*.yaml"))
QUICKSTART = REPO / "configs" / "pretraining" / "simmim_quickstart_fashion_mnist.yaml"


def tiny_args(config: Path, data: list[str], root: Path, in_chans: int = 3) -> list[str]:
    """A two-stage Swin (patch 2, stride 4) at 32x32 with 8-pixel mask blocks."""
    backbone = {**TINY_SWIN, "in_chans": in_chans}
    return [
        "fit",
        "--config",
        str(config),
        *CPU,
        f"--trainer.default_root_dir={root}",
        f"--model.init_args.backbone_kwargs={json.dumps(backbone)}",
        "--data.init_args.image_size=32",
        "--data.init_args.mask_patch_size=8",
        "--data.init_args.model_patch_size=2",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        *data,
    ]


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.stem)
def test_every_pretraining_recipe_fits_and_draws_its_reconstructions(config, image_folder, fashion_mnist_dir, tmp_path):
    if "fashion_mnist" in config.name:
        data = [f"--data.init_args.data_dir={fashion_mnist_dir}", "--data.init_args.val_size=8"]
        args = tiny_args(config, data, tmp_path, in_chans=1)
    else:
        data = [
            f"--data.init_args.data_dir={image_folder / 'train'}",
            f"--data.init_args.val_dir={image_folder / 'val'}",
        ]
        args = tiny_args(config, data, tmp_path)
    cli = main([*args, "--trainer.fast_dev_run=true"])
    trainer = cli.trainer
    assert trainer.state.finished and trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["val/loss"]) and torch.isfinite(
        trainer.callback_metrics["train/loss"]
    )
    (picture,) = tmp_path.rglob("reconstructions/step_*.png")
    assert picture.stat().st_size > 0


def test_weight_decay_spares_norms_biases_position_tables_and_the_mask_token():
    task = MaskedImageModelingTask("swin_t", {**TINY_SWIN, "position_bias": "relative+absolute"})
    groups = task.parameter_groups()
    undecayed = {name for group in groups if group.get("weight_decay") == 0.0 for name in group["names"]}
    decayed = {name for group in groups if "weight_decay" not in group for name in group["names"]}
    assert "model.mask_token" in undecayed and "model.encoder.absolute_pos_embed" in undecayed
    assert any(name.endswith("relative_position_bias_table") for name in undecayed)
    assert "model.decoder.0.bias" in undecayed and "model.encoder.patch_embed.norm.weight" in undecayed
    assert decayed == {
        name for name, param in task.named_parameters() if param.ndim > 1 and "table" not in name and "pos" not in name
    } - {"model.mask_token"}


def test_a_backbone_that_is_no_swin_is_named():
    with pytest.raises(ValueError, match=r"backbone='timm/resnet18': SimMIM needs a swinlab Swin backbone"):
        MaskedImageModelingTask("timm/resnet18")


def test_a_pretrained_file_without_a_swin_encoder_is_refused(tmp_path):
    torch.save({"state_dict": {"head.weight": torch.zeros(3, 3)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other\.ckpt holds no Swin encoder"):
        MaskedImageModelingTask("swin_t", TINY_SWIN, pretrained=str(tmp_path / "other.ckpt"))


# --- resume ----------------------------------------------------------------------------------------------------------

STEPS_PER_EPOCH = 8  # 40 images - 8 held out, batch 4


def resume_args(data_dir: Path, root: Path) -> list[str]:
    """Two epochs with the random crops, flips and masks on, drawn in a DataLoader worker (whose generators no
    checkpoint holds); last.ckpt every 3 steps."""
    data = [f"--data.init_args.data_dir={data_dir}", "--data.init_args.val_size=8"]
    return [
        *tiny_args(QUICKSTART, data, root, in_chans=1),
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        "--checkpoint_every_n_steps=3",
        "--checkpoint.monitor=null",
        "--model.init_args.num_pictures=0",
        "--data.init_args.num_workers=1",
    ]


def test_killed_pretraining_resumes_to_the_uninterrupted_weights(tmp_path):
    (tmp_path / "fashion-mnist").mkdir()
    data_dir = write_fashion_mnist(tmp_path / "fashion-mnist")
    main(resume_args(data_dir, tmp_path / "uninterrupted"))
    uninterrupted = last_checkpoint(tmp_path / "uninterrupted")

    args = resume_args(data_dir, tmp_path / "killed")
    killed = run_until_signal(args, 7, signal.SIGKILL, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert last_checkpoint(tmp_path / "killed")["global_step"] == 6
    main([*args, "--ckpt_path=last"])
    resumed = last_checkpoint(tmp_path / "killed")
    assert resumed["global_step"] == uninterrupted["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_validate_from_a_pretraining_checkpoint(fashion_mnist_dir, tmp_path):
    """LightningCLI applies a checkpoint's hyper-parameters to the config: they hold no num_classes to refuse."""
    data = [f"--data.init_args.data_dir={fashion_mnist_dir}", "--data.init_args.val_size=8"]
    args = tiny_args(QUICKSTART, data, tmp_path, in_chans=1)
    main([*args, "--trainer.max_steps=1", "--trainer.limit_val_batches=1"])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert "num_classes" not in checkpoint["hyper_parameters"]
    validate = ["validate", *args[1:], f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]
    cli = main([*validate, "--trainer.limit_val_batches=1"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_compile_reaches_the_simmim_step():
    task = MaskedImageModelingTask("swin_t", TINY_SWIN, compile=True, compile_kwargs={"backend": "eager"})
    task.configure_model()
    assert task.model._compiled_call_impl is not None
    loss, _ = task(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, 16, dtype=torch.long))
    assert torch.isfinite(loss)
