import csv
from functools import partial

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from swinlab.data import FashionMNISTDataModule, ImageNetDataModule
from swinlab.models import create_model
from swinlab.optim import WarmupLR
from swinlab.tasks import ClassificationTask
from tests.helpers import labelled_loader

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


class BatchRecorder(Callback):
    """Keeps a copy of each training batch as the data loader gave it (timm's Mixup mixes it in place)."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch["image"].clone(), batch["label"].clone()))


def two_image_loader() -> DataLoader:
    """One batch of two distinct random grey 32x32 images with labels 3 and 7."""
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    return labelled_loader(images, torch.tensor([3, 7]), batch_size=2)


def smoothed(label: int, smoothing: float, num_classes: int = 10) -> torch.Tensor:
    """timm's smoothed one-hot target: 1 - s + s / C on the label, s / C elsewhere."""
    return torch.full((num_classes,), smoothing / num_classes).index_fill_(
        0, torch.tensor(label), 1 - smoothing + smoothing / num_classes
    )


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_and_targets(tiny_swin, mode):
    alphas = {"mixup_alpha": 0.8} if mode == "mixup" else {"cutmix_alpha": 1.0}
    task = grey_task(tiny_swin, label_smoothing=0.1, mixup_prob=1.0, **alphas)
    seen = []  # (images, targets) that reached the loss
    task.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    task.train_loss.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    recorder = BatchRecorder()
    np.random.seed(0)  # timm draws lambda (and the CutMix box) from numpy's global generator
    Trainer(max_steps=1, limit_val_batches=0, callbacks=[recorder], **TRAINER).fit(task, two_image_loader())

    (raw, labels), (mixed, targets) = recorder.batches[0], seen[-2:]  # before: the model summary's forward
    a, b = raw
    if mode == "mixup":
        # mixed[0] = lam * a + (1 - lam) * b: solve for lam by least squares, then every pixel must fit.
        lam = float(((mixed[0] - b) * (a - b)).sum() / ((a - b) ** 2).sum())
        torch.testing.assert_close(mixed[0], lam * a + (1 - lam) * b)
    else:
        # CutMix pastes a box of b into a: each pixel comes from one image, lam is the share left from a.
        from_a, from_b = mixed[0] == a, mixed[0] == b
        assert bool((from_a | from_b).all())
        lam = float(from_a.float().mean())
        torch.testing.assert_close(mixed[0], torch.where(from_a, a, b))
    torch.testing.assert_close(
        mixed[1], torch.where(mixed[0] == a, b, a) if mode == "cutmix" else lam * b + (1 - lam) * a
    )
    assert 0.01 < lam < 0.99, "the batch was mixed"
    expected = torch.stack(
        [lam * smoothed(3, 0.1) + (1 - lam) * smoothed(7, 0.1), lam * smoothed(7, 0.1) + (1 - lam) * smoothed(3, 0.1)]
    )
    assert labels.tolist() == [3, 7]
    torch.testing.assert_close(targets, expected)


def test_ema_is_updated_and_used_for_validation(tiny_swin):
    task = grey_task(tiny_swin, ema_decay=0.5)
    start = {k: v.clone() for k, v in task.ema.module.state_dict().items()}
    trainer = Trainer(max_steps=3, limit_val_batches=0, **TRAINER)
    loader = labelled_loader(torch.rand(6, 1, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5]), batch_size=2)
    trainer.fit(task, loader)
    assert task.eval_network is task.ema.module
    assert not any(p.requires_grad for p in task.ema.parameters())
    ema, trained = task.ema.module.state_dict(), task.backbone.state_dict()
    key = "head.weight"
    assert not torch.equal(ema[key], start[key]) and not torch.equal(ema[key], trained[key])

    logits = []
    task.eval_loss.register_forward_pre_hook(lambda module, args: logits.append(args[0].clone()))
    images, labels = torch.rand(4, 1, 32, 32), torch.tensor([1, 3, 5, 7])
    (metrics,) = Trainer(**TRAINER).validate(task, labelled_loader(images, labels, batch_size=4), verbose=False)
    with torch.no_grad():
        averaged, raw = task.ema.module.eval()(images), task.backbone.eval()(images)
    torch.testing.assert_close(logits[0], averaged)
    assert not torch.allclose(logits[0], raw, atol=1e-4)
    assert metrics["val/loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(averaged, labels)), rel=1e-5)


class WeightRecorder(Callback):
    """The backbone's parameters after every optimizer step (and the EMA update that follows it)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({name: p.detach().clone() for name, p in pl_module.backbone.named_parameters()})


def test_ema_is_the_hand_computed_average_with_the_configured_decay(tiny_swin):
    """timm's ModelEmaV3 at step k: the first update copies the weights, each later one keeps ``ema_decay`` of the
    average. Off by one step (a second copy, or no copy) or timm's default decay (0.9999) gives other weights."""
    decay = 0.5
    task = grey_task(tiny_swin, ema_decay=decay)
    recorder = WeightRecorder()
    loader = labelled_loader(torch.rand(8, 1, 32, 32), torch.arange(8), batch_size=2)
    Trainer(max_steps=4, limit_val_batches=0, callbacks=[recorder], **TRAINER).fit(task, loader)
    expected = dict(recorder.steps[0])
    for weights in recorder.steps[1:]:
        expected = {name: decay * expected[name] + (1 - decay) * weights[name] for name in expected}
    averaged = dict(task.ema.module.named_parameters())
    assert len(recorder.steps) == 4
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, msg=name)


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


def official_resize(state: dict, key: str, new_side: int) -> torch.Tensor:
    """The official Swin ``load_pretrained`` (microsoft/Swin-Transformer utils.py): a relative-position-bias
    table (L1, nH) or an absolute position embedding (1, L1, C) resized on its square grid by bicubic."""
    value = state[key]
    if key.endswith("relative_position_bias_table"):
        old, heads = round(value.shape[0] ** 0.5), value.shape[1]
        grid = value.permute(1, 0).view(1, heads, old, old)
        resized = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic")
        return resized.view(heads, new_side * new_side).permute(1, 0)
    grid = value.permute(0, 3, 1, 2)  # swinlab keeps the embedding as (1, H, W, C)
    return torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic").permute(0, 2, 3, 1)


def test_finetune_at_a_new_resolution_from_a_checkpoint(tiny_swin, image_folder, tmp_path):
    # 32 px / window 4 -> 64 px / window 8: the tables grow from 7x7 to 15x15, the embedding from 16x16 to 32x32.
    small = {**tiny_swin, "position_bias": "relative+absolute"}
    torch.manual_seed(0)
    source = create_model("swin_t", num_classes=1000, **small).state_dict()
    torch.save({"model": source}, tmp_path / "tiny_32.pth")
    bigger = {**small, "img_size": 64, "window_size": 8}
    task = ClassificationTask(backbone_kwargs=bigger, pretrained=str(tmp_path / "tiny_32.pth"), num_classes=3)

    reference = create_model("swin_t", num_classes=3, **bigger)
    expected = reference.state_dict()  # buffers (position index, attention masks) as built for the new size
    tables = [key for key in source if key.endswith("relative_position_bias_table")]
    assert tables and expected[tables[0]].shape == (15 * 15, 1)
    for key, value in source.items():
        if key in tables:
            expected[key] = official_resize(source, key, 15)
        elif key == "absolute_pos_embed":
            expected[key] = official_resize(source, key, 32)
        elif not key.startswith("head.") and value.is_floating_point():
            expected[key] = value
    expected["head.weight"], expected["head.bias"] = task.backbone.head.weight, task.backbone.head.bias  # new head
    reference.load_state_dict(expected)
    loaded = task.backbone.state_dict()
    for key in (*tables, "absolute_pos_embed"):
        torch.testing.assert_close(loaded[key], expected[key], msg=key)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(task.backbone.eval()(images), reference.eval()(images))

    dm = ImageNetDataModule(data_dir=str(image_folder), image_size=64, batch_size=2, num_workers=0)
    trainer = Trainer(fast_dev_run=True, **TRAINER)
    trainer.fit(task, datamodule=dm)
    assert trainer.state.finished and trainer.global_step == 1
    assert {"train/loss", "val/loss", "val/top1"} <= set(trainer.callback_metrics)
    assert not torch.equal(task.backbone.layers[0].blocks[0].attn.relative_position_bias_table, expected[tables[0]])
