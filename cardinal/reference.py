"""Any registered architecture built from torchvision's own ResNet and Bottleneck classes.

The benchmark measures cardinal's stack against this, so a speed difference between the two is a
difference of implementation, not of architecture. torchvision's ResNet fixes the stem width and the
per-stage planes at 64 * 2**i; stages are rebuilt here with its own ``_make_layer``, choosing
``base_width`` per stage where a registered arch fixes the grouped-conv width. Parameter names match
cardinal's, so the same state_dict loads into both.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck
from torchvision.models.resnet import ResNet

from cardinal.models import arch_settings, check_stem_init


def torchvision_model(arch: str, num_classes: int = 10, stem: str = "cifar", stem_init: str = "conv-default") -> ResNet:
    """``stem_init="conv-default"`` leaves the swapped-in stem convolution as nn.Conv2d starts it, as swapping
    a CIFAR stem into torchvision's built model does; every other convolution starts as torchvision's do."""
    check_stem_init(stem_init)
    settings = arch_settings(arch)
    layers = settings["layers"]
    groups = settings.get("groups", 1)
    width_per_group = settings.get("width_per_group", 64)
    stem_width = settings.get("stem_width", 64)
    base_planes = settings.get("base_planes", 64)
    fixed_width = settings.get("bottleneck_width")

    model = ResNet(TorchvisionBottleneck, list(layers), num_classes=num_classes, groups=groups,
                   width_per_group=width_per_group)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem_width)
    model.inplanes = stem_width
    for index, depth in enumerate(layers):
        planes = base_planes * 2**index
        # torchvision's width rule: int(planes * base_width / 64) * groups
        model.base_width = fixed_width * 64 / (planes * groups) if fixed_width else width_per_group
        stage = model._make_layer(TorchvisionBottleneck, planes, depth, stride=1 if index == 0 else 2)
        setattr(model, f"layer{index + 1}", stage)
    model.fc = nn.Linear(model.inplanes, num_classes)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and (module is not model.conv1 or stem_init == "kaiming"):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model
