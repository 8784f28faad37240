import csv
from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer

from swinlab.data import FashionMNISTDataModule, ImageNetDataModule
from swinlab.models import create_model
from swinlab.optim import WarmupLR
from swinlab.tasks import ClassificationTask

TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def grey_task(tiny_swin, **kwargs) -> ClassificationTask:
    return ClassificationTask(backbone="swin_t", backbone_kwargs={**tiny_swin, "in_chans": 1}, num_classes=10, **kwargs)


def fashion(fashion_mnist_dir, **kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(data_dir=str(fashion_mnist_dir), val_size=8, **{"batch_size": 4, **kwargs})


def test_forward_and_metrics(tiny_swin):
    task = grey_task(tiny_swin)
    assert task(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert set(task.val_metrics) == {"val/top1", "val/top5"} and set(task.test_metrics) == {"test/top1", "test/top5"}
    few = ClassificationTask(backbone_kwargs=tiny_swin, num_classes=3)
    assert set(few.val_metrics) == {"val/top1"}  # top-5 of 3 classes would always be 1


def test_lr_scales_with_global_batch(tiny_swin, fashion_mnist_dir):
    scheduler = partial(WarmupLR, warmup_epochs=1)
    task = grey_task(
        tiny_swin, optimizer=partial(torch.optim.AdamW, lr=1e-3), lr_scheduler=scheduler, lr_reference_batch=16
    )
    trainer = Trainer(max_steps=1, accumulate_grad_batches=2, limit_val_batches=0, **TRAINER)
    trainer.fit(task, datamodule=fashion(fashion_mnist_dir, batch_size=4))
    # global batch 4 x 1 process x 2 accumulation = 8 -> lr 1e-3 * 8 / 16
    assert [group["initial_lr"] for group in trainer.optimizers[0].param_groups] == pytest.approx([5e-4, 5e-4])


def test_no_weight_decay_on_norms_biases_and_position_tables(tiny_swin):
    task = grey_task(tiny_swin, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))
    names = {id(p): n for n, p in task.named_parameters()}
    optimizer = task.configure_optimizers()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            no_decay = param.ndim == 1 or "relative_position_bias_table" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_mixup_cutmix_and_ema(tiny_swin, fashion_mnist_dir):
    task = grey_task(tiny_swin, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.5)
    start = {k: v.clone() for k, v in task.ema.module.state_dict().items()}
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, **TRAINER)
    trainer.fit(task, datamodule=fashion(fashion_mnist_dir))
    assert task.eval_network is task.ema.module
    assert not any(p.requires_grad for p in task.ema.parameters())
    ema, trained = task.ema.module.state_dict(), task.backbone.state_dict()
    key = "head.weight"
    assert not torch.equal(ema[key], start[key]) and not torch.equal(ema[key], trained[key])
    assert "val/top1" in trainer.callback_metrics


def test_mixup_needs_an_even_batch(tiny_swin, fashion_mnist_dir):
    task = grey_task(tiny_swin, cutmix_alpha=1.0)
    with pytest.raises(ValueError, match="batch_size must be even, got 3"):
        Trainer(max_steps=1, **TRAINER).fit(task, datamodule=fashion(fashion_mnist_dir, batch_size=3))


def test_bad_arguments(tiny_swin):
    with pytest.raises(ValueError, match="ema_decay"):
        grey_task(tiny_swin, ema_decay=1.0)
    with pytest.raises(ValueError, match="lr_reference_batch"):
        grey_task(tiny_swin, lr_reference_batch=0)


def test_predict_writes_top5_csv(tiny_swin, fashion_mnist_dir, predict_folder, tmp_path):
    task = grey_task(tiny_swin, predictions_file=str(tmp_path / "out" / "predictions.csv"))
    dm = fashion(fashion_mnist_dir, predict_dir=str(predict_folder))
    Trainer(**TRAINER).predict(task, datamodule=dm)
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file"] + [f"{kind}_{k}" for k in range(1, 6) for kind in ("class", "prob")] + ["error"]
    assert [row[0] for row in rows[1:]] == ["img_0.JPEG", "img_1.JPEG", "more/img_0.JPEG"]
    probs = [float(p) for p in rows[1][2:-1:2]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert set(rows[1][1:-1:2]) <= set(dm.class_names) and all(row[-1] == "" for row in rows[1:])


def test_predict_marks_unreadable_files_failed_and_keeps_every_other_row_its_own(
    tiny_swin, fashion_mnist_dir, predict_folder, tmp_path
):
    (predict_folder / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    task = grey_task(tiny_swin, predictions_file=str(tmp_path / "predictions.csv")).eval()
    dm = fashion(fashion_mnist_dir, predict_dir=str(predict_folder), batch_size=2)
    Trainer(**TRAINER).predict(task, datamodule=dm)
    with open(tmp_path / "predictions.csv") as f:
        rows = {row["file"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["broken.JPEG", "img_0.JPEG", "img_1.JPEG", "more/img_0.JPEG"]
    broken = rows.pop("broken.JPEG")
    assert "broken.JPEG" in broken["error"] and "unreadable image" in broken["error"] and broken["class_1"] == ""
    # Every readable file's row is that file's own prediction: the same as predicting it alone.
    dm.setup("predict")
    samples = {sample["file"]: sample for sample in dm.predict_set}
    with torch.no_grad():
        for file, row in rows.items():
            expected = task(samples[file]["image"][None]).softmax(-1)[0].max().item()
            assert row["error"] == "" and float(row["prob_1"]) == pytest.approx(expected, abs=1e-5)


def test_finetune_at_a_new_resolution_from_a_checkpoint(tiny_swin, image_folder, tmp_path):
    source = create_model("swin_t", num_classes=1000, **tiny_swin)
    torch.save({"model": source.state_dict()}, tmp_path / "tiny_224.pth")
    bigger = {**tiny_swin, "img_size": 64, "window_size": 8}
    task = ClassificationTask(backbone_kwargs=bigger, pretrained=str(tmp_path / "tiny_224.pth"), num_classes=3)
    assert torch.equal(task.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)
    dm = ImageNetDataModule(data_dir=str(image_folder), image_size=64, batch_size=2, num_workers=0)
    Trainer(fast_dev_run=True, **TRAINER).fit(task, datamodule=dm)
