"""Parameter and FLOP counts, so speed can be read against the arithmetic a model does.

FLOPs are counted by ``torch.utils.flop_counter`` (one multiply-add = 2 FLOPs) on a real forward pass
on the meta device where possible, so even large models cost no memory or time to measure.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelCost:
    """Size and forward arithmetic of a model for one input image."""

    params: int
    forward_flops: int
    input_size: Sequence[int]

    @property
    def gflops(self) -> float:
        return self.forward_flops / 1e9

    @property
    def train_flops(self) -> int:
        """Forward + backward per image: the backward pass costs about twice the forward."""
        return 3 * self.forward_flops

    def as_dict(self) -> Dict[str, object]:
        return {**asdict(self), "input_size": list(self.input_size), "gflops": self.gflops}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_forward_flops(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> int:
    """FLOPs of one forward pass on a single image of ``input_size`` (C, H, W)."""
    try:
        probe = copy.deepcopy(model).to("meta")
        device = torch.device("meta")
    except Exception:  # models that cannot move to meta are measured where they are
        probe, device = model, next(model.parameters()).device
    was_training = probe.training
    probe.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        probe(torch.zeros(1, *input_size, device=device))
    probe.train(was_training)
    return int(counter.get_total_flops())


def model_cost(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> ModelCost:
    return ModelCost(count_parameters(model), count_forward_flops(model, input_size), tuple(input_size))
