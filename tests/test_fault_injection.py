"""Issue 19, nothing lost, nothing wrong: each fault a user can meet gets a refusal or a one-line error naming the
file, folder or key and the way on, and leaves the earlier checkpoints intact."""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy

from swinlab.__main__ import run as command_line
from swinlab.checkpointing import LOCK_NAME, CheckpointSaveError, RunFolderError, RunFolderLock
from swinlab.cli import main
from swinlab.models.checkpoint_file import CheckpointFileError
from swinlab.tasks import ClassificationTask
from swinlab.validation import ConfigError
from tests.helpers import REPO, TINY_SWIN, write_fashion_mnist

pytestmark = pytest.mark.slow

QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"


def fit_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    """Two training steps of a tiny Swin on Fashion-MNIST, checkpoints in ``root/checkpoints``."""
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",  # an int: 1 would read as 1.0, the whole epoch
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        "--test_after_fit=false",
        f"--model.init_args.backbone_kwargs={json.dumps({**TINY_SWIN, 'in_chans': 1})}",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        *extra,
    ]


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "swinlab", *args], env=environment, cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def one_finished_run(tmp_path_factory) -> Path:
    """A finished run (fit once per module: the tests that need one get a copy)."""
    data_dir = write_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"))
    root = tmp_path_factory.mktemp("finished") / "run"
    main(fit_args(data_dir, root))
    assert (root / "checkpoints" / "last.ckpt").is_file()
    return root


@pytest.fixture
def finished_run(one_finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(one_finished_run, tmp_path / "run"))


# --- no silent overwrite ---------------------------------------------------------------------------------------


def test_fresh_fit_into_a_finished_run_refuses_and_names_the_ways_on(finished_run, fashion_mnist_dir):
    last = finished_run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    fresh_steps = torch.load(last, weights_only=True)["global_step"]
    with pytest.raises(RunFolderError) as refused:
        main(fit_args(fashion_mnist_dir, finished_run))
    message = str(refused.value)
    assert str(finished_run / "checkpoints") in message
    assert "--ckpt_path last" in message and "--trainer.default_root_dir" in message and "--overwrite true" in message
    assert last.read_bytes() == before
    # The explicit ways on: resume, or overwrite (the old checkpoints are replaced by the new run's).
    main(fit_args(fashion_mnist_dir, finished_run, "--ckpt_path=last", "--trainer.max_epochs=2"))
    assert torch.load(last, weights_only=True)["global_step"] > fresh_steps
    main(fit_args(fashion_mnist_dir, finished_run, "--overwrite=true"))
    assert torch.load(last, weights_only=True)["global_step"] == fresh_steps


class LockHolders(Callback):
    """Records, when training starts, the pid the run folder's lock names."""

    seen: ClassVar[list[int]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seen.append(json.loads((Path(trainer.default_root_dir) / LOCK_NAME).read_text())["pid"])


def test_second_run_in_a_locked_folder_refuses_and_a_stale_lock_is_taken_over(fashion_mnist_dir, tmp_path):
    root = tmp_path / "run"
    lock = root / LOCK_NAME
    running = root / "checkpoints" / "last.ckpt"
    running.parent.mkdir(parents=True)
    running.write_bytes(b"the running run's checkpoint")
    # A live run: this test's parent process holds the folder. Even --overwrite true deletes nothing of it.
    lock.write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "started": "now"}))
    with pytest.raises(RunFolderError, match=rf"{root} is in use by another run \(pid {os.getppid()}"):
        main(fit_args(fashion_mnist_dir, root, "--overwrite=true"))
    assert running.read_bytes() == b"the running run's checkpoint"
    # A killed run: its process is gone, so its lock is stale; the fit takes it over and holds it while it trains.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "started": "then"}))
    LockHolders.seen.clear()
    main(fit_args(fashion_mnist_dir, root, "--overwrite=true", f"--trainer.callbacks+={__name__}.LockHolders"))
    assert LockHolders.seen == [os.getpid()]
    assert torch.load(running, weights_only=True)["global_step"] == 2 and not lock.exists(), "released at the end"


def test_a_failed_fit_releases_the_lock(fashion_mnist_dir, tmp_path, monkeypatch):
    def broken_step(*args, **kwargs):
        raise RuntimeError("a bug in the training step")

    monkeypatch.setattr(ClassificationTask, "training_step", broken_step)
    with pytest.raises(RuntimeError, match="a bug in the training step"):
        main(fit_args(fashion_mnist_dir, tmp_path / "run"))
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# --- bad checkpoint files ----------------------------------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def bad_files(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad file, with the words its error must hold."""
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch: 3\n")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, pickled)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "not-a-checkpoint": (text, "not a PyTorch checkpoint"),
        "runs-code": (pickled, "would run code"),
        "truncated": (truncated, "truncated checkpoint"),
    }


@pytest.mark.parametrize("kind", ["not-a-checkpoint", "runs-code", "truncated"])
def test_bad_ckpt_path_and_pretrained_files_get_one_line_errors(kind, finished_run, fashion_mnist_dir, tmp_path):
    path, words = bad_files(tmp_path, finished_run / "checkpoints" / "last.ckpt")[kind]
    other = tmp_path / "other"
    for option, name in (
        (f"--ckpt_path={path}", "--ckpt_path"),
        (f"--model.init_args.pretrained={path}", "pretrained"),
    ):
        with pytest.raises(CheckpointFileError) as error:
            main(fit_args(fashion_mnist_dir, other, option))
        message = str(error.value)
        assert name in message and str(path) in message and words in message and "\n" not in message
        assert "weights_only=False" not in message


def test_checkpoint_of_another_task_or_model_is_named(finished_run, fashion_mnist_dir, tmp_path):
    good = finished_run / "checkpoints" / "last.ckpt"
    detection = torch.load(good, weights_only=True)
    detection["hyper_parameters"]["_class_path"] = "swinlab.tasks.DetectionTask"
    torch.save(detection, tmp_path / "detection.ckpt")
    with pytest.raises(
        CheckpointFileError,
        match=r"detection\.ckpt: a checkpoint of swinlab.tasks.DetectionTask .* model is swinlab.tasks.Classification",
    ):
        main(fit_args(fashion_mnist_dir, tmp_path / "a", f"--ckpt_path={tmp_path / 'detection.ckpt'}"))
    # A state dict of something else given as pretrained.
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, tmp_path / "other_model.pth")
    with pytest.raises(CheckpointFileError, match=r"other_model\.pth: holds 0 of the \d+ weights of backbone swin_t"):
        main(
            fit_args(fashion_mnist_dir, tmp_path / "c", f"--model.init_args.pretrained={tmp_path / 'other_model.pth'}")
        )


def test_command_line_prints_one_line_and_exits_2(finished_run, fashion_mnist_dir, tmp_path, monkeypatch, capsys):
    """``python -m swinlab`` (its entry point, in this process): one line and status 2; the traceback on request."""
    path, _ = bad_files(tmp_path, finished_run / "checkpoints" / "last.ckpt")["truncated"]
    monkeypatch.setattr(
        sys, "argv", ["swinlab", *fit_args(fashion_mnist_dir, tmp_path / "other", f"--ckpt_path={path}")]
    )
    monkeypatch.delenv("SWINLAB_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        command_line()
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"swinlab: error: --ckpt_path {path}: truncated checkpoint")
    assert line.endswith("(SWINLAB_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("SWINLAB_DEBUG", "1")
    with pytest.raises(CheckpointFileError, match="truncated checkpoint"):
        command_line()


# --- unknown config keys -----------------------------------------------------------------------------------------


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    base = ["fit", "--config", str(QUICKSTART)]
    cases = {
        "--model.init_args.backbon=swin_t": "`model.init_args.backbon` .* mean `model.init_args.backbone`",
        "--trainer.max_epoch=3": "unknown config key `trainer.max_epoch` .* did you mean `trainer.max_epochs`",
        "--data.init_args.batch_sise=3": "did you mean `data.init_args.batch_size`",
        "--model.init_args.optimizer.init_args.lrr=1": "did you mean `model.init_args.optimizer.init_args.lr`",
        '--model.init_args.backbone_kwarg={"window_size": 4}': "`model.init_args.backbone_kwarg` of swinlab.tasks."
        "ClassificationTask .* did you mean `model.init_args.backbone_kwargs`",
        # Nothing close: no guess (``model.init_args.compile`` shares the prefix, not the name), where to look.
        "--model.init_args.no_such_option=1": r"`model.init_args.no_such_option` of swinlab.tasks.ClassificationTask "
        r"\(command line or --config file\); --model.help swinlab.tasks.ClassificationTask lists its keys$",
    }
    for flag, words in cases.items():
        with pytest.raises(ConfigError, match=words):
            main([*base, flag])
    override = tmp_path / "typo.yaml"
    for config, words in (
        ({"model": {"init_args": {"backbon": "swin_t"}}}, "did you mean `model.init_args.backbone`"),
        ({"trainer": {"max_epoch": 3}}, "did you mean `trainer.max_epochs`"),
    ):
        override.write_text(yaml.safe_dump(config))
        with pytest.raises(ConfigError, match=words):
            main([*base, "--config", str(override)])


# --- I/O faults while saving -------------------------------------------------------------------------------------


def test_disk_full_while_saving_keeps_last_ckpt_and_stops_naming_the_folder(
    finished_run, fashion_mnist_dir, monkeypatch
):
    """The disk fills up while the checkpoint is written: as on a real full file system, the file's ``write`` fails
    partway with ENOSPC and ``torch.save`` turns that into a RuntimeError ("unexpected pos ...")."""
    last = finished_run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    open_fd = os.fdopen

    class FullDisk(io.BufferedWriter):
        room = 4096

        def write(self, data) -> int:
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def fill_up(fd, mode="r", *args, **kwargs):
        return FullDisk(open_fd(fd, mode, *args, buffering=0, **kwargs)) if mode == "wb" else open_fd(fd, mode)

    monkeypatch.setattr(os, "fdopen", fill_up)
    args = fit_args(fashion_mnist_dir, finished_run, "--ckpt_path=last", "--trainer.max_epochs=2")
    with pytest.raises(CheckpointSaveError, match=rf"in {finished_run / 'checkpoints'}: No space left on device"):
        main(args)
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".last")) == []


def test_read_only_folder_keeps_last_ckpt_and_stops_naming_the_folder(finished_run, fashion_mnist_dir, monkeypatch):
    folder = finished_run / "checkpoints"
    before = (folder / "last.ckpt").read_bytes()
    if os.geteuid() == 0:  # root writes into a 0o555 folder: make the file system say what a read-only one says

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointSaveError, match=rf"in {folder}: (Permission denied|Read-only file system)"):
            main(fit_args(fashion_mnist_dir, finished_run, "--ckpt_path=last", "--trainer.max_epochs=2"))
    finally:
        folder.chmod(0o755)
    assert (folder / "last.ckpt").read_bytes() == before


def test_a_read_only_run_folder_is_named_before_anything_runs(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(RunFolderError, match=rf"cannot write in the run folder {tmp_path}: Read-only file system; "):
        RunFolderLock(tmp_path).acquire()


# --- a dead rank -------------------------------------------------------------------------------------------------


class KillRankAtStep(Callback):
    """SIGKILLs the process of DDP rank ``rank`` at the end of optimizer step ``step``, before that step's saves."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def ddp_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    """2 CPU processes (gloo), 2 epochs of 4 steps (32 training images, 4 per process and step), last.ckpt every 3
    steps, no random augmentation; the run is seeded, so two runs draw the same data order and dropout."""
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        "--test_after_fit=false",
        "--checkpoint_every_n_steps=3",
        "--checkpoint.monitor=null",
        "--collective_timeout=30",
        f"--model.init_args.backbone_kwargs={json.dumps({**TINY_SWIN, 'in_chans': 1})}",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.augment=false",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
        *extra,
    ]


def test_a_killed_rank_stops_the_other_and_both_resume_to_the_uninterrupted_weights(fashion_mnist_dir, tmp_path):
    """Rank 1 is SIGKILLed after step 7; rank 0 fails in its next all-reduce (gloo sees the closed connection, else
    after --collective_timeout) and exits; ``--ckpt_path last`` resumes both from the step-6 save."""
    uninterrupted = run_cli(ddp_args(fashion_mnist_dir, tmp_path / "uninterrupted"), tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed_root = tmp_path / "killed"
    kill = json.dumps({"class_path": f"{__name__}.KillRankAtStep", "init_args": {"rank": 1, "step": 7}})
    started = time.monotonic()
    killed = run_cli(ddp_args(fashion_mnist_dir, killed_root, f"--trainer.callbacks+={kill}"), tmp_path)
    took = time.monotonic() - started  # with the start-up of both processes; a hang would last 600 s by default
    assert killed.returncode == 2 and took < 180, (killed.returncode, took, killed.stderr[-3000:])
    last_line = killed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("swinlab: error: another process of this DDP run died, or did not answer within "), (
        killed.stderr[-3000:]
    )
    saved = torch.load(killed_root / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6 and saved["epoch"] == 1  # the periodic save of step 6, mid-epoch 1
    assert not (killed_root / LOCK_NAME).exists(), "rank 0 stopped on the error and released the run folder"

    resumed = run_cli(ddp_args(fashion_mnist_dir, killed_root, "--ckpt_path=last"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt", weights_only=True)
    final = torch.load(killed_root / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == expected["global_step"] == 8
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_the_collective_timeout_reaches_the_ddp_strategy(fashion_mnist_dir, tmp_path):
    cli = main(ddp_args(fashion_mnist_dir, tmp_path, "--collective_timeout=7")[1:], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.strategy._timeout == timedelta(seconds=7)
