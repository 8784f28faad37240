"""The loaders every data module gets from BaseDataModule, with each family's batch sizes and collation."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from swinlab.data import ADE20KDataModule, COCODataModule, FashionMNISTDataModule
from swinlab.data.bad_samples import SkipCountingLoader
from swinlab.data.base import BaseDataModule, collate_as_lists
from swinlab.data.resumable import ResumableDataLoader


def fill(module: BaseDataModule, count: int = 5) -> BaseDataModule:
    dataset = TensorDataset(torch.arange(count))
    module.train_set = module.val_set = module.test_set = module.predict_set = dataset
    return module


def test_classification_loaders(fashion_mnist_dir) -> None:
    module = fill(FashionMNISTDataModule(str(fashion_mnist_dir), batch_size=2, num_workers=0))
    train = module.train_dataloader()
    assert isinstance(train, ResumableDataLoader) and train.drop_last and len(train) == 2
    for loader in (module.val_dataloader(), module.test_dataloader(), module.predict_dataloader()):
        assert type(loader) is SkipCountingLoader and loader.batch_size == 2
        assert not loader.drop_last and len(loader) == 3
        assert [batch[0].tolist() for batch in loader] == [[0, 1], [2, 3], [4]], "evaluation keeps the order"
    assert not module.persistent_workers, "no persistent workers without workers"


def test_coco_keeps_the_last_training_batch_and_collates_lists(tmp_path) -> None:
    (tmp_path / "annotations").mkdir()
    categories = {"categories": [{"id": 3, "name": "a"}]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(categories))
    module = fill(COCODataModule(str(tmp_path), batch_size=2, eval_batch_size=4, num_workers=2))
    train, val = module.train_dataloader(), module.val_dataloader()
    assert isinstance(train, ResumableDataLoader) and not train.drop_last and len(train) == 3
    assert train.collate_fn.collate is collate_as_lists and val.collate_fn.collate is collate_as_lists
    assert val.batch_size == 4 and val.persistent_workers


def test_ade20k_evaluation_batches_are_lists() -> None:
    module = fill(ADE20KDataModule("unused", batch_size=2, eval_batch_size=3, num_workers=0))
    train, val = module.train_dataloader(), module.val_dataloader()
    assert train.drop_last and train.collate_fn.collate is not collate_as_lists
    assert val.collate_fn.collate is collate_as_lists and val.batch_size == 3
    assert module.datasets.keys() == {"train", "val", "test", "predict"}


def test_bad_loader_settings_and_missing_sets_are_named() -> None:
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1, got -1"):
        ADE20KDataModule("unused", eval_batch_size=-1)
    with pytest.raises(ValueError, match="on_bad_sample must be 'skip' or 'raise'"):
        ADE20KDataModule("unused", on_bad_sample="ignore")
    with pytest.raises(RuntimeError, match="ADE20KDataModule has no validation set; setup"):
        ADE20KDataModule("unused").val_dataloader()
