"""Where a training step's time goes: operation classes, their FLOPs and their fraction of the device's peak.

    python -m cardinal.profile --archs resnet50 resnext50_32x4d --precision bf16 --channels-last \\
        --output profile.csv --plot profile.png --trace traces/

Each architecture trains on synthetic data for ``--warmup`` steps, then ``--steps`` rounds time one step
without the profiler and one under ``torch.profiler`` for every arch in turn, so that a change in the
machine's load hits all archs alike; the fastest of each kind is reported (noise on a shared machine only
slows a step). Every operator's self time (kernel time on a GPU) goes to one operation class. Forward
operators take the class of the module they run in (forward hooks open a ``record_function`` range per leaf
module); backward operators take the class of the forward module that created their autograd node, linked
by the node's sequence number. The same scopes split the FLOPs counted by ``torch.utils.flop_counter`` for a
whole forward + backward pass, and a large matmul in the same precision, timed in the same process before
the first round and after each (the best counts), gives the peak that each class's achieved FLOP/s is read
against.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    flop_registry,
    shape_wrapper,
)

from cardinal.cli import ArgumentParser, CardinalError, make_console, positive_int, run
from cardinal.config import RECIPES
from cardinal.cost import count_forward_flops
from cardinal.engine import synchronize
from cardinal.fileio import atomic_target, cannot_write, probe_writable
from cardinal.models import build_model, list_archs
from cardinal.optim import build_optimizer
from cardinal.plotting import pyplot, save_figure
from cardinal.prose import wrap
from cardinal.records import check_output_file, write_csv

CONV_GROUPED, CONV_DENSE, CONV_1X1 = "conv_grouped", "conv_dense", "conv_1x1"
NORM, ELEMENTWISE, POOL, LINEAR = "norm", "elementwise", "pool", "linear"
OPTIMIZER, OTHER, IDLE = "optimizer", "other", "idle"
OP_CLASSES = (CONV_GROUPED, CONV_DENSE, CONV_1X1, NORM, ELEMENTWISE, POOL, LINEAR, OPTIMIZER, OTHER, IDLE)
LABELS = {
    CONV_GROUPED: "grouped convs", CONV_DENSE: "dense convs (3x3/7x7)", CONV_1X1: "1x1 convs", NORM: "norms",
    ELEMENTWISE: "elementwise ops", POOL: "pooling", LINEAR: "linear layers", OPTIMIZER: "the optimizer",
    OTHER: "other work", IDLE: "device idle time",
}
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CSV_COLUMNS = (
    "arch", "op_class", "time_ms", "share", "gflop", "tflop_per_s", "peak_fraction", "top_op",
    "step_ms_profiled", "step_ms_unprofiled", "img_per_s", "forward_gflop", "train_gflop", "flop_ratio",
    "peak_tflop_per_s", "peak_matmul_size", "precision", "channels_last", "batch", "steps", "device",
    "torch_version",
)

MODULE_RANGE = "cardinal.op "  # + "<class>: <module name>"
STEP_RANGE, OPTIMIZER_RANGE = "cardinal::step", "cardinal::optimizer"
PHASE_RANGES = ("cardinal::forward", "cardinal::loss", "cardinal::backward")
EVALUATE_PREFIX = "autograd::engine::evaluate_function: "
GRADIENT_SUM_OPS = ("aten::add", "aten::add_")  # where two gradient branches meet, inside the engine
ACCUMULATE_GRAD = "torch::autograd::AccumulateGrad"
_ELEMENTWISE_NAMES = {"add", "sub", "mul", "div", "relu", "threshold", "clamp", "clamp_min", "sigmoid", "silu",
                      "gelu", "hardtanh", "neg", "where", "addcmul", "addcdiv"}
_LINEAR_NAMES = {"addmm", "mm", "linear", "matmul", "bmm", "t"}


# --- operation classes -------------------------------------------------------------------------------------

def module_op_class(module: nn.Module) -> str | None:
    """The class of a leaf module's work; None for modules that do none (Identity)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:
            return CONV_GROUPED
        return CONV_1X1 if all(k == 1 for k in module.kernel_size) else CONV_DENSE
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        return NORM
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish,
                           nn.Dropout)):
        return ELEMENTWISE
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return POOL
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Identity):
        return None
    return OTHER


def op_name_class(name: str) -> str:
    """Class of an operator that runs outside any leaf module (the residual add, the loss), by its name.

    Accepts forward operator names (``aten::add_``) and autograd node names (``AddBackward0``).
    """
    base = re.sub(r"backward\d*$", "", name.lower().removeprefix("aten::")).strip("_")
    if base in _ELEMENTWISE_NAMES:
        return ELEMENTWISE
    if base in _LINEAR_NAMES:
        return LINEAR
    if "pool" in base:
        return POOL
    if "norm" in base:
        return NORM
    return OTHER


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


class OpClassScopes:
    """Knows which operation class is running, in the forward pass and in the backward pass.

    Forward hooks on every leaf module push its class (and, with ``ranges``, open a ``record_function`` range
    the profiler records). When a module returns, the autograd nodes it created (those between its outputs
    and its inputs) are claimed for its class by sequence number, which the profiler also records for each
    backward node it evaluates: that is how a backward kernel finds the class of its forward module.
    """

    def __init__(self, model: nn.Module, ranges: bool = True) -> None:
        self.model = model
        self.ranges = ranges
        self.node_class: dict[int, str] = {}
        self._stack: list[tuple[str, set, record_function | None]] = []
        self._handles: list = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            op_class = module_op_class(module) if not any(True for _ in module.children()) else None
            if op_class is not None:
                self._handles.append(module.register_forward_pre_hook(self._enter(op_class, name)))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, op_class: str, name: str):
        def hook(module: nn.Module, args) -> None:
            inputs = {t.grad_fn for t in _tensors(args) if t.grad_fn is not None}
            scope = record_function(f"{MODULE_RANGE}{op_class}: {name}") if self.ranges else None
            if scope is not None:
                scope.__enter__()
            self._stack.append((op_class, inputs, scope))
        return hook

    def _leave(self, module: nn.Module, args, output) -> None:
        op_class, inputs, scope = self._stack.pop()
        self._claim(output, inputs, op_class)
        if scope is not None:
            scope.__exit__(None, None, None)

    def _claim(self, output, inputs: set, op_class: str) -> None:
        pending = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        seen = set()
        while pending:
            node = pending.pop()
            if node is None or node in inputs or node in seen or node.name() == ACCUMULATE_GRAD:
                continue
            seen.add(node)
            sequence = node._sequence_nr()
            if sequence in self.node_class:  # created before this module ran
                continue
            self.node_class[sequence] = op_class
            pending.extend(parent for parent, _ in node.next_functions)

    def backward_class(self, sequence_nr: int, node_name: str) -> str:
        return self.node_class.get(sequence_nr) or op_name_class(node_name)

    def current(self) -> str | None:
        """The class running now: the backward node being evaluated, else the innermost forward module."""
        node = torch._C._current_autograd_node()
        if node is not None:
            return self.backward_class(node._sequence_nr(), node.name())
        return self._stack[-1][0] if self._stack else None


# --- FLOPs ---------------------------------------------------------------------------------------------------

def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient a convolution's backward computes (input, weight) costs what its forward does.

    torch's own formula builds the weight gradient from channel-transposed shapes that lose the group
    division, counting a grouped conv's weight gradient ``groups`` times over (torch <= 2.14).
    """
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _attributing(formula, scopes: OpClassScopes, totals: dict[str, float]):
    def count(*args, out_val=None, **kwargs):
        flops = formula(*args, out_val=out_val, **kwargs)
        totals[scopes.current() or OTHER] += flops
        return flops

    count._get_raw = True
    return count


def count_class_flops(model: nn.Module, batch: int, input_size: Sequence[int] = (3, 32, 32),
                      num_classes: int = 10, backward: bool = True) -> dict[str, float]:
    """FLOPs of one training step's forward and backward pass (or the forward alone), by operation class.

    Counted on a copy of the model on the meta device: no memory, no time, same operators.
    """
    probe = copy.deepcopy(model).to("meta").train()
    inputs = torch.zeros(batch, *input_size, device="meta")
    targets = torch.zeros(batch, dtype=torch.long, device="meta")
    totals: dict[str, float] = defaultdict(float)
    with OpClassScopes(probe, ranges=False) as scopes:
        formulas = dict(flop_registry)
        formulas[torch.ops.aten.convolution_backward] = shape_wrapper(conv_backward_flops)
        mapping = {op: _attributing(formula, scopes, totals) for op, formula in formulas.items()}
        with FlopCounterMode(display=False, custom_mapping=mapping), torch.set_grad_enabled(backward):
            loss = F.cross_entropy(probe(inputs).float(), targets)
            if backward:
                loss.backward()
    return dict(totals)


# --- peak -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peak:
    tflop_per_s: float
    size: int
    dtype: str


def measure_peak(device: torch.device, precision: str, repeats: int = 5, min_seconds: float = 0.1) -> Peak:
    """Best of ``repeats`` timings of a square matmul in the step's precision, grown until one takes a while.

    An fp32 step's convolutions run on a GPU's TF32 units wherever cuDNN allows them (torch's default), so the
    peak they are held against is the matmul's with TF32 allowed alike; else a convolution could show more
    than 100% of a strict-fp32 peak."""
    tf32 = device.type == "cuda" and PRECISIONS[precision] == torch.float32 and torch.backends.cudnn.allow_tf32
    matmul = torch.backends.cuda.matmul
    earlier, matmul.allow_tf32 = matmul.allow_tf32, matmul.allow_tf32 or tf32
    try:
        peak = _time_matmul_peak(device, PRECISIONS[precision], repeats, min_seconds)
    finally:
        matmul.allow_tf32 = earlier
    return replace(peak, dtype="tf32") if tf32 else peak


def _time_matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int, min_seconds: float) -> Peak:
    size, largest = 256, (16384 if device.type == "cuda" else 4096)

    def timed(a: torch.Tensor, b: torch.Tensor, count: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b)
        synchronize(device)
        return (time.perf_counter() - start) / count

    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        timed(a, b, 1)  # first call: library set-up
        seconds = timed(a, b, 1)
        if seconds >= min_seconds or size >= largest:
            break
        size *= 2
    count = max(1, math.ceil(min_seconds / max(seconds, 1e-9)))
    best = min(timed(a, b, count) for _ in range(repeats))
    return Peak(2 * size**3 / best / 1e12, size, str(dtype).removeprefix("torch."))


# --- one training step ------------------------------------------------------------------------------------------

class TrainingStep:
    """Forward, cross-entropy, backward and SGD step of the reference recipe on one synthetic batch."""

    def __init__(self, model: nn.Module, batch: int, precision: str, channels_last: bool,
                 device: torch.device, num_classes: int = 10) -> None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=memory_format).train()
        self.device = device
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
        self.inputs = self.inputs.contiguous(memory_format=memory_format)
        self.targets = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
        self.optimizer = build_optimizer(self.model, RECIPES["seed"])
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        dtype = PRECISIONS[precision] if precision != "no" else None
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

    def __call__(self) -> None:
        with record_function(STEP_RANGE):
            with record_function(PHASE_RANGES[0]), self.autocast():
                logits = self.model(self.inputs)
            with record_function(PHASE_RANGES[1]):
                loss = F.cross_entropy(logits.float(), self.targets)
            with record_function(PHASE_RANGES[2]):
                self.scaler.scale(loss).backward()
            with record_function(OPTIMIZER_RANGE):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            synchronize(self.device)  # on a GPU the step's range then spans its kernels

    def timed(self) -> float:
        """Seconds for one step, synchronised."""
        synchronize(self.device)
        start = time.perf_counter()
        self()
        return time.perf_counter() - start


# --- attributing profiled time --------------------------------------------------------------------------------

def _scope_of(event, inherited: str | None, in_engine: bool, scopes: OpClassScopes) -> str | None:
    name = event.name
    if name.startswith(MODULE_RANGE):
        return name[len(MODULE_RANGE):].split(":", 1)[0]
    if name.startswith(EVALUATE_PREFIX):
        return scopes.backward_class(event.sequence_nr, name[len(EVALUATE_PREFIX):])
    if name == OPTIMIZER_RANGE:
        return OPTIMIZER
    if in_engine and name in GRADIENT_SUM_OPS:
        return ELEMENTWISE
    if inherited is not None or name == STEP_RANGE or name in PHASE_RANGES:
        return inherited
    return op_name_class(name)  # an operator outside every module: the residual add, the loss


def attribute_step(events, scopes: OpClassScopes, on_device: bool):
    """Self time (µs) of every operator of one profiled step, by class and by (class, operator name).

    On the CPU the tree under the step's range is walked, so the classes add up to the step's wall time;
    on a GPU each operator's own kernels count, on whichever thread launched them, and the rest of the
    step's wall time is ``idle``.
    """
    by_class: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    roots = [e for e in cpu_events if e.cpu_parent is None and (on_device or e.name == STEP_RANGE)]
    pending = [(root, None, False) for root in roots]
    while pending:
        event, inherited, in_engine = pending.pop()
        op_class = _scope_of(event, inherited, in_engine, scopes)
        own = sum(k.duration for k in event.kernels) if on_device else event.self_cpu_time_total
        key = (op_class or OTHER, event.name)
        by_class[key[0]] += own
        by_op[key][0] += own
        by_op[key][1] += 1
        engine = event.name.startswith(EVALUATE_PREFIX)
        pending.extend((child, op_class, engine) for child in event.cpu_children)
    if on_device:
        wall = sum(e.cpu_time_total for e in cpu_events if e.name == STEP_RANGE)
        by_class[IDLE] += max(0.0, wall - sum(by_class.values()))
    return dict(by_class), {key: tuple(value) for key, value in by_op.items()}


# --- profiling an architecture ----------------------------------------------------------------------------------

@dataclass
class ArchProfile:
    arch: str
    classes: pd.DataFrame  # one row per class: time_ms, share, gflop, tflop_per_s, peak_fraction, top_op
    ops: pd.DataFrame  # op_class, name, time_ms and calls per step
    step_ms_unprofiled: float  # the fastest of the unprofiled steps
    forward_gflop: float
    batch: int
    unprofiled_ms: list[float] = field(default_factory=list)  # every unprofiled step, in order

    @property
    def step_ms_profiled(self) -> float:
        return float(self.classes["time_ms"].sum())

    @property
    def train_gflop(self) -> float:
        return float(self.classes["gflop"].sum())

    @property
    def flop_ratio(self) -> float:
        """Counted training FLOPs over three forward passes (1.0 = backward costs exactly twice the forward)."""
        return self.train_gflop / (3 * self.forward_gflop)

    @property
    def img_per_s(self) -> float:
        return self.batch / (self.step_ms_unprofiled / 1e3)

    def row(self, op_class: str) -> pd.Series:
        return self.classes.set_index("op_class").loc[op_class]


@dataclass
class _Contender:
    """One arch being profiled: its training step, its FLOPs, and the fastest steps seen so far."""

    arch: str
    step: TrainingStep
    flops: dict[str, float]
    forward_gflop: float
    unprofiled_ms: list[float] = field(default_factory=list)
    best: tuple[float, dict, dict] | None = None  # total µs, by class, by operator of the fastest profiled step

    def measure_pair(self, device: torch.device, trace: Path | None) -> None:
        self.unprofiled_ms.append(1e3 * self.step.timed())
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with native_noise_filtered(), OpClassScopes(self.step.model) as scopes, \
                profile(activities=activities) as profiler:
            self.step()
        classes, ops = attribute_step(profiler.events(), scopes, on_device=device.type != "cpu")
        total = sum(classes.values())
        if self.best is None or total < self.best[0]:  # noise on a shared machine only slows a step
            self.best = (total, classes, ops)
            if trace is not None:
                write_trace(profiler, trace / f"{self.arch}.pt.trace.json")

    def result(self, peak: Peak, device: torch.device) -> ArchProfile:
        _, by_class, by_op = self.best
        ops = pd.DataFrame(
            [{"op_class": c, "name": n, "time_ms": t / 1e3, "calls": calls} for (c, n), (t, calls) in by_op.items()]
        ).sort_values("time_ms", ascending=False, ignore_index=True)
        return ArchProfile(self.arch, class_table(by_class, self.flops, peak, ops, device), ops,
                           min(self.unprofiled_ms), self.forward_gflop, self.step.inputs.shape[0],
                           self.unprofiled_ms)


def profile_archs(archs: Sequence[str], batch: int, precision: str, channels_last: bool, steps: int, warmup: int,
                  device: torch.device, trace: Path | None = None, peak: Peak | None = None,
                  on_round=None) -> tuple[list[ArchProfile], Peak]:
    """Profile every arch in rounds: each round times one unprofiled and one profiled step of each arch, in
    alternating order, then (unless ``peak`` is given) the peak matmul; the fastest of each counts.

    Interleaving keeps archs comparable on a machine whose load changes from minute to minute.
    """
    contenders = []
    for arch in archs:
        torch.manual_seed(0)
        model = build_model(arch)
        contenders.append(_Contender(arch, TrainingStep(model, batch, precision, channels_last, device),
                                     count_class_flops(model, batch), count_forward_flops(model) * batch / 1e9))
    for contender in contenders:
        for _ in range(warmup):
            contender.step()
    peaks = [peak] if peak is not None else [measure_peak(device, precision)]
    for index in range(steps):
        for contender in contenders if index % 2 == 0 else contenders[::-1]:
            contender.measure_pair(device, trace)
        if peak is None:
            peaks.append(measure_peak(device, precision))
        if on_round is not None:
            on_round(index, contenders)
    best_peak = max(peaks, key=lambda p: p.tflop_per_s)
    return [contender.result(best_peak, device) for contender in contenders], best_peak


def class_table(microseconds: dict[str, float], flops: dict[str, float], peak: Peak,
                ops: pd.DataFrame, device: torch.device) -> pd.DataFrame:
    classes = [c for c in OP_CLASSES if c != IDLE or device.type != "cpu"]
    total_ms = sum(microseconds.values()) / 1e3
    rows = []
    for op_class in classes:
        time_ms = microseconds.get(op_class, 0.0) / 1e3
        gflop = flops.get(op_class, 0.0) / 1e9
        tflop_per_s = gflop / time_ms if time_ms > 0 else 0.0  # GFLOP per ms = TFLOP per s
        own = ops[ops["op_class"] == op_class]
        rows.append({"op_class": op_class, "time_ms": time_ms, "share": time_ms / total_ms if total_ms else 0.0,
                     "gflop": gflop, "tflop_per_s": tflop_per_s, "peak_fraction": tflop_per_s / peak.tflop_per_s,
                     "top_op": own["name"].iloc[0] if len(own) and own["time_ms"].iloc[0] > 0 else ""})
    return pd.DataFrame(rows)


def csv_frame(profiles: Sequence[ArchProfile], peak: Peak, precision: str, channels_last: bool, steps: int,
              device_label: str) -> pd.DataFrame:
    frames = []
    for result in profiles:
        frame = result.classes.copy()
        frame.insert(0, "arch", result.arch)
        frame = frame.assign(
            step_ms_profiled=result.step_ms_profiled, step_ms_unprofiled=result.step_ms_unprofiled,
            img_per_s=result.img_per_s, forward_gflop=result.forward_gflop, train_gflop=result.train_gflop,
            flop_ratio=result.flop_ratio, peak_tflop_per_s=peak.tflop_per_s, peak_matmul_size=peak.size,
            precision=precision, channels_last=channels_last, batch=result.batch, steps=steps,
            device=device_label, torch_version=torch.__version__)
        frames.append(frame[list(CSV_COLUMNS)])
    return pd.concat(frames, ignore_index=True)


# --- what to show ---------------------------------------------------------------------------------------------

def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}" if value >= 0.001 or value == 0 else f"{value:.1e}"


def _signed(value: float) -> str:
    return ("-" if value < 0 else "+") + _num(abs(value))


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """Classes with any time or FLOPs (all rows of the CSV are kept; the tables skip empty ones)."""
    return frame[(frame["time_ms"] > 0) | (frame["gflop"] > 0)]


def arch_table(result: ArchProfile, title: str) -> Table:
    table = Table(title=title)
    for header in ("class", "ms/step", "share", "GFLOP", "TFLOP/s", "% peak"):
        table.add_column(header, justify="left" if header == "class" else "right")
    for row in _shown(result.classes).itertuples():
        counted = row.gflop > 0
        table.add_row(row.op_class, _num(row.time_ms), f"{row.share:.1%}", _num(row.gflop) if counted else "-",
                      _num(row.tflop_per_s) if counted else "-", f"{row.peak_fraction:.1%}" if counted else "-")
    table.add_row("total", _num(result.step_ms_profiled), "100%", _num(result.train_gflop), "", "",
                  style="bold", end_section=True)
    return table


def comparison_tables(profiles: Sequence[ArchProfile]) -> tuple[Table, Table]:
    """Time per step (with share) and % of peak, one column per arch, classes in rows."""
    classes = [c for c in OP_CLASSES if any(c in set(_shown(p.classes)["op_class"]) for p in profiles)]
    time_table = Table(title="Time per step, ms (share of step)")
    peak_table = Table(title="Achieved FLOP/s, % of peak")
    for table in (time_table, peak_table):
        table.add_column("class")
        for result in profiles:
            table.add_column(result.arch, justify="right")
    pair = len(profiles) == 2
    if pair:
        time_table.add_column("difference", justify="right")
    for op_class in classes:
        rows = [p.row(op_class) for p in profiles]
        cells = [f"{_num(r.time_ms)} ({r.share:.0%})" if r.time_ms > 0 else "-" for r in rows]
        if pair:
            cells.append(_signed(rows[1].time_ms - rows[0].time_ms))
        time_table.add_row(op_class, *cells)
        if any(r.gflop > 0 for r in rows):
            peak_table.add_row(op_class, *(f"{r.peak_fraction:.1%}" if r.gflop > 0 else "-" for r in rows))
    totals = [_num(p.step_ms_profiled) for p in profiles]
    if pair:
        totals.append(_signed(profiles[1].step_ms_profiled - profiles[0].step_ms_profiled))
    time_table.add_row("total", *totals, style="bold")
    return time_table, peak_table


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.1%}"


def _at_peak(row: pd.Series) -> str:
    return f" at {_percent(row.peak_fraction)} of peak" if row.gflop > 0 else ""


def takeaways(profiles: Sequence[ArchProfile]) -> list[str]:
    lines = []
    for result in profiles:
        shown = _shown(result.classes).set_index("op_class")
        top = shown["time_ms"].idxmax()
        noted = [top] + ([CONV_GROUPED] if CONV_GROUPED in shown.index and top != CONV_GROUPED else [])
        for op_class in noted:
            row = shown.loc[op_class]
            kernel = f" (mostly in {row.top_op})" if op_class.startswith("conv") and row.top_op else ""
            lines.append(f"{result.arch} spends {_percent(row.share)} of its step in {LABELS[op_class]}"
                         f"{_at_peak(row)}{kernel}.")
        convs = [c for c in (CONV_DENSE, CONV_1X1, CONV_GROUPED) if c in shown.index and shown.loc[c, "gflop"] > 0]
        if convs:
            rates = ", ".join(f"{LABELS[c]} {_percent(shown.loc[c, 'peak_fraction'])}" for c in convs)
            lines.append(f"{result.arch}'s convolutions reach: {rates} of peak.")
    base = profiles[0]
    for other in profiles[1:]:
        lines.append(f"{other.arch} trains at {other.img_per_s / base.img_per_s:.2f}x the img/s of {base.arch} "
                     f"({_num(other.img_per_s)} vs {_num(base.img_per_s)} img/s without the profiler) for "
                     f"{other.train_gflop / base.train_gflop:.2f}x its FLOPs.")
        gap = other.step_ms_profiled - base.step_ms_profiled
        deltas = {c: other.row(c).time_ms - base.row(c).time_ms for c in OP_CLASSES if c in set(base.classes.op_class)}
        largest = sorted(deltas, key=lambda c: -abs(deltas[c]))[:3]
        parts = ", ".join(f"{LABELS[c]} {_signed(deltas[c])} ms" for c in largest)
        lines.append(f"{other.arch}'s profiled step is {_signed(gap)} ms against {base.arch}'s; "
                     f"largest differences: {parts}.")
        grouped, dense = other.row(CONV_GROUPED), base.row(CONV_DENSE)
        if grouped.gflop > 0 and dense.gflop > 0 and dense.tflop_per_s > 0:
            would = grouped.gflop / dense.tflop_per_s
            lines.append(f"At {base.arch}'s dense-conv rate ({_num(dense.tflop_per_s)} TFLOP/s) {other.arch}'s "
                         f"grouped convs would take {_num(would)} ms per step instead of {_num(grouped.time_ms)} ms.")
    above = sorted({f"{p.arch} {r.op_class}" for p in profiles for r in p.classes.itertuples()
                    if r.gflop > 0 and r.peak_fraction > 1})
    if above:
        lines.append(f"Above the matmul peak: {', '.join(above)}. The square matmul is not this device's fastest "
                     "path in this precision, so read % of peak as a comparison between classes, not as headroom.")
    return lines


def report(console: Console, profiles: Sequence[ArchProfile], peak: Peak, heading: str) -> None:
    for result in profiles:
        console.print(arch_table(result, f"{result.arch}: {heading}"))
        ratio = result.step_ms_profiled / result.step_ms_unprofiled
        _bullets(console, [f"{_num(result.step_ms_profiled)} ms profiled (sum of classes), "
                           f"{_num(result.step_ms_unprofiled)} ms unprofiled ({ratio:.2f}x)"], "  step:")
        _bullets(console, [f"{_num(result.train_gflop)} GFLOP = {result.flop_ratio:.3f} x 3 x forward "
                           f"({_num(result.forward_gflop)} GFLOP)"], "  FLOPs:")
        if abs(ratio - 1) > 0.15:
            warning = ("profiled and unprofiled steps differ by more than 15% (profiler overhead or a change "
                       "in the machine's load): read the ms with care")
            _bullets(console, [warning], "  note:")
    if len(profiles) > 1:
        for table in comparison_tables(profiles):
            console.print(table)
    _bullets(console, [f"{_num(peak.tflop_per_s)} TFLOP/s ({peak.dtype} {peak.size}x{peak.size} matmul, best of "
                       "5 before the rounds and after each, this process)"], "Peak:")
    console.print("Takeaways")
    _bullets(console, takeaways(profiles), "-")


# What the profiler's native library writes to stderr on every start and stop, and on a machine without a
# GPU: status lines, not failures. Anything else it writes is passed on.
NATIVE_NOISE = re.compile(r"^(USDT:.*profiler_(start|stop)|ERROR:.*gpuGetDeviceCount failed|"
                          r"(WARNING|INFO):.*(CUPTI|cupti|libkineto|ActivityProfiler)|"
                          r"ERROR:.*Failed to write to log file)")  # write_trace says so in one line


def write_trace(profiler, path: Path) -> None:
    """The step's Chrome trace, swapped in whole. The native writer stages it in ``<name>.tmp`` and, when the
    write fails (a full disk), only logs it and leaves that file: here that is one error, and an earlier
    trace of the arch is kept."""
    with atomic_target(path) as temp:
        staged = temp.with_name(temp.name + ".tmp")
        with native_noise_filtered():
            profiler.export_chrome_trace(str(temp))
        if staged.exists() or not temp.is_file():
            staged.unlink(missing_ok=True)
            raise CardinalError(f"cannot write {path}: the trace writer failed (is the disk full?)")


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Catch what native code writes to file descriptor 2 meanwhile; pass on all but ``NATIVE_NOISE``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded, closed): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not NATIVE_NOISE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _bullets(console: Console, lines: Sequence[str], mark: str) -> None:
    """Lines wrapped to the console, continued under their own text rather than under the mark."""
    indent = " " * (len(mark) + 1)
    for line in lines:
        console.print(wrap(line, console, f"{mark} ", indent), highlight=False, soft_wrap=True)


def plot(profiles: Sequence[ArchProfile], path: Path, heading: str) -> None:
    """Stacked bars of ms per step by class, beside each class's % of peak."""
    plt = pyplot()
    figure, (stacked, peaks) = plt.subplots(1, 2, figsize=(13, 4.8))
    archs = [p.arch for p in profiles]
    bottoms = [0.0] * len(profiles)
    classes = [c for c in OP_CLASSES if any(p.row(c).time_ms > 0 for p in profiles if c in set(p.classes.op_class))]
    colors = plt.get_cmap("tab10")
    for index, op_class in enumerate(classes):
        values = [p.row(op_class).time_ms if op_class in set(p.classes.op_class) else 0.0 for p in profiles]
        stacked.bar(archs, values, bottom=bottoms, label=op_class, color=colors(index % 10))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    stacked.set(title="Where a training step's time goes", ylabel="ms per step")
    handles, labels = stacked.get_legend_handles_labels()
    stacked.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    counted = [c for c in classes if any(p.row(c).gflop > 0 for p in profiles)]
    width = 0.8 / max(1, len(profiles))
    for offset, result in enumerate(profiles):
        positions = [i + offset * width for i in range(len(counted))]
        peaks.bar(positions, [100 * result.row(c).peak_fraction for c in counted], width, label=result.arch)
    peaks.set_xticks([i + width * (len(profiles) - 1) / 2 for i in range(len(counted))], counted)
    peaks.set(title="Achieved FLOP/s", ylabel="% of measured matmul peak")
    peaks.legend(fontsize=8)
    figure.suptitle(heading, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


# --- command line ------------------------------------------------------------------------------------------------

def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m cardinal.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "resnext50_32x4d"], choices=list_archs(),
                        metavar="ARCH", help="architectures")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"images per training step (default: {DEFAULT_BATCH['cuda']} on CUDA, where a smaller "
                             f"batch leaves the GPU idle between kernel launches; {DEFAULT_BATCH['cpu']} elsewhere)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="no",
                        help="autocast precision of the step (and of the peak matmul)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="rounds; each times one unprofiled and one profiled step of every arch, and the "
                             "fastest of each counts")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="unmeasured steps first")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", type=Path, default=Path("profile.csv"), help="CSV file to write")
    parser.add_argument("--plot", type=Path, default=None, help="PNG with the stacked time per class")
    parser.add_argument("--trace", type=Path, default=None,
                        help="folder for each arch's Chrome/TensorBoard trace of the profiled step reported")
    return parser


def _check_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise CardinalError(f"{flag} {path} is a file; give a folder")
    probe_writable(path / "trace", named=path)


DEFAULT_BATCH = {"cuda": 512, "cpu": 128}


def default_batch(device: torch.device) -> int:
    return DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]


def _device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(1, device=device)
    except (RuntimeError, ValueError) as error:
        raise CardinalError(f"device {name!r} is not usable: {str(error).splitlines()[0]}") from None
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = _device(args.device)
    args.batch_size = args.batch_size or default_batch(device)
    check_output_file(args.output, "--output")
    if args.plot is not None:
        pyplot()  # a missing matplotlib is reported before minutes of measuring
        check_output_file(args.plot, "--plot")
    if args.trace is not None:
        _check_folder(args.trace, "--trace")
    from cardinal.train import device_name

    label = device_name(device)
    layout = "channels_last" if args.channels_last else "NCHW"
    heading = f"{label}, {args.precision if args.precision != 'no' else 'fp32'}, {layout}, batch {args.batch_size}"
    console = make_console()
    console.print(wrap(f"profiling on {heading}: {args.warmup} warm-up steps, then {args.steps} rounds of one "
                       "unprofiled and one profiled step per arch", console, rest="  "), highlight=False,
                  soft_wrap=True)
    def on_round(index: int, contenders) -> None:
        times = ", ".join(f"{c.arch} {_num(c.unprofiled_ms[-1])} ms" for c in contenders)
        console.print(wrap(f"round {index + 1}/{args.steps}: unprofiled {times}", console, "  ", "    "),
                      highlight=False, soft_wrap=True)

    profiles, peak = profile_archs(list(dict.fromkeys(args.archs)), args.batch_size, args.precision,
                                   args.channels_last, args.steps, args.warmup, device, args.trace, on_round=on_round)
    frame = csv_frame(profiles, peak, args.precision, args.channels_last, args.steps, label)
    try:
        write_csv(frame, args.output)
    except OSError as error:
        raise cannot_write(args.output, error) from None
    report(console, profiles, peak, heading)
    console.print(f"written {args.output}", highlight=False)
    if args.plot is not None:
        plot(profiles, args.plot, heading)
        console.print(f"plot written to {args.plot}", highlight=False)
    if args.trace is not None:
        console.print(wrap(f"traces written to {args.trace}/ (chrome://tracing, ui.perfetto.dev or TensorBoard)",
                           console, rest="  "), highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    run(main)
