"""Muon for the convolution filters and AdamW for everything else, as one optimizer.

Why Muon: a short run has few steps, and plain momentum spends most of them along the few directions in
which a filter bank's gradient is largest. Muon replaces each filter bank's momentum by its nearest
semi-orthogonal matrix (five Newton-Schulz iterations in bf16), so every direction of the update moves at
the same rate. Its update is scaled to AdamW's typical per-coordinate size (0.2 * sqrt(max(rows, cols)),
``match_rms_adamw`` in ``torch.optim.Muon``), so one LR and one decoupled weight decay serve both halves and
the budget rule sizes it from AdamW's LR (``cardinal.budget.MUON_LR_FACTOR``).

Which parameters take which: a convolution's weight, viewed as (out channels, in channels x kernel), is a
matrix and takes Muon; a grouped convolution (ResNeXt's) is one such matrix per group, since it maps each
group on its own. The stem (the first convolution), the classifier, norms and biases take AdamW, the usual
split (the first and last layers map to and from data, not between hidden features). One optimizer object,
not two, so Accelerate prepares, clips, scales and checkpoints it as any other; its state is tensors and
numbers only, which a weights-only load reads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # the quintic's coefficients, as in torch.optim.Muon
NEWTON_SCHULZ_STEPS = 5
ADAMW_RMS = 0.2  # the RMS of a typical AdamW update, which Muon's update is scaled to


def filter_banks(model: nn.Module) -> Dict[int, int]:
    """``id(weight) -> groups`` of the convolutions Muon takes: every one but the first (the stem)."""
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    return {id(module.weight): module.groups for module in convolutions[1:]}


def orthogonalize(updates: Tensor, steps: int = NEWTON_SCHULZ_STEPS, eps: float = 1e-7) -> Tensor:
    """The nearest semi-orthogonal matrices (approximately: singular values end within about [0.7, 1.2]) of
    a batch of matrices shaped (n, rows, cols), by the quintic Newton-Schulz iteration in bf16, each product
    fused with its sum as in ``torch.optim.Muon``."""
    a, b, c = NEWTON_SCHULZ
    x = updates.bfloat16()
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


def rms_scale(rows: int, cols: int) -> float:
    """Scale of an orthogonalised (rows, cols) update that gives it AdamW's typical RMS."""
    return ADAMW_RMS * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    """Groups with ``muon=True`` take Muon (momentum ``momentum``, Nesterov if ``nesterov``; each weight is
    ``conv_groups`` matrices); the others take AdamW (``betas``, ``eps``). Both apply decoupled weight decay
    ``p *= 1 - lr * weight_decay``."""

    def __init__(self, groups: Sequence[Dict], lr: float, momentum: float = 0.9, nesterov: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 ns_steps: int = NEWTON_SCHULZ_STEPS):
        if not 0 <= momentum < 1:
            raise ValueError(f"Muon's momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay, ns_steps=ns_steps, muon=False, conv_groups=1)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon's groups take matrices and filter banks only (2-D or more)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: Dict, params: List[Tensor]) -> None:
        grads = [p.grad for p in params]
        momenta = [self._state_tensor(p, "momentum_buffer") for p in params]
        torch._foreach_lerp_(momenta, grads, 1 - group["momentum"])
        updates = torch._foreach_lerp(grads, momenta, group["momentum"]) if group["nesterov"] else momenta
        decay_params(params, group["lr"], group["weight_decay"])
        for indices, orthogonal in orthogonalized_by_shape(updates, group["conv_groups"], group["ns_steps"]):
            rows, cols = orthogonal.shape[-2:]
            same_shape = [params[i] for i in indices]
            steps = orthogonal.to(same_shape[0].dtype).reshape(len(indices), *same_shape[0].shape).unbind(0)
            torch._foreach_add_(same_shape, steps, alpha=-group["lr"] * rms_scale(rows, cols))

    def _adamw_step(self, group: Dict, params: List[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        by_step: Dict[int, List[Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            state["step"] = int(state.get("step", 0)) + 1
            by_step[state["step"]].append(p)
        decay_params(params, group["lr"], group["weight_decay"])
        for step, same_step in by_step.items():
            grads = [p.grad for p in same_step]
            exp_avgs = [self._state_tensor(p, "exp_avg") for p in same_step]
            exp_avg_sqs = [self._state_tensor(p, "exp_avg_sq") for p in same_step]
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, math.sqrt(1 - beta2 ** step))
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(same_step, exp_avgs, denominators, -group["lr"] / (1 - beta1 ** step))

    def _state_tensor(self, parameter: Tensor, key: str) -> Tensor:
        state = self.state[parameter]
        if key not in state:
            state[key] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        return state[key]


def decay_params(params: List[Tensor], lr: float, weight_decay: float) -> None:
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


def as_matrices(update: Tensor, conv_groups: int) -> Tensor:
    """A convolution's update as its ``conv_groups`` matrices, (groups, out / groups, in / groups x kernel)."""
    return update.reshape(conv_groups, update.size(0) // conv_groups, -1)


def orthogonalized_by_shape(updates: List[Tensor], conv_groups: int,
                            steps: int) -> List[Tuple[List[int], Tensor]]:
    """The updates' matrices orthogonalised in one batch per shape (fewer, larger kernels: resnet50's 52
    filter banks come in 19 shapes); each batch holds the matrices of its updates in order."""
    by_shape: Dict[torch.Size, List[int]] = defaultdict(list)
    for index, update in enumerate(updates):
        by_shape[update.shape].append(index)
    return [(indices, orthogonalize(torch.cat([as_matrices(updates[i], conv_groups) for i in indices]), steps))
            for indices in by_shape.values()]
