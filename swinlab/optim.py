"""Parameter groups and per-iteration learning-rate schedules shared by every task."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Parameters that the official recipes exclude from weight decay besides biases and norms.
# (``mask_token``: SimMIM's, excluded by its official ``no_weight_decay``.)
NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "relative_position_bias_table",
    "absolute_pos_embed",
    "cls_token",
    "mask_token",
)


def param_groups(
    model: nn.Module,
    no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int = 0,
    layer_decay: float | None = None,
) -> list[dict]:
    """Split trainable parameters into groups: no weight decay on 1-D tensors (norms, biases) and position
    tables; with ``layer_decay`` each group also carries ``lr_scale = layer_decay ** (num_layers - layer_id)``.

    Groups carry ``weight_decay=0.0`` where decay is off and nothing where it is on, so the optimizer's own
    ``weight_decay`` (from the config) applies.
    """
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in no_decay_keywords)
        lid = layer_id(name) if (layer_decay is not None and layer_id is not None) else 0
        key = (no_decay, lid)
        if key not in groups:
            group: dict = {"params": [], "names": []}
            if no_decay:
                group["weight_decay"] = 0.0
            if layer_decay is not None:
                group["lr_scale"] = layer_decay ** (num_layers - lid)
            groups[key] = group
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def apply_lr_scale(optimizer: torch.optim.Optimizer) -> None:
    """Multiply each group's lr by its ``lr_scale`` (layer-wise decay) once, before a scheduler records it."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


class WarmupLR(LambdaLR):
    """Linear warm-up, then cosine, polynomial or step decay, evaluated at every optimizer step.

    Warm-up is given in epochs (``warmup_epochs``, classification) or iterations (``warmup_iters``,
    segmentation); step milestones in epochs. ``total_steps`` and ``steps_per_epoch`` are filled in by the
    task from the trainer, so a config only states the recipe. The multiplier starts at ``warmup_factor``
    and ends at ``min_lr_factor`` (cosine and poly).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay: Literal["cosine", "poly", "step", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        warmup_iters: int = 0,
        warmup_factor: float = 1e-3,
        min_lr_factor: float = 0.0,
        power: float = 1.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        if total_steps is None or steps_per_epoch is None:
            raise ValueError(
                "WarmupLR needs total_steps and steps_per_epoch; the task passes them from the trainer "
                "(build it through a swinlab task, or pass both explicitly)"
            )
        if warmup_epochs < 0 or warmup_iters < 0:
            raise ValueError(f"warm-up must be >= 0, got warmup_epochs={warmup_epochs}, warmup_iters={warmup_iters}")
        self.decay = decay
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = int(warmup_iters) + round(warmup_epochs * steps_per_epoch)
        self.warmup_factor = warmup_factor
        self.min_lr_factor = min_lr_factor
        self.power = power
        self.milestone_steps = sorted(int(m * steps_per_epoch) for m in milestones)
        self.gamma = gamma
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            return self.warmup_factor + (1.0 - self.warmup_factor) * alpha
        if self.decay == "step":
            return self.gamma ** sum(step >= m for m in self.milestone_steps)
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay == "poly":
            shape = (1.0 - progress) ** self.power
        else:
            raise ValueError(f"WarmupLR decay must be cosine, poly, step or constant, got {self.decay!r}")
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * shape
