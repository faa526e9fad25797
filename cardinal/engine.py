"""One training epoch and one evaluation pass, exact under any number of processes.

The loss of a step is the mean over the *global* batch: each process sums its per-sample losses and
scales by ``world / global_count``, so DDP's gradient average equals the single-process gradient even
when the last batch splits unevenly. Gradient accumulation splits each process's share into micro-batches
without changing that sum. Metrics are sums reduced across processes once per epoch.
"""

from __future__ import annotations

import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cardinal.data import DeviceLoader, Normalize, eval_batches

StepCallback = Callable[[Optional[float]], None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the step that produced it was not applied by any later code."""


@dataclass
class TrainStats:
    loss: float
    accuracy: float
    steps: int
    images: int
    time_s: float
    lr: float


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    images: int
    time_s: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory on GPUs; on the CPU, the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_epoch(
    accelerator,
    model: nn.Module,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    label_smoothing: float = 0.0,
    grad_accum: int = 1,
    grad_clip: float = 0.0,
    max_steps: Optional[int] = None,
    on_step: Optional[StepCallback] = None,
    check_every: int = 10,
) -> TrainStats:
    """Train for one pass over ``loader`` (or ``max_steps`` optimizer steps, whichever ends first)."""
    device, world = accelerator.device, accelerator.num_processes
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    nonfinite = torch.zeros((), device=device, dtype=torch.int64)
    steps = images = 0
    lr = optimizer.param_groups[0]["lr"]
    synchronize(device)
    start = time.perf_counter()
    for images_share, labels_share, global_count in loader:
        if max_steps is not None and steps >= max_steps:
            break
        micro = max(1, min(grad_accum, global_count // world))
        chunks = list(zip(images_share.tensor_split(micro), labels_share.tensor_split(micro)))
        for index, (inputs, targets) in enumerate(chunks):
            last = index == len(chunks) - 1
            with nullcontext() if last else accelerator.no_sync(model):
                logits = model(inputs)
                per_sample = F.cross_entropy(logits.float(), targets, reduction="none",
                                             label_smoothing=label_smoothing)
                summed = per_sample.sum()
                accelerator.backward(summed * (world / global_count))
            loss_sum += summed.detach().double()
            correct += (logits.detach().argmax(1) == targets).sum()
            nonfinite += (~torch.isfinite(summed.detach())).long()
        if grad_clip > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scheduler.step()
        steps += 1
        images += global_count
        shown = None
        if steps % check_every == 0 or steps == len(loader):
            if accelerator.reduce(nonfinite.clone(), "sum").item():
                raise NonFiniteLoss(f"step {steps}")
            shown = summed.item() / max(1, len(chunks[-1][1]))  # this process's last micro-batch
        if on_step is not None:
            on_step(shown)
    if accelerator.reduce(nonfinite.clone(), "sum").item():
        raise NonFiniteLoss(f"step {steps}")
    totals = accelerator.reduce(torch.stack([loss_sum, correct.double()]), "sum")
    synchronize(device)
    elapsed = time.perf_counter() - start
    return TrainStats(
        loss=totals[0].item() / max(1, images),
        accuracy=100.0 * totals[1].item() / max(1, images),
        steps=steps,
        images=images,
        time_s=elapsed,
        lr=lr,
    )


@torch.no_grad()
def evaluate(
    accelerator,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Normalize,
    batch_size: int,
    limit_batches: int = 0,
) -> EvalStats:
    """Loss and accuracy over the whole split; each process takes a disjoint contiguous shard."""
    device = accelerator.device
    network = accelerator.unwrap_model(model)  # no DDP hooks: shards may differ by one batch
    was_training = network.training
    network.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, correct, count
    synchronize(device)
    start = time.perf_counter()
    batches = eval_batches(images, labels, batch_size, normalize, accelerator.process_index,
                           accelerator.num_processes)
    for index, (inputs, targets) in enumerate(batches):
        if limit_batches and index >= limit_batches:
            break
        logits = network(inputs).float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += (logits.argmax(1) == targets).sum().double()
        sums[2] += len(targets)
    totals = accelerator.reduce(sums, "sum")
    synchronize(device)
    network.train(was_training)
    count = int(totals[2].item())
    return EvalStats(
        loss=totals[0].item() / max(1, count),
        accuracy=100.0 * totals[1].item() / max(1, count),
        images=count,
        time_s=time.perf_counter() - start,
    )

