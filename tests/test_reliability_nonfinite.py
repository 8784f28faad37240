"""A non-finite loss skips its step (weights and optimizer untouched, logged); N in a row stop training with the
last good checkpoint intact."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from swinlab.callbacks import NonFiniteLossError, NonFiniteLossGuard
from swinlab.checkpointing import AtomicCheckpointIO
from swinlab.data import FashionMNISTDataModule
from swinlab.tasks import ClassificationTask


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
