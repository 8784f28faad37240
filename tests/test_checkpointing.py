"""Checkpoints and pretrained weights load with weights_only=True: a pickle that would run code is refused and
nothing in it runs."""

import json
import pathlib
from pathlib import Path

import pytest
import torch

from swinlab.checkpointing import AtomicCheckpointIO
from swinlab.cli import main
from swinlab.models import create_model, load_pretrained
from swinlab.models.checkpoint_file import CheckpointFileError
from tests.helpers import REPO

QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"


class RunsCodeWhenUnpickled:
    """Unpickling calls ``Path.touch(marker)``: a stand-in for any command an attacker could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def crafted(tmp_path, tiny_swin) -> tuple[Path, Path]:
    """A checkpoint with real weights next to the payload, and the file the payload would create."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.ckpt"
    state = create_model("swin_t", num_classes=10, **tiny_swin).state_dict()
    torch.save({"state_dict": state, "model": state, "payload": RunsCodeWhenUnpickled(marker)}, path)
    return path, marker


def test_pretrained_loading_refuses_a_pickle_that_runs_code(crafted, tiny_swin):
    path, marker = crafted
    with pytest.raises(ValueError, match=r"crafted\.ckpt: refused, it holds pickled Python objects"):
        load_pretrained(create_model("swin_t", num_classes=10, **tiny_swin), path)
    assert not marker.exists()


def test_checkpoint_io_refuses_a_pickle_that_runs_code(crafted):
    path, marker = crafted
    with pytest.raises(ValueError, match=r"crafted\.ckpt: refused, it holds pickled Python objects"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="check --ckpt_path"):
        AtomicCheckpointIO().load_checkpoint(path.with_name("absent.ckpt"))


def test_resuming_from_a_pickle_that_runs_code_is_refused(crafted, fashion_mnist_dir, tiny_swin, tmp_path):
    path, marker = crafted
    args = [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        f"--model.init_args.backbone_kwargs={json.dumps({**tiny_swin, 'in_chans': 1})}",
        f"--ckpt_path={path}",
    ]
    # Checked before LightningCLI reads the checkpoint's hyper-parameters; nothing in it runs.
    with pytest.raises(CheckpointFileError, match=r"crafted\.ckpt: refused, .* would run code"):
        main(args)
    assert not marker.exists()
