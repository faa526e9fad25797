"""Batch norm whose statistics span every process, on any backend (gloo on CPU included).

``torch.nn.SyncBatchNorm`` only runs on GPU-like devices; this variant reduces per-channel sums with the
differentiable ``torch.distributed.nn`` all-reduce, so a multi-process CPU run normalizes over the global
batch exactly like a one-process run does. Outside a multi-process training forward it is plain BatchNorm2d.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _distributed_world() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() / x.size(1)])])
        totals = all_reduce(local)
        count = totals[-1]
        mean = totals[:-1] / count
        centered = xf - mean.view(1, -1, 1, 1)
        var = all_reduce((centered * centered).sum(dims)) / count  # two passes: no cancellation error
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), factor)
        out = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def _swap_batchnorm(module: nn.Module, make) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        replacement = make(module)
        if replacement is not module:
            if module.affine:
                with torch.no_grad():
                    replacement.weight, replacement.bias = module.weight, module.bias
            replacement.running_mean = module.running_mean
            replacement.running_var = module.running_var
            replacement.num_batches_tracked = module.num_batches_tracked
            replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        module.add_module(name, _swap_batchnorm(child, make))
    return module


def _clone_as(cls, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    return cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats).to(
        device=bn.running_mean.device if bn.running_mean is not None else None)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """torch's SyncBatchNorm where it runs (CUDA), the cross-process variant elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _swap_batchnorm(
        module, lambda bn: bn if isinstance(bn, CrossProcessBatchNorm2d) else _clone_as(CrossProcessBatchNorm2d, bn))


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Plain BatchNorm2d again (same state_dict), e.g. before TorchScript export."""
    return _swap_batchnorm(
        module, lambda bn: bn if type(bn) is nn.BatchNorm2d else _clone_as(nn.BatchNorm2d, bn))
