"""Every private Lightning attribute swinlab uses still exists; if an upgrade removes one, the error names it."""

import pytest
from lightning.fabric.plugins.environments import ClusterEnvironment, LightningEnvironment
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from swinlab import lightning_compat


@pytest.fixture
def trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def test_every_private_attribute_exists(trainer: Trainer) -> None:
    fit_loop = trainer.fit_loop
    assert lightning_compat.train_data_fetcher(fit_loop) is None  # built when fitting starts
    assert lightning_compat.pending_loader_states(fit_loop) == []
    lightning_compat.load_pending_loader_states(fit_loop)  # nothing pending: a no-op
    assert isinstance(lightning_compat.cluster_environment(trainer), ClusterEnvironment)


def test_private_attributes_resolve_on_a_live_run() -> None:
    """During fit the fetcher exists and the environment is the one Lightning picked."""
    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: BoringModel) -> None:
            seen["fetcher"] = lightning_compat.train_data_fetcher(trainer.fit_loop)

    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[Probe()])
    trainer.fit(BoringModel())
    assert iter(seen["fetcher"]) is seen["fetcher"]
    assert isinstance(lightning_compat.cluster_environment(trainer), LightningEnvironment)


@pytest.mark.parametrize(
    ("remove", "call", "name"),
    [
        (
            lambda t: delattr(t.fit_loop, "_data_fetcher"),
            lambda t: lightning_compat.train_data_fetcher(t.fit_loop),
            "_FitLoop._data_fetcher",
        ),
        (
            lambda t: delattr(t.fit_loop, "_combined_loader_states_to_load"),
            lambda t: lightning_compat.pending_loader_states(t.fit_loop),
            "_FitLoop._combined_loader_states_to_load",
        ),
        (
            lambda t: delattr(t, "_accelerator_connector"),
            lambda t: lightning_compat.cluster_environment(t),
            "Trainer._accelerator_connector",
        ),
    ],
    ids=["data-fetcher", "loader-states", "accelerator-connector"],
)
def test_a_removed_attribute_is_named(trainer: Trainer, remove, call, name) -> None:
    remove(trainer)
    with pytest.raises(lightning_compat.LightningCompatError, match=rf"has no {name}, which swinlab uses"):
        call(trainer)


def test_a_removed_method_is_named(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(type(trainer.fit_loop), "_load_combined_loader_states")
    with pytest.raises(lightning_compat.LightningCompatError, match=r"_FitLoop\._load_combined_loader_states"):
        lightning_compat.load_pending_loader_states(trainer.fit_loop)
