"""Multiply-add counting that also sees the fused attention kernels (the paper reports FLOPs as multiply-adds)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import flop_counter

aten = torch.ops.aten

# FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel that ``scaled_dot_product_attention``
# dispatches to on CPU, so without these entries every attention matmul run on a CPU would count as zero.
_CPU_ATTENTION_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(query, key, value)
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(
            grad_out, query, key, value
        )
    ),
}


def flop_counter_mode(display: bool = False) -> flop_counter.FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU fused attention kernel (forward and backward)."""
    return flop_counter.FlopCounterMode(display=display, custom_mapping=_CPU_ATTENTION_FORMULAS)


def count_macs(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass of ``model`` on a ``(batch_size, *input_size)`` zero tensor.

    ``input_size`` is ``(C, H, W)``. Matmuls, convolutions and attention count (as in the paper and fvcore);
    element-wise ops, norms and softmax do not.
    """
    parameter = next(model.parameters())
    x = torch.zeros(batch_size, *input_size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter_mode() as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
