"""The one bottleneck stack: exact sizes, torchvision equivalence, layouts, registry behaviour."""

import pytest
import torch
import torchvision

import cardinal
from cardinal import Bottleneck, BottleneckStack, build_model, list_archs, model_cost

CIFAR_SIZES = {
    # arch: (parameters, GFLOPs at 32x32) with the CIFAR stem and 10 classes
    "resnet50": (23_520_842, 2.60),
    "resnext50_32x4d": (22_992_714, 2.69),
    "resnext50_flat128": (6_523_722, 1.21),
}


@pytest.mark.parametrize("arch", sorted(CIFAR_SIZES))
def test_cifar_parameter_and_flop_counts(arch):
    params, gflops = CIFAR_SIZES[arch]
    cost = model_cost(build_model(arch, num_classes=10, stem="cifar"), (3, 32, 32))
    assert cost.params == params
    assert cost.gflops == pytest.approx(gflops, abs=0.02)


def test_resnext_is_the_same_stack_with_other_settings():
    resnet, resnext = build_model("tiny_resnet"), build_model("tiny_resnext")
    assert type(resnet) is type(resnext) is BottleneckStack
    blocks = [type(m) for m in resnext.modules() if isinstance(m, Bottleneck)]
    assert blocks and set(blocks) == {Bottleneck}
    assert resnext.layer1[0].conv2.groups == 4 and resnet.layer1[0].conv2.groups == 1


def test_flat_variant_keeps_the_grouped_width_in_every_stage():
    model = build_model("resnext50_flat128")
    widths = {stage[0].conv2.out_channels for stage in (model.layer1, model.layer2, model.layer3, model.layer4)}
    assert widths == {128}
    real = build_model("resnext50_32x4d")
    assert [s[0].conv2.out_channels for s in (real.layer1, real.layer2, real.layer3, real.layer4)] == [
        128, 256, 512, 1024]


def test_stems_differ_in_resolution_kept():
    x = torch.randn(1, 3, 64, 64)
    cifar = build_model("tiny_resnet", stem="cifar").eval()
    imagenet = build_model("tiny_resnet", stem="imagenet").eval()
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    def feature(m):
        return m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))).shape[-1]

    assert feature(cifar) == 64 and feature(imagenet) == 16


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as error:
        build_model("resnet51")
    for name in list_archs():
        assert name in str(error.value)


def test_unknown_override_is_refused_and_known_ones_apply():
    with pytest.raises(ValueError, match="depth"):
        build_model("tiny_resnet", depth=3)
    model = build_model("tiny_resnet", num_classes=100, layers=(1, 2, 1, 1))
    assert model.fc.out_features == 100 and len(model.layer2) == 2


def test_registry_has_the_promised_architectures():
    expected = {"resnet50", "resnext50_32x4d", "resnet101", "resnet152", "resnext101_32x8d",
                "wide_resnet50_2", "resnext50_flat128"}
    assert expected <= set(list_archs())
    assert any(name.startswith("tiny") for name in list_archs())


def test_zero_init_residual_makes_blocks_start_as_identity_branches():
    model = build_model("tiny_resnet", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn3.weight) > 0 for b in build_model("tiny_resnet").modules()
               if isinstance(b, Bottleneck))


def test_custom_norm_layer_is_used_everywhere():
    model = build_model("tiny_resnet", norm_layer=lambda c: torch.nn.GroupNorm(4, c))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _randomize_buffers_and_params(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                fresh = torch.rand(tensor.shape, generator=generator) * 0.2 + 0.9 if tensor.dim() == 1 \
                    else torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(fresh)


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d", "resnet101", "wide_resnet50_2"])
def test_imagenet_stem_matches_torchvision(arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    _randomize_buffers_and_params(reference, seed=1)
    ours = build_model(arch, num_classes=1000, stem="imagenet").eval()
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    assert {k: v.shape for k, v in our_state.items()} == {k: v.shape for k, v in ref_state.items()}
    ours.load_state_dict(ref_state)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_channels_last_matches_nchw(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_public_api_is_exported():
    for name in ("build_model", "list_archs", "Bottleneck", "BottleneckStack", "__version__"):
        assert hasattr(cardinal, name)


@pytest.mark.parametrize("build", ["cardinal", "torchvision"])
def test_the_stem_starts_as_kaiming_or_as_a_fresh_convolution(build):
    from cardinal.reference import torchvision_model

    def stem_and_body(stem_init):
        torch.manual_seed(0)
        model = (build_model("resnet50", stem_init=stem_init) if build == "cardinal"
                 else torchvision_model("resnet50", stem_init=stem_init))
        return model.conv1.weight.detach(), model.layer1[0].conv2.weight.detach()

    kaiming, body = stem_and_body("kaiming")
    fresh, _ = stem_and_body("conv-default")
    fan_in, fan_out = 3 * 3 * 3, 64 * 3 * 3
    assert kaiming.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)  # normal, sqrt(2 / fan_out)
    bound = fan_in ** -0.5  # nn.Conv2d's own start: uniform within 1 / sqrt(fan_in)
    assert fresh.abs().max().item() <= bound and fresh.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    assert body.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)  # the rest stays kaiming
    with pytest.raises(ValueError, match="stem_init"):
        stem_and_body("zeros")
