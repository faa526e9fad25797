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


class ExponentialAverage(AveragedModel):
    """torch's ``AveragedModel`` (same state dict: ``module.*`` and ``n_averaged``) with a warmed-up EMA
    step that never makes the CPU wait for the GPU. torch's own ``update_parameters`` copies the update
    count to the device every step, a synchronising copy; here the count is read where it is kept, on the
    CPU."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [tensor.detach() for tensor in (*model.parameters(), *model.buffers())]
        updates = int(self.n_averaged)
        if updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            floating = [torch.is_floating_point(tensor) for tensor in averaged]
            weight = 1 - warmed_up_decay(self.decay, updates)
            torch._foreach_lerp_(_where(averaged, floating), _where(current, floating), weight)
            integer = [not is_float for is_float in floating]
            if any(integer):  # integer buffers (BatchNorm's num_batches_tracked) follow the model
                torch._foreach_copy_(_where(averaged, integer), _where(current, integer))
        self.n_averaged += 1


def _where(tensors: List[torch.Tensor], mask: List[bool]) -> List[torch.Tensor]:
    return [tensor for tensor, keep in zip(tensors, mask, strict=True) if keep]


def build_average(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of ``model`` (a plain module, not its DDP wrapper) on the same device, never trained itself."""
    average = ExponentialAverage(model, decay)
    average.requires_grad_(False)
    return average.eval()
