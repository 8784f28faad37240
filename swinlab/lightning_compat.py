"""Every use swinlab makes of Lightning's private API, one named function per private attribute.

Lightning may rename private attributes in any release (pyproject bounds lightning < 2.7; tested with 2.6).
Each function says why the public API is not enough. A missing attribute raises ``LightningCompatError`` naming
it, and ``tests/test_lightning_compat.py`` calls every function on real Lightning objects, so an upgrade that
removes one fails there, not in the middle of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning

if TYPE_CHECKING:  # private classes: named for the type checker only, so a rename cannot break the import
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch import Trainer
    from lightning.pytorch.loops import _FitLoop
    from lightning.pytorch.loops.fetchers import _DataFetcher


class LightningCompatError(AttributeError):
    """This Lightning version lacks a private attribute swinlab relies on."""


def _private(owner: Any, name: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise LightningCompatError(
            f"lightning {lightning.__version__} has no {type(owner).__name__}.{name}, which swinlab uses (see "
            "swinlab/lightning_compat.py; tested with lightning 2.6). Install lightning>=2.6,<2.7 or update that "
            "module for this version."
        ) from None


def train_data_fetcher(fit_loop: _FitLoop) -> _DataFetcher | None:
    """The fetcher that draws training batches (``_FitLoop._data_fetcher``; ``None`` before the loader is built).

    ``ResumePosition`` must restart its iterator (``iter(fetcher)``) after moving a resumable loader to the
    restored position: Lightning builds the iterator, and draws a batch, before ``on_train_start``, and has no
    public way to restart it.
    """
    return _private(fit_loop, "_data_fetcher")


def pending_loader_states(fit_loop: _FitLoop) -> list[dict[str, Any]]:
    """Loader states read from the checkpoint and not yet applied (``_FitLoop._combined_loader_states_to_load``).

    Lightning applies them only when it builds the loader after restoring the checkpoint; a task that reads
    ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` makes it build the loader earlier, and
    nothing public tells whether the restored position is still pending.
    """
    return _private(fit_loop, "_combined_loader_states_to_load")


def load_pending_loader_states(fit_loop: _FitLoop) -> None:
    """Apply the pending loader states to the training loaders (``_FitLoop._load_combined_loader_states()``).

    The same step Lightning takes when it builds the loader after the checkpoint; there is no public call for it.
    """
    _private(fit_loop, "_load_combined_loader_states")()


def cluster_environment(trainer: Trainer) -> ClusterEnvironment:
    """The run's cluster environment (``trainer._accelerator_connector.cluster_environment``).

    The public ``trainer.strategy.cluster_environment`` exists only on multi-process strategies; a one-GPU job on
    SLURM has a single-device strategy, but still needs its ``SLURMEnvironment`` to know whether to requeue.
    """
    return _private(_private(trainer, "_accelerator_connector"), "cluster_environment")
