import pytest
import torch
from torch import nn

from cardinal import build_model, count_forward_flops, count_parameters, model_cost


def test_flops_of_a_single_linear_layer_are_two_per_multiply_add():
    assert count_forward_flops(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2)) == 2 * 12 * 5


def test_flops_scale_with_image_area_for_the_convolutional_body():
    model = build_model("tiny_resnet")
    small, large = count_forward_flops(model, (3, 32, 32)), count_forward_flops(model, (3, 64, 64))
    assert large / small == pytest.approx(4.0, rel=0.01)


def test_counting_leaves_the_model_untouched():
    model = build_model("tiny_resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_cost(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainable_only_parameter_count():
    model = build_model("tiny_resnet")
    model.fc.requires_grad_(False)
    frozen = model.fc.weight.numel() + model.fc.bias.numel()
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == frozen


def test_cost_record_fields():
    cost = model_cost(build_model("tiny_resnet"))
    record = cost.as_dict()
    assert record["params"] == cost.params and record["gflops"] == pytest.approx(cost.forward_flops / 1e9)
    assert cost.train_flops == 3 * cost.forward_flops
