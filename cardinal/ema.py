"""An exponential moving average (EMA) of the weights, evaluated beside the trained model.

Built on torch's own ``AveragedModel``; parameters and buffers (BatchNorm statistics) are averaged.
The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not
dominated by the random initialisation: with 0.999 a 150-step epoch would keep most of it. The average
is reported in columns of its own (``test_acc_ema``, ``val_acc_ema``) and never replaces ``test_acc``.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates + 1``: low at first, ``decay`` once enough steps were averaged."""
    return min(decay, (1 + updates) / (10 + updates))


def build_average(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of ``model`` (a plain module, not its DDP wrapper) on the same device, never trained itself."""

    @torch.no_grad()
    def update(averaged: List[torch.Tensor], current: List[torch.Tensor], updates: torch.Tensor) -> None:
        weight = 1 - warmed_up_decay(decay, int(updates))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
            torch._foreach_copy_(averaged, current)

    average = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    average.requires_grad_(False)
    return average.eval()
