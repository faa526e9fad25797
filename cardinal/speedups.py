"""Which speed-ups a run uses on its device: torch.compile and its mode, the fused optimizer step, cuDNN's
algorithm search. One place decides each, from the flags and the device, before the model is prepared.

Compilation by default (``--compile`` not given) is on for CUDA runs long enough to win its cost back, and
off elsewhere: on a CPU it costs minutes of start-up for these nets. On an H200 (README, Speed and
precision) a compiled resnet50 run spent about 100 s compiling in its first epoch (its training shapes and
evaluation's, a cold cache), then trained at 23,166 against 15,904 img/s eager at batch 512: about 20 us
saved an image, so compiling pays from about 5 million images (125 epochs of 40,000), not in the short
runs this package is mostly used for. The mode by default is ``reduce-overhead`` (CUDA graphs: one
launch replays a whole forward or backward) for one CUDA process, since a ResNet-50 step at batch 128
leaves the GPU idle most of the time while the CPU launches kernels one by one; with several processes it
is ``default``: CUDA graphs and DDP's gradient hooks on BatchNorm modules are known not to mix (pytorch
issues 128218, 139207). Shapes are compiled static (``dynamic=False``): every batch of an epoch but the
last has the same shape, the last, shorter one runs eagerly (``engine.train_epoch``'s ``odd_batch_model``),
and evaluation pads its last batch to keep one shape.

``CARDINAL_COMPILE_BACKEND`` (e.g. ``aot_eager``) replaces inductor: tests trace the same graphs on a
CPU without generating and compiling C++ (the mode then does not apply).
"""

from __future__ import annotations

import os
from typing import Optional, Union
from weakref import WeakKeyDictionary

import torch
from torch import nn

from cardinal.cli import CardinalError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs on a GPU
AUTO = "auto"
COMPILE_MODE_CHOICES = (AUTO, *COMPILE_MODES)  # what --compile-mode accepts
BACKEND_ENV = "CARDINAL_COMPILE_BACKEND"
ACCELERATE_BACKEND_ENV = "ACCELERATE_DYNAMO_BACKEND"
COMPILE_PAYS_FROM_IMAGES = 5_000_000  # training images a run must plan for compiling to pay (see above)

_EVAL_COMPILED: "WeakKeyDictionary[nn.Module, nn.Module]" = WeakKeyDictionary()

Compile = Union[bool, str, None]  # requested: None (decide by device), False, True / "auto", or a mode


def resolve_compile(requested: Compile, device_type: str, world: int = 1,
                    planned_images: Optional[int] = None, grad_accum: int = 1) -> Union[bool, str]:
    """False (eager) or the torch.compile mode the run will use.

    ``None`` compiles on CUDA when the run plans at least ``COMPILE_PAYS_FROM_IMAGES`` training images
    (``planned_images``: epochs x training images; None: a step with no run around it, as in the bench), or
    wherever an accelerate config asked for a dynamo backend; ``True`` / ``"auto"`` compile with the mode
    that suits the device, the number of processes and the micro-batches a step takes: CUDA graphs own the
    gradients a compiled backward makes, and the next micro-batch's replay overwrites them before they are
    added up, so a run that accumulates gradients (``grad_accum`` > 1) on CUDA compiles without them.
    """
    if requested is None:
        from_accelerate = os.environ.get(ACCELERATE_BACKEND_ENV, "no").lower() not in ("", "no")
        pays = planned_images is None or planned_images >= COMPILE_PAYS_FROM_IMAGES
        requested = (device_type == "cuda" and pays) or from_accelerate
    if requested is False:
        return False
    if requested in (True, AUTO):
        graphs_fit = device_type == "cuda" and world == 1 and grad_accum == 1
        return "reduce-overhead" if graphs_fit else "default"
    if requested not in COMPILE_MODES:
        raise CardinalError(f"unknown compile mode {requested!r}; choose one of: {', '.join(COMPILE_MODE_CHOICES)}")
    if requested in CUDA_GRAPH_MODES and device_type == "cuda" and grad_accum > 1:
        raise CardinalError(f"compile mode {requested} (--compile-mode, or a resumed run's config.json) captures "
                            "CUDA graphs, which overwrite each micro-batch's gradients before --grad-accum "
                            f"{grad_accum} adds them up; use --compile-mode default or max-autotune-no-cudagraphs, "
                            "or --grad-accum 1")
    return requested


def compile_request(flag: Optional[bool], mode: str = AUTO) -> Compile:
    """What ``--compile`` / ``--no-compile`` (``flag``, None when neither is given) and ``--compile-mode`` ask
    for: False, None (decide by device), or a mode (``"auto"``: decide the mode by device)."""
    if flag is False:
        return False
    return mode if flag or mode != AUTO else None


def compile_backend() -> str:
    return os.environ.get(BACKEND_ENV, "") or "inductor"


def compile_kwargs(mode: str) -> dict:
    """torch.compile's arguments for ``mode``: static shapes; the mode only where the backend is inductor."""
    backend = compile_backend()
    kwargs = {"backend": backend, "dynamic": False}
    if backend == "inductor":
        kwargs["mode"] = mode
    return kwargs


def fused_optimizer(device_type: str, precision: Optional[str] = None) -> Optional[bool]:
    """The optimizer's fused kernel (SGD's or AdamW's: one launch for every parameter's update) on CUDA;
    torch's own default elsewhere.

    Not under fp16: GradScaler hands a fused optimizer its inf check to skip inside the kernel, so the step
    always looks taken, and the skipped_steps column and the LR schedule (which counts applied steps) would
    count skipped steps as applied."""
    return True if device_type == "cuda" and precision != "fp16" else None


def tune_kernels(device_type: str) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape: every step has the same shapes."""
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_model(model: nn.Module, plain: nn.Module, mode: str) -> nn.Module:
    """A compiled wrapper of the prepared ``model`` for training steps, sharing its parameters; ``model``
    itself stays as it was, so checkpoints, the EMA and exports read the same whether a run compiled or not.
    Without DDP (``model`` is ``plain``) evaluation reuses the wrapper (see ``compiled_for_eval``)."""
    compiled = torch.compile(model, **compile_kwargs(mode))
    if model is plain:
        _EVAL_COMPILED[plain] = compiled
    return compiled


def is_compiled(module: nn.Module) -> bool:
    """Whether calling ``module`` runs through torch.compile."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def compiled_for_eval(module: nn.Module, mode: str) -> nn.Module:
    """A compiled wrapper of ``module``, made once and kept as long as the module lives: the training one
    without DDP; else one of its own (for the weight average, or for the module inside DDP, whose compiled
    wrapper must not run in evaluation: DDP's forward would wait for the other processes, whose shards may
    be one batch shorter)."""
    if is_compiled(module):
        return module
    compiled = _EVAL_COMPILED.get(module)
    if compiled is None:
        compiled = torch.compile(module, **compile_kwargs(mode))
        _EVAL_COMPILED[module] = compiled
    return compiled
