"""The reliability callbacks that ``swinlab.cli`` adds to every run: resumable loader position, save on
SIGTERM/pre-emption, non-finite losses. (Prediction writers live in ``swinlab.prediction``.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from swinlab import lightning_compat
from swinlab.data.resumable import ResumableDataLoader


def _train_loaders(trainer: Trainer) -> list[Any]:
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _rng_states() -> dict[str, Any]:
    """The global random generators (torch CPU and CUDA, numpy, Python), as values ``weights_only`` loads."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class ResumePosition(Callback):
    """Saves and restores what a Lightning checkpoint lacks for an exact mid-epoch resume: the position of each
    ``ResumableDataLoader`` within its epoch and the global random generators (dropout, stochastic depth, Mixup).

    After every batch it records how many batches of the epoch were trained on; it runs before ``ModelCheckpoint``
    (Lightning calls checkpoint callbacks last), so a checkpoint written at the end of batch ``i`` says ``i + 1``.
    Lightning hands the saved loader state back only when it builds the loader after restoring the checkpoint,
    but a task that reads ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (every ``SwinTask``)
    makes it build the loader, and draw the first batch, before. So at ``on_train_start`` the pending state (or,
    after an end-of-epoch checkpoint, the restored epoch) is applied, the batch iterator restarted, and then the
    generators restored. Random augmentation in the main process (``num_workers=0``) of the first resumed batch,
    and in the workers for the rest of the resumed epoch, is drawn afresh.
    """

    def __init__(self) -> None:
        self._restored_rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_rng = state_dict.get("rng")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = [loader for loader in _train_loaders(trainer) if isinstance(loader, ResumableDataLoader)]
        fit_loop = trainer.fit_loop
        fetcher = lightning_compat.train_data_fetcher(fit_loop)
        if loaders and fetcher is not None:
            if fit_loop.restarting and lightning_compat.pending_loader_states(fit_loop):
                # Mid-epoch: the uninterrupted run made its iterator before the checkpoint, so make it first.
                lightning_compat.load_pending_loader_states(fit_loop)
                iter(fetcher)  # drop the batch drawn at the old position
                self._restore_rng()
                return
            # After an end-of-epoch checkpoint the loader was built before the epoch counter was restored; the
            # uninterrupted run made the new epoch's iterator after the checkpoint, so restore the generators first.
            epochs = {id(loader): getattr(loader.sampler, "epoch", trainer.current_epoch) for loader in loaders}
            stale = [loader for loader in loaders if epochs[id(loader)] != trainer.current_epoch]
            if stale:
                for loader in stale:
                    loader.sampler.set_epoch(trainer.current_epoch)
                self._restore_rng()
                iter(fetcher)
                return
        self._restore_rng()

    def _restore_rng(self) -> None:
        if self._restored_rng is not None:
            _set_rng_states(self._restored_rng)
            self._restored_rng = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for loader in _train_loaders(trainer):
            if isinstance(loader, ResumableDataLoader):
                loader.batches_consumed = batch_idx + 1


def last_checkpoint_path(trainer: Trainer) -> Path:
    """Where ``--ckpt_path last`` looks: ``last.ckpt`` in the ``ModelCheckpoint`` folder."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class PreemptionCheckpoint(Callback):
    """On SIGTERM (and SLURM's requeue signal), finish the current batch, save ``last.ckpt``, and exit cleanly.

    Lightning's own handler only sets ``trainer.received_sigterm``; its loop then raises ``SIGTERMException``
    (a ``SystemExit`` with status 0) after the batch. This callback saves the full training state at that point,
    so ``--ckpt_path last`` resumes from the next batch. On SLURM the requeue signal (``SIGUSR1``, ask for it with
    ``#SBATCH --signal=SIGUSR1@120``) is turned into the same stop, then the job is requeued with ``scontrol``;
    it replaces Lightning's requeue handler, which saves from inside the signal handler, mid-step.
    """

    def __init__(self) -> None:
        self.requeue = False
        self._previous_handler: Any = None
        self._signal: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        environment = lightning_compat.cluster_environment(trainer)
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        self._signal = environment.requeue_signal or signal.SIGUSR1
        self._previous_handler = signal.signal(self._signal, self._on_requeue_signal)

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        rank_zero_info(f"Received SLURM requeue signal {signum}: saving after this batch, then requeueing")
        self.requeue = True
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path stops all ranks after the batch

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous_handler)
            self._signal = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"SIGTERM: saved {path} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            "resume with --ckpt_path last"
        )
        if self.requeue and trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            if job:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                rank_zero_info(f"scontrol requeue {job}: {'done' if done.returncode == 0 else done.stderr.strip()}")


class NonFiniteLossError(RuntimeError):
    """Training produced too many non-finite losses in a row."""


class NonFiniteLossGuard(Callback):
    """Skips the optimizer step of a batch whose loss (or, without a gradient scaler, gradient) is NaN or inf.

    The skipped step leaves weights and optimizer state untouched (all gradients are dropped before the step), is
    logged as ``train/skipped_steps`` and warned about; after ``max_consecutive`` skipped steps in a row training
    stops with ``NonFiniteLossError``, so the checkpoints on disk keep the last good weights. Under DDP the decision
    is taken jointly by all ranks. With fp16 mixed precision the ``GradScaler`` handles inf gradients itself
    (it skips the step and lowers the scale), so only the loss is checked then.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"non_finite.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0
        self._loss_finite = True
        self._loss = float("nan")

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        detached = loss.detach()
        self._loss_finite = bool(torch.isfinite(detached).all())
        self._loss = float(detached.float().mean()) if not self._loss_finite else 0.0

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = self._loss_finite
        if finite and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in params if p.grad is not None]
            finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.consecutive = 0
            return
        for param in params:
            param.grad = None  # optimizers skip parameters without a gradient: no update, no state change
        self.consecutive += 1
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped), reduce_fx="max")
        what = f"loss {self._loss}" if not self._loss_finite else "non-finite gradients"
        rank_zero_warn(
            f"{what} at epoch {trainer.current_epoch}, step {trainer.global_step}: optimizer step skipped "
            f"({self.consecutive} in a row, {self.skipped} in total; training stops after {self.max_consecutive} "
            "in a row)"
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row (last at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}); training stopped. {last_checkpoint_path(trainer)} holds the last good "
                "weights. Lower the lr or raise the warm-up, set trainer.gradient_clip_val, use precision "
                "bf16-mixed or 32-true instead of 16-mixed, or check the data; then resume with --ckpt_path last."
            )
