"""A non-finite loss skips its step (weights and optimizer untouched, logged); N in a row stop training with the
last good checkpoint intact.

A run killed mid-epoch (SIGKILL or SIGTERM) and resumed with ``--ckpt_path last`` ends with the same weights
as an uninterrupted run; checkpoints are written atomically.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, model_checkpoint
from torch.utils.data import DataLoader

from swinlab.callbacks import NonFiniteLossError, NonFiniteLossGuard, PreemptionCheckpoint
from swinlab.checkpointing import AtomicCheckpointIO
from swinlab.cli import main
from swinlab.data import FashionMNISTDataModule
from swinlab.tasks import ClassificationTask
from tests.helpers import REPO, TINY_SWIN, labelled_loader, write_fashion_mnist


class NaNLossAt(ClassificationTask):
    """The loss becomes NaN at the given (0-based) optimizer steps."""

    def __init__(self, nan_steps: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_steps = nan_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss


class WeightsAfterEachBatch(Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone())


def test_nan_steps_are_skipped_and_a_run_of_them_stops_training(fashion_mnist_dir, tiny_swin, tmp_path):
    data = FashionMNISTDataModule(str(fashion_mnist_dir), val_size=8, batch_size=4, augment=False, num_workers=0)
    # With an EMA: its weights (parameters of the module, so in WeightsAfterEachBatch) must not move on skipped steps.
    model = NaNLossAt({1, 2, 4, 5, 6}, backbone_kwargs={**tiny_swin, "in_chans": 1}, num_classes=10, ema_decay=0.5)
    guard, weights = NonFiniteLossGuard(max_consecutive=3), WeightsAfterEachBatch()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=20,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        callbacks=[guard, weights, checkpoint],
        plugins=[AtomicCheckpointIO()],
    )
    with (
        pytest.warns(UserWarning, match=r"loss nan at epoch 0, step 1: optimizer step skipped \(1 in a row"),
        pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row .* holds the last good weights"),
    ):
        trainer.fit(model, data)

    # Batches 0..5 ended (batch 6 raised): steps 1, 2 and 4, 5 left the weights as they were.
    assert len(weights.weights) == 6 and guard.skipped == 5
    assert not torch.equal(weights.weights[0], weights.weights[3])
    assert torch.equal(weights.weights[0], weights.weights[1]) and torch.equal(weights.weights[1], weights.weights[2])
    assert torch.equal(weights.weights[3], weights.weights[4]) and torch.equal(weights.weights[4], weights.weights[5])
    assert trainer.callback_metrics["train/skipped_steps"] == 4  # logged as of the last completed batch

    saved = AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    saved_weights = torch.cat([value.flatten() for key, value in saved["state_dict"].items() if "backbone." in key])
    assert torch.isfinite(saved_weights).all()
    model_weights = {key: value for key, value in model.state_dict().items() if "backbone." in key}
    for key, value in model_weights.items():
        assert torch.equal(saved["state_dict"][key], value), key


QUICKSTART = REPO / "configs" / "classification" / "quickstart_fashion_mnist.yaml"
STEPS_PER_EPOCH = 8  # 40 training images - 8 held out, batch 4


class SignalAtStep(Callback):
    """Test helper: sends ``signum`` to its own process at the end of optimizer step ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def run_args(fashion_mnist_dir: Path, tiny_swin: dict, root: Path) -> list[str]:
    """A tiny run without random augmentation (stochastic depth stays on: swin_t's drop_path_rate 0.2), 2 epochs
    of 8 steps, last.ckpt every 3 steps."""
    backbone = {**tiny_swin, "in_chans": 1}
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.num_sanity_val_steps=0",
        "--test_after_fit=false",
        "--checkpoint_every_n_steps=3",
        "--checkpoint.monitor=null",
        f"--model.init_args.backbone_kwargs={json.dumps(backbone)}",
        f"--data.init_args.data_dir={fashion_mnist_dir}",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.augment=false",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
    ]


def run_until_signal(args: list[str], step: int, signum: int, cwd: Path) -> subprocess.CompletedProcess:
    callback = {"class_path": f"{SignalAtStep.__module__}.SignalAtStep", "init_args": {"step": step, "signum": signum}}
    # As many threads as this process, so the float sums (and so the weights) match bit for bit.
    threads = str(torch.get_num_threads())
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # the subprocess imports SignalAtStep from this module (tests is a package)
        "OMP_NUM_THREADS": threads,
    }
    return subprocess.run(
        [sys.executable, "-m", "swinlab", *args, f"--trainer.callbacks+={json.dumps(callback)}"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def last_checkpoint(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Fashion-MNIST idx files with 40 training images (as the ``fashion_mnist_dir`` fixture), shared by the module."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    main(run_args(data_dir, TINY_SWIN, root))
    return last_checkpoint(root)


@pytest.mark.parametrize(
    ("signum", "step", "saved_step", "returncode"),
    [(signal.SIGKILL, 7, 6, -signal.SIGKILL), (signal.SIGKILL, 9, 8, -signal.SIGKILL), (signal.SIGTERM, 5, 5, 0)],
    ids=["sigkill-mid-epoch", "sigkill-after-epoch-end", "sigterm"],
)
def test_killed_run_resumes_to_the_same_weights(
    signum, step, saved_step, returncode, uninterrupted, data_dir, tmp_path
):
    root = tmp_path / "killed"
    args = run_args(data_dir, TINY_SWIN, root)
    done = run_until_signal(args, step, signum, tmp_path)
    assert done.returncode == returncode, done.stderr[-3000:]
    saved = last_checkpoint(root)
    # SIGKILL: the periodic save of step 6, or the end-of-epoch save of step 8; SIGTERM: a save after the batch
    # that was running.
    assert saved["global_step"] == saved_step and saved["epoch"] == 0
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_consumed": saved_step}]

    main([*args, "--ckpt_path=last"])
    resumed = last_checkpoint(root)
    assert resumed["global_step"] == uninterrupted["global_step"] == 2 * STEPS_PER_EPOCH
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert resumed["lr_schedulers"][0]["last_epoch"] == uninterrupted["lr_schedulers"][0]["last_epoch"]
    first_moment = [state["exp_avg"] for state in uninterrupted["optimizer_states"][0]["state"].values()]
    for value, resumed_value in zip(
        first_moment, (s["exp_avg"] for s in resumed["optimizer_states"][0]["state"].values())
    ):
        torch.testing.assert_close(resumed_value, value, rtol=0, atol=0)


def test_atomic_save_keeps_the_previous_checkpoint_when_interrupted(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def killed_while_writing(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "the partial file is removed"


def grey_batches(count: int = 12) -> DataLoader:
    images = torch.rand(count, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    return labelled_loader(images, torch.arange(count) % 10, batch_size=2)


@pytest.mark.parametrize("array", [False, True], ids=["job", "array-job"])
def test_slurm_requeue_signal_saves_last_and_requeues_the_job(tmp_path, monkeypatch, array):
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}
    if array:
        slurm |= {"SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "7"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    task = ClassificationTask(backbone_kwargs={**TINY_SWIN, "in_chans": 1}, num_classes=10)
    preemption = PreemptionCheckpoint()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        plugins=[SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)],
        callbacks=[preemption, SignalAtStep(2, signal.SIGUSR1), ModelCheckpoint(dirpath=tmp_path, save_top_k=0)],
    )
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SystemExit) as stopped:
            trainer.fit(task, grey_batches())
    finally:  # Lightning skips the callbacks' teardown on this exit, so the handler would outlive the test
        signal.signal(signal.SIGUSR1, previous)
    assert stopped.value.code in (0, None)
    assert preemption.requeue
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["epoch"] == 0, "saved after the batch the signal arrived in"
    assert commands == [["scontrol", "requeue", "4200_7" if array else "4242"]]


def test_sigterm_without_slurm_saves_last_and_does_not_requeue(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("no requeue outside SLURM"))
    task = ClassificationTask(backbone_kwargs={**TINY_SWIN, "in_chans": 1}, num_classes=10)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        callbacks=[PreemptionCheckpoint(), SignalAtStep(3, signal.SIGTERM)],
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    with pytest.raises(SystemExit):
        trainer.fit(task, grey_batches())
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3


class AdvanceClock(Callback):
    """Test helper: after each training batch, moves the fake clock ``CLOCK`` on by ``seconds`` (before the
    checkpoint callbacks, which Lightning runs last, read it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        CLOCK["now"] += self.seconds


CLOCK = {"now": 0.0}


@pytest.mark.parametrize(
    ("seconds_per_step", "saved_steps"),
    [(0.0, []), (59.0, [2, 4, 6]), (61.0, [1, 2, 3, 4, 5, 6, 7])],
    ids=["clock-stopped", "59s-per-step", "61s-per-step"],
)
def test_checkpoint_every_minutes_refreshes_last_mid_epoch(
    data_dir, tmp_path, monkeypatch, seconds_per_step, saved_steps
):
    """``--checkpoint_every_minutes=1``: last.ckpt is saved after the first batch that ends a minute or more after
    the last save (59 s per step: every second step, 61 s: every step), inside the epoch; with the clock stopped
    only the end-of-epoch save happens."""
    monkeypatch.setitem(CLOCK, "now", 0.0)
    monkeypatch.setattr(model_checkpoint, "time", SimpleNamespace(monotonic=lambda: CLOCK["now"]))
    saves = []
    original_save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        saves.append((Path(path).name, checkpoint["global_step"]))
        original_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    args = [arg for arg in run_args(data_dir, TINY_SWIN, tmp_path) if not arg.startswith("--checkpoint_every_n_steps")]
    args = [arg.replace("max_epochs=2", "max_epochs=1") for arg in args] + ["--checkpoint_every_minutes=1"]
    clock = {"class_path": f"{__name__}.AdvanceClock", "init_args": {"seconds": seconds_per_step}}
    main([*args, f"--trainer.callbacks+={json.dumps(clock)}"])

    last_saves = [step for name, step in saves if name == "last.ckpt"]
    assert last_saves[-1] == STEPS_PER_EPOCH
    assert [step for step in last_saves if 0 < step < STEPS_PER_EPOCH] == saved_steps, last_saves


class NaNGradientAt(ClassificationTask):
    """A finite loss whose gradient of one weight is NaN at the given optimizer steps."""

    def __init__(self, nan_steps: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_steps = nan_steps

    def on_after_backward(self) -> None:
        if self.global_step in self.nan_steps:
            self.backbone.head.weight.grad[0, 0] = float("nan")


def test_a_finite_loss_with_a_nan_gradient_skips_its_step(tmp_path):
    task = NaNGradientAt({1}, backbone_kwargs={**TINY_SWIN, "in_chans": 1}, num_classes=10)
    guard, weights = NonFiniteLossGuard(max_consecutive=3), WeightsAfterEachBatch()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[guard, weights],
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match=r"non-finite gradients at epoch 0, step 1: optimizer step skipped"):
        trainer.fit(task, grey_batches())
    assert guard.skipped == 1 and guard.consecutive == 0  # step 2 was finite again
    assert len(weights.weights) == 3
    assert torch.equal(weights.weights[0], weights.weights[1]), "the skipped step left every weight as it was"
    assert not torch.equal(weights.weights[1], weights.weights[2]), "the next step trained"
    assert torch.isfinite(weights.weights[2]).all()
