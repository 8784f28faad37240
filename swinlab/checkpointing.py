"""Checkpoint files that survive a kill while saving, and that load without unpickling code."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from swinlab.models.checkpoint_file import first_line, read_checkpoint_file

# Not "last..." and not ".ckpt": Lightning's ``ckpt_path="last"`` search must never pick a half-written file.
_PARTIAL_SUFFIX = ".partial"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint_safely(path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
    """``read_checkpoint_file`` (``weights_only=True``) unless the caller explicitly passes ``weights_only=False``."""
    if weights_only is False:
        return torch.load(path, map_location=map_location, weights_only=False)
    return read_checkpoint_file(path, "checkpoint", map_location)


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: itself, or the one raised while ``torch.save`` wrote to the file (torch then
    raises a ``RuntimeError`` "unexpected pos ..." whose context is the disk's ``ENOSPC``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class CheckpointSaveError(OSError):
    """A checkpoint save that failed (disk full, read-only folder); the previous checkpoints are left intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local saves and ``weights_only=True`` loads.

    A save writes a temporary file in the target folder, fsyncs it, and renames it over the target
    (``os.replace``), so a kill at any moment leaves either the previous or the new complete checkpoint. Lightning's
    own save goes through a temporary file in the system temp folder and ``shutil.move``, which copies (and can be
    cut short) when that folder is on another file system. Remote paths (``s3://`` ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}; use a "
                "custom CheckpointIO for them"
            )
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(str(path).removeprefix("file://"))
        partial = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(partial, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
            os.replace(partial, target)
        except BaseException as err:
            if partial is not None:
                Path(partial).unlink(missing_ok=True)
            cause = _os_error(err)
            if cause is not None:
                reason = os.strerror(cause.errno) if cause.errno else first_line(cause)
                raise CheckpointSaveError(
                    f"cannot save checkpoint {target.name} in {target.parent}: {reason}; the checkpoints already "
                    "there are intact. Free space or make the folder writable, then resume with --ckpt_path last"
                ) from err
            raise
        _fsync_dir(target.parent)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint file {path} does not exist; check --ckpt_path")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().load_checkpoint(
                path, map_location, weights_only=True if weights_only is None else weights_only
            )
        return load_checkpoint_safely(str(path).removeprefix("file://"), map_location, weights_only)


class RunFolderError(RuntimeError):
    """A fit that would overwrite or share a run folder; the message names the folder and the ways on."""


# Held by a running fit in its run folder (``trainer.default_root_dir``, outside ``checkpoints/``, where Lightning
# warns about any other file); holds {"pid", "host", "started"}.
LOCK_NAME = ".swinlab-run.lock"
# A lock file without readable content younger than this may be one another run is writing right now.
_LOCK_WRITE_GRACE_S = 10.0


def check_fresh_run_folder(folder: str | Path, overwrite: bool) -> None:
    """Refuse a fresh fit into ``folder`` when it already holds checkpoints, unless ``overwrite`` (which deletes
    them, so the folder then holds only the new run's)."""
    folder = Path(folder)
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not found:
        return
    if overwrite:
        for path in found:
            path.unlink()
        rank_zero_warn(f"--overwrite true: deleted the {len(found)} checkpoints of the previous run in {folder}")
        return
    names = ", ".join(path.name for path in found[:3]) + (" ..." if len(found) > 3 else "")
    raise RunFolderError(
        f"{folder} already holds a run's checkpoints ({names}) and a new fit would overwrite them: resume that run "
        "with --ckpt_path last, start a new run in another folder with --trainer.default_root_dir=OTHER_FOLDER, or "
        "replace it with --overwrite true"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunFolderLock(Callback):
    """An exclusive lock on a run folder: ``folder/LOCK_NAME`` created with ``O_EXCL``, naming pid and host.

    A lock whose process is gone (same host, pid not alive, or this very process) is stale and taken over; a lock
    from another host cannot be checked and is respected. As a callback it is released when the trainer stops on an
    exception (``on_exception``), so a failed run leaves no lock behind.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = self.made_folder = False

    def acquire(self) -> None:
        self.made_folder = not self.path.parent.exists()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as err:  # a read-only or full file system: the run could not save anything there either
                raise RunFolderError(
                    f"cannot write in the run folder {self.path.parent}: {os.strerror(err.errno)}; make it writable "
                    "or pass another --trainer.default_root_dir"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunFolderError(f"could not take the lock {self.path}; another run keeps creating it")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - self.path.stat().st_mtime < _LOCK_WRITE_GRACE_S:
                raise RunFolderError(f"{self.path.parent} is being locked by another run right now") from None
            holder, pid, host = {}, -1, socket.gethostname()  # never written completely: a dead run's
        same_host = host == socket.gethostname()
        if same_host and (pid == os.getpid() or not _alive(pid)):
            rank_zero_warn(f"taking over the stale lock {self.path} of run pid {pid} on {host}, which is gone")
            self.path.unlink(missing_ok=True)
            return
        raise RunFolderError(
            f"{self.path.parent} is in use by another run (pid {pid} on {host}, started {holder.get('started')}); "
            f"wait for it, or use another --trainer.default_root_dir. If that run is gone, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.made_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run that failed before saving leaves no empty folder behind

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.release()
