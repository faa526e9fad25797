"""cardinal: honest, fast comparisons of convolutional architectures on CIFAR."""

from cardinal.cost import ModelCost, count_forward_flops, count_parameters, model_cost
from cardinal.models import ARCHS, Bottleneck, BottleneckStack, arch_settings, build_model, list_archs

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "Bottleneck",
    "BottleneckStack",
    "ModelCost",
    "arch_settings",
    "build_model",
    "count_forward_flops",
    "count_parameters",
    "list_archs",
    "model_cost",
    "__version__",
]
