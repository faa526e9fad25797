"""One training epoch and one evaluation pass, exact under any number of processes.

The loss of a step is the mean over the *global* batch: each process sums its per-sample losses and
scales by ``world / global_count``, so DDP's gradient average equals the single-process gradient even
when the last batch splits unevenly. Gradient accumulation splits each process's share into micro-batches
without changing that sum. Metrics are sums reduced across processes once per epoch.

``train_loss`` is plain cross-entropy whatever the objective (label smoothing changes only what is
optimised, reported as ``objective``), so it reads on the same scale as ``test_loss``.

Before evaluating, every rank takes rank 0's BatchNorm buffers (as DDP itself does before each forward),
so the accuracy reported is that of the model the main process checkpoints and exports.
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
from torch.optim.swa_utils import AveragedModel

from cardinal.data import DeviceLoader, Normalize, eval_batches
from cardinal.optim import ScheduledLR
from cardinal.speedups import compiled_for_eval

StepCallback = Callable[[Optional[float]], None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf during the epoch (found at its end); nothing of that epoch is checkpointed."""


@dataclass
class TrainStats:
    loss: float  # plain cross-entropy
    objective: float  # what was optimised (cross-entropy with label smoothing, if any)
    accuracy: float
    steps: int
    skipped_steps: int  # optimizer steps the fp16 GradScaler skipped (inf/NaN gradients)
    images: int
    time_s: float
    lr: float


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    images: int
    time_s: float
    flip_accuracy: Optional[float] = None  # logits averaged with the mirrored image's (evaluate(flip=True))


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


def losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float):
    """Per-sample (plain cross-entropy, objective) from one log-softmax.

    The objective equals ``F.cross_entropy(..., label_smoothing=e)``: (1 - e) * NLL + e * mean_k(-log p_k).
    """
    log_probs = logits.float().log_softmax(1)
    plain = -log_probs.gather(1, targets.view(-1, 1)).squeeze(1)
    if not label_smoothing:
        return plain, plain
    return plain, (1 - label_smoothing) * plain - label_smoothing * log_probs.mean(1)


def train_epoch(
    accelerator,
    model: nn.Module,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    lr_schedule: ScheduledLR,
    label_smoothing: float = 0.0,
    grad_accum: int = 1,
    grad_clip: float = 0.0,
    max_steps: Optional[int] = None,
    on_step: Optional[StepCallback] = None,
    average: Optional[AveragedModel] = None,
    refresh_s: float = 1.0,
    odd_batch_model: Optional[nn.Module] = None,
) -> TrainStats:
    """Train for one pass over ``loader`` (or ``max_steps`` optimizer steps, whichever ends first).

    ``average`` (an EMA of the weights) takes in every step the optimizer applied. ``odd_batch_model`` (the
    eager model, sharing ``model``'s parameters, when ``model`` is compiled for static shapes) runs every
    micro-batch whose size no micro-batch of the epoch's first step had: the epoch's shorter last batch then
    costs one eager step instead of a second compilation (33-38 s a shape for resnet50 on an H200).

    Nothing in a step waits for the device: losses, correct counts and a non-finite flag add up on the
    device and are read once, at the end of the epoch, where a NaN/inf loss raises ``NonFiniteLoss`` on
    every process together. ``on_step`` is called after every step with ``None``, and at most every
    ``refresh_s`` seconds with this process's last loss, which alone waits for the device; without
    ``on_step`` the epoch never waits before its end.
    """
    device, world = accelerator.device, accelerator.num_processes
    model.train()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # plain loss, objective, correct
    nonfinite = torch.zeros((), device=device, dtype=torch.int64)
    steps = skipped = images = 0
    lr = lr_schedule.apply()
    averaged_source = accelerator.unwrap_model(model, keep_torch_compile=False) if average is not None else None
    synchronize(device)
    start = time.perf_counter()
    next_refresh = start
    compiled_sizes: Optional[set] = None  # the micro-batch sizes of the first step
    for images_share, labels_share, global_count in loader:
        if max_steps is not None and steps >= max_steps:
            break
        lr = lr_schedule.apply()
        micro = max(1, min(grad_accum, global_count // world))
        chunks = list(zip(images_share.tensor_split(micro), labels_share.tensor_split(micro)))
        compiled_sizes = compiled_sizes or {len(targets) for _, targets in chunks}
        for index, (inputs, targets) in enumerate(chunks):
            last = index == len(chunks) - 1
            net = model if odd_batch_model is None or len(targets) in compiled_sizes else odd_batch_model
            with nullcontext() if last else accelerator.no_sync(net):
                logits = net(inputs)
                plain, objective = losses(logits, targets, label_smoothing)
                summed = objective.sum()
                accelerator.backward(summed * (world / global_count))
            sums[0] += plain.detach().sum().double()
            sums[1] += summed.detach().double()
            sums[2] += (logits.detach().argmax(1) == targets).sum().double()
            nonfinite += (~torch.isfinite(summed.detach())).long()
        if grad_clip > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        applied = not getattr(optimizer, "step_was_skipped", False)
        lr_schedule.advance(applied)
        if average is not None and applied:
            average.update_parameters(averaged_source)
        skipped += not applied
        steps += 1
        images += global_count
        if on_step is not None:
            shown = None
            if time.perf_counter() >= next_refresh:  # a local read: no collective, so ranks need not agree
                shown = summed.item() / max(1, len(chunks[-1][1]))  # this process's last micro-batch
                next_refresh = time.perf_counter() + refresh_s
            on_step(shown)
    if accelerator.reduce(nonfinite.clone(), "sum").item():
        raise NonFiniteLoss(f"step {steps}")
    totals = accelerator.reduce(sums, "sum")
    synchronize(device)
    elapsed = time.perf_counter() - start
    return TrainStats(
        loss=totals[0].item() / max(1, images),
        objective=totals[1].item() / max(1, images),
        accuracy=100.0 * totals[2].item() / max(1, images),
        steps=steps,
        skipped_steps=skipped,
        images=images,
        time_s=elapsed,
        lr=lr,
    )


def broadcast_buffers(accelerator, model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), which is what gets saved."""
    if accelerator.num_processes < 2 or not torch.distributed.is_initialized():
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        torch.distributed.broadcast(buffer.data, src=0)


@torch.no_grad()
def evaluate(
    accelerator,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Normalize,
    batch_size: int,
    limit_batches: int = 0,
    flip: bool = False,
    compile_mode: Optional[str] = None,
) -> EvalStats:
    """Loss and accuracy over the whole split; each process takes a disjoint contiguous shard.

    ``flip`` also measures flip test-time augmentation (logits of the image and its mirror averaged) as
    ``flip_accuracy``; ``loss`` and ``accuracy`` stay those of the plain model.

    Evaluation runs in the run's precision (accelerate's autocast, also for a model it did not prepare,
    such as the weight average) and memory format (``normalize``), without DDP's wrapper (shards may differ
    by one batch). With ``compile_mode`` the network is compiled for evaluation and the last batch is padded
    to ``batch_size`` so that one graph serves every batch; the padding's outputs are dropped (BatchNorm in
    eval mode treats each image alone).
    """
    device = accelerator.device
    broadcast_buffers(accelerator, model)
    plain = accelerator.unwrap_model(model, keep_torch_compile=False)
    network = compiled_for_eval(plain, compile_mode) if compile_mode else plain
    was_training = plain.training
    plain.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct, count, correct with flip
    synchronize(device)
    start = time.perf_counter()
    batches = eval_batches(images, labels, batch_size, normalize, accelerator.process_index,
                           accelerator.num_processes)
    with accelerator.autocast():
        for index, (inputs, targets) in enumerate(batches):
            if limit_batches and index >= limit_batches:
                break
            count = len(targets)
            if compile_mode and count < batch_size:
                inputs = _padded(inputs, batch_size)
            # cloned: a CUDA-graph replay (the flip pass, the next batch) reuses its output's memory
            logits = network(inputs)[:count].float().clone()
            sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
            sums[1] += (logits.argmax(1) == targets).sum().double()
            sums[2] += count
            if flip:
                averaged = logits + network(inputs.flip(3))[:count].float()
                sums[3] += (averaged.argmax(1) == targets).sum().double()
    totals = accelerator.reduce(sums, "sum")
    synchronize(device)
    plain.train(was_training)
    count = int(totals[2].item())
    return EvalStats(
        loss=totals[0].item() / max(1, count),
        accuracy=100.0 * totals[1].item() / max(1, count),
        images=count,
        time_s=time.perf_counter() - start,
        flip_accuracy=100.0 * totals[3].item() / max(1, count) if flip else None,
    )


def _padded(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """``inputs`` followed by zero images up to ``size``, in the same memory format."""
    padding = inputs.new_zeros((size - len(inputs), *inputs.shape[1:]))
    memory_format = torch.contiguous_format if inputs.is_contiguous() else torch.channels_last
    return torch.cat([inputs, padding]).contiguous(memory_format=memory_format)
