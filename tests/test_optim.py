"""swinlab.optim: learning-rate schedules and layer-wise lr decay against the official recipes' own code."""

import math
import re

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from swinlab.optim import WarmupLR
from swinlab.tasks import ClassificationTask
from tests.helpers import TINY_SWIN

BASE_LR = 1e-3


def optimizer_with_lr(lr: float = BASE_LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs_per_step(scheduler: WarmupLR, steps: int) -> list[float]:
    """The lr each of ``steps`` optimizer steps uses (the scheduler is stepped after every optimizer step)."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_equals_timm_scheduler_of_the_official_recipe():
    """microsoft/Swin-Transformer lr_scheduler.py: timm's CosineLRScheduler per iteration, warm-up as a prefix
    (t_initial = total - warm-up), warm-up lr and min lr at the recipe's ratios (5e-7 and 5e-6 to 5e-4)."""
    epochs, warmup_epochs, steps_per_epoch = 6, 2, 5
    num_steps, warmup_steps = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    official = CosineLRScheduler(
        optimizer_with_lr(),
        t_initial=num_steps - warmup_steps,
        lr_min=BASE_LR * 1e-2,
        warmup_lr_init=BASE_LR * 1e-3,
        warmup_t=warmup_steps,
        cycle_limit=1,
        t_in_epochs=False,
        warmup_prefix=True,
    )
    expected = []
    for step in range(num_steps + 3):  # past the end the lr stays at its minimum
        official.step_update(step)
        expected.append(official.optimizer.param_groups[0]["lr"])
    ours = WarmupLR(
        optimizer_with_lr(),
        decay="cosine",
        warmup_epochs=warmup_epochs,
        warmup_factor=1e-3,
        min_lr_factor=1e-2,
        total_steps=num_steps,
        steps_per_epoch=steps_per_epoch,
    )
    assert lrs_per_step(ours, num_steps + 3) == pytest.approx(expected, rel=1e-12, abs=0)


def test_poly_power_one_decays_linearly_to_zero_after_warmup():
    total, warmup = 40, 8
    ours = WarmupLR(
        optimizer_with_lr(), decay="poly", power=1.0, warmup_iters=warmup, warmup_factor=1e-6, total_steps=total,
        steps_per_epoch=10,
    )  # fmt: skip
    warm = [BASE_LR * (1e-6 + (1 - 1e-6) * t / warmup) for t in range(warmup)]
    decay = [BASE_LR * (1 - (min(t, total) - warmup) / (total - warmup)) for t in range(warmup, total + 2)]
    assert lrs_per_step(ours, total + 2) == pytest.approx(warm + decay, rel=1e-12, abs=1e-18)
    assert ours.optimizer.param_groups[0]["lr"] == 0.0


def test_poly_power_and_min_lr_factor():
    total, power, floor = 20, 0.9, 0.05
    ours = WarmupLR(optimizer_with_lr(), decay="poly", power=power, min_lr_factor=floor, total_steps=total,
                    steps_per_epoch=4)  # fmt: skip
    expected = [BASE_LR * (floor + (1 - floor) * (1 - min(t, total) / total) ** power) for t in range(total + 3)]
    assert lrs_per_step(ours, total + 3) == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == pytest.approx(BASE_LR * floor)


def test_step_milestones_are_epochs_converted_to_iterations():
    """Detection's 1x schedule shape: x gamma at each milestone epoch, per iteration, after a warm-up in iterations."""
    steps_per_epoch = 3
    ours = WarmupLR(
        optimizer_with_lr(), decay="step", milestones=[2, 4], gamma=0.1, warmup_iters=2, warmup_factor=0.25,
        total_steps=6 * steps_per_epoch, steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    expected = [0.25, 0.625] + [1.0] * 4 + [0.1] * 6 + [0.01] * 6
    assert lrs_per_step(ours, 18) == pytest.approx([BASE_LR * f for f in expected], rel=1e-12)


def test_warmup_in_epochs_is_converted_with_steps_per_epoch():
    kwargs = dict(decay="cosine", warmup_factor=0.0, total_steps=100, steps_per_epoch=7)
    in_epochs = WarmupLR(optimizer_with_lr(), warmup_epochs=2, **kwargs)
    in_iters = WarmupLR(optimizer_with_lr(), warmup_iters=14, **kwargs)
    assert in_epochs.warmup_steps == 14
    lrs = lrs_per_step(in_epochs, 100)
    assert lrs == lrs_per_step(in_iters, 100)
    assert lrs[:15] == pytest.approx([BASE_LR * t / 14 for t in range(15)], rel=1e-12)  # peak reached at step 14
    assert lrs[15] < BASE_LR


def official_swin_layer_id(name: str, depths: tuple[int, ...]) -> int:
    """get_swin_layer of microsoft/Swin-Transformer optimizer.py (SimMIM fine-tuning), on official parameter names
    (patch merging at the END of stage i: ``layers.{i}.downsample``), with its num_layers = sum(depths) + 2."""
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage, block = int(name.split(".")[1]), name.split(".")[3]
        if block in ("reduction", "norm"):
            return sum(depths[: stage + 1])
        return sum(depths[:stage]) + int(block) + 1
    return sum(depths) + 1


def official_name(task_name: str) -> str:
    """A task's ``backbone.*`` parameter name in the official layout (patch merging one stage earlier)."""
    name = task_name.removeprefix("backbone.")
    match = re.match(r"layers\.(\d+)\.downsample\.", name)
    return f"layers.{int(match.group(1)) - 1}.downsample.{name[match.end() :]}" if match else name


def test_layer_decay_scales_equal_the_official_swin_fine_tuning_ones():
    depths, decay = (1, 2), 0.5
    task = ClassificationTask(
        backbone="swin_t", backbone_kwargs={**TINY_SWIN, "depths": depths}, num_classes=3, layer_decay=decay
    )
    top = sum(depths) + 1  # the official scales: decay ** (num_layers - 1 - layer_id)
    groups = task.parameter_groups()
    scale_of = {name: group["lr_scale"] for group in groups for name in group["names"]}
    assert set(scale_of) == {name for name, _ in task.named_parameters()}
    for name, scale in scale_of.items():
        assert scale == decay ** (top - official_swin_layer_id(official_name(name), depths)), name
    # The hand-counted ladder for depths (1, 2): stem 1/16, stage 0 and its patch merging 1/8, then 1/4, 1/2, 1.
    assert scale_of["backbone.patch_embed.proj.weight"] == 1 / 16
    assert (
        scale_of["backbone.layers.1.downsample.reduction.weight"]
        == scale_of["backbone.layers.0.blocks.0.attn.qkv.weight"]
        == 1 / 8
    )
    assert scale_of["backbone.layers.1.blocks.1.mlp.fc2.weight"] == 1 / 2
    assert scale_of["backbone.norm.weight"] == scale_of["backbone.head.weight"] == 1.0
    # Weight decay stays off for 1-D tensors (norms, biases) and the position tables, in every layer.
    shapes = {name: p.ndim for name, p in task.named_parameters()}
    for group in groups:
        for name in group["names"]:
            no_decay = shapes[name] == 1 or "relative_position_bias_table" in name
            assert (group.get("weight_decay") == 0.0) == no_decay, name

    optimizer = task.configure_optimizers()  # no scheduler: the optimizer, lr already scaled per group
    for group in optimizer.param_groups:
        params = {id(p) for p in group["params"]}
        name = next(n for n, p in task.named_parameters() if id(p) in params)
        assert group["lr"] == pytest.approx(1e-3 * scale_of[name], rel=1e-12), name
    assert math.isclose(max(g["lr"] for g in optimizer.param_groups), 1e-3)


def test_layer_ids_count_blocks_across_stages_as_the_official_get_swin_layer():
    """Depths (1, 3, 2, 1): a block's layer is its index over all stages (not within its stage), and patch merging
    shares the layer of the previous stage's last block. Expected ids hand-counted from the official get_swin_layer
    (num_layers = sum(depths) + 2 = 9): stem 0, blocks 1..7, norm and head 8; lr scale decay ** (8 - id)."""
    depths, decay = (1, 3, 2, 1), 0.5
    task = ClassificationTask(
        backbone="swin_t",
        backbone_kwargs={**TINY_SWIN, "depths": depths, "num_heads": (1, 1, 1, 1)},
        num_classes=3,
        layer_decay=decay,
    )
    expected = {
        "patch_embed.proj.weight": 0,
        "layers.0.blocks.0.attn.qkv.weight": 1,
        "layers.1.downsample.reduction.weight": 1,  # official layers.0.downsample: sum(depths[:1])
        "layers.1.blocks.0.mlp.fc1.weight": 2,
        "layers.1.blocks.2.norm1.weight": 4,
        "layers.2.downsample.norm.weight": 4,  # official layers.1.downsample: sum(depths[:2])
        "layers.2.blocks.1.attn.relative_position_bias_table": 6,
        "layers.3.downsample.reduction.weight": 6,
        "layers.3.blocks.0.attn.proj.bias": 7,
        "norm.weight": 8,
        "head.weight": 8,
    }
    assert task.backbone.num_lr_layers == 8
    assert {name: task.backbone.lr_layer_id(name) for name in expected} == expected
    scale_of = {name: group["lr_scale"] for group in task.parameter_groups() for name in group["names"]}
    for name, layer in expected.items():
        assert scale_of[f"backbone.{name}"] == decay ** (8 - layer), name
