"""One bottleneck stack for ResNet, ResNeXt and Wide ResNet, plus the registry of named settings.

ResNeXt is not a separate model here: it is the same stack with more groups and a different width per
group. Keeping one implementation is what makes a comparison between the two honest: any speed or
accuracy gap comes from the settings, never from two code paths written differently.

Parameter names follow torchvision's ``resnet.py`` so its state_dicts load unchanged (ImageNet stem).
This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

STEMS = ("cifar", "imagenet")
# How the stem convolution starts: "kaiming" as every other convolution (torchvision's ResNet init, normal with
# std sqrt(2 / fan_out)); "conv-default" as a fresh nn.Conv2d (uniform within 1 / sqrt(fan_in)), which is what
# a CIFAR stem swapped into torchvision's built model keeps: about 1.9 times larger weights for the CIFAR stem,
# so, with BN after it, a smaller effective step for the stem.
STEM_INITS = ("kaiming", "conv-default")


def check_stem_init(stem_init: str) -> None:
    if stem_init not in STEM_INITS:
        raise ValueError(f"unknown stem_init {stem_init!r}; choose one of {', '.join(STEM_INITS)}")


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped, carries the stride) -> 1x1 expand, plus the shortcut.

    ``width`` is the channel count of the grouped 3x3 conv; the stack computes it, so the same block
    serves ResNet (groups=1), ResNeXt (groups=32) and the flat-width study variant.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if width % groups:
            raise ValueError(f"bottleneck width {width} is not divisible by groups {groups}")
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm_layer(out_channels),
            )

    def zero_init_last(self) -> None:
        """Start the residual branch at zero so each block begins as the identity (Goyal et al. 2017)."""
        if isinstance(self.bn3, nn.modules.batchnorm._NormBase) and self.bn3.weight is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)  # in place: one activation less
        return self.relu(out)


class BottleneckStack(nn.Module):
    """Stem, four stages of bottleneck blocks, global average pool, linear classifier.

    The grouped-conv width of stage ``i`` is ``int(planes_i * width_per_group / 64) * groups`` with
    ``planes_i = base_planes * 2**i`` (torchvision's rule), unless ``bottleneck_width`` fixes it for
    every stage. Stage outputs are ``4 * planes_i`` channels.
    """

    expansion = 4

    def __init__(
        self,
        layers: Sequence[int],
        groups: int = 1,
        width_per_group: int = 64,
        bottleneck_width: Optional[int] = None,
        stem_width: int = 64,
        base_planes: int = 64,
        stem: str = "cifar",
        num_classes: int = 10,
        zero_init_residual: bool = False,
        norm_layer: Optional[NormLayer] = None,
        stem_init: str = "kaiming",
    ) -> None:
        super().__init__()
        layers = tuple(int(d) for d in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four positive stage depths, got {layers}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        check_stem_init(stem_init)
        if min(groups, width_per_group, stem_width, base_planes, num_classes) < 1:
            raise ValueError("groups, width_per_group, stem_width, base_planes and num_classes must be >= 1")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.stem = stem

        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)

        in_channels = stem_width
        stages: List[nn.Sequential] = []
        for index, depth in enumerate(layers):
            planes = base_planes * 2**index
            width = bottleneck_width or int(planes * (width_per_group / 64.0)) * groups
            out_channels = planes * self.expansion
            blocks = []
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(Bottleneck(in_channels, width, out_channels, stride, groups, norm_layer))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels
        self._init_weights(zero_init_residual)
        if stem_init == "conv-default":
            self.conv1.reset_parameters()

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    module.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# Each architecture is a plain dict of BottleneckStack settings; "summary" is for listings only.
ARCHS: Dict[str, Dict[str, Any]] = {
    "resnet50": dict(layers=(3, 4, 6, 3), summary="ResNet-50 (He et al. 2016)"),
    "resnext50_32x4d": dict(
        layers=(3, 4, 6, 3), groups=32, width_per_group=4, summary="ResNeXt-50 32x4d (Xie et al. 2017)"
    ),
    "resnet101": dict(layers=(3, 4, 23, 3), summary="ResNet-101"),
    "resnet152": dict(layers=(3, 8, 36, 3), summary="ResNet-152"),
    "resnext101_32x8d": dict(layers=(3, 4, 23, 3), groups=32, width_per_group=8, summary="ResNeXt-101 32x8d"),
    "wide_resnet50_2": dict(layers=(3, 4, 6, 3), width_per_group=128, summary="Wide ResNet-50-2"),
    "resnext50_flat128": dict(
        layers=(3, 4, 6, 3),
        groups=32,
        bottleneck_width=128,
        summary="ResNeXt-50 with a 128-wide grouped conv in every stage (the reference study's 'ResNeXt-50')",
    ),
    "tiny_resnet": dict(
        layers=(1, 1, 1, 1), stem_width=16, base_planes=16, summary="4-block ResNet for tests and smoke runs"
    ),
    "tiny_resnext": dict(
        layers=(1, 1, 1, 1),
        groups=4,
        width_per_group=16,
        stem_width=16,
        base_planes=16,
        summary="4-block ResNeXt (4 groups) for tests and smoke runs",
    ),
}

_STACK_OPTIONS = (
    "layers", "groups", "width_per_group", "bottleneck_width", "stem_width", "base_planes",
    "stem", "num_classes", "zero_init_residual", "norm_layer", "stem_init",
)


def list_archs() -> List[str]:
    """Names accepted by :func:`build_model`, in registry order."""
    return list(ARCHS)


def arch_settings(name: str) -> Dict[str, Any]:
    """The registry entry for ``name`` (a copy), or a ValueError that lists the valid names."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")
    return dict(ARCHS[name])


def build_model(name: str, num_classes: int = 10, stem: str = "cifar", **overrides: Any) -> BottleneckStack:
    """Build a registered architecture; ``overrides`` replace any BottleneckStack setting.

    >>> model = build_model("resnext50_32x4d", num_classes=100, zero_init_residual=True)
    """
    settings = arch_settings(name)
    settings.pop("summary", None)
    unknown = sorted(set(overrides) - set(_STACK_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(_STACK_OPTIONS)}")
    settings.update(num_classes=num_classes, stem=stem)
    settings.update(overrides)
    return BottleneckStack(**settings)
