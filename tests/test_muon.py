"""Muon for the filter banks, AdamW for the rest: the split, each half's arithmetic, and its checkpoint."""

import io

import pytest
import torch
from torch import nn

from cardinal.budget import MUON_LR_FACTOR, resolve
from cardinal.config import Recipe, resolve_recipe
from cardinal.muon import Muon, filter_banks, orthogonalize
from cardinal.optim import build_optimizer


def _net(groups: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _step_with_fixed_grads(optimizer: torch.optim.Optimizer, params, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


@pytest.mark.parametrize("shape", [(3, 16, 40), (2, 40, 16)])
def test_orthogonalize_flattens_the_spectrum_of_wide_and_tall_matrices(shape):
    torch.manual_seed(0)
    skewed = torch.randn(shape) @ torch.diag(torch.logspace(0, 2, shape[-1]))  # singular values over 2 decades
    values = torch.linalg.svdvals(orthogonalize(skewed).float())
    assert values.min() > 0.6 and values.max() < 1.25  # the quintic's band, not a single direction


def test_filters_after_the_stem_take_muon_and_grouped_ones_say_their_groups():
    net = _net(groups=2)
    banks = filter_banks(net)
    assert id(net[0].weight) not in banks  # the stem reads the image: AdamW
    assert banks == {id(net[3].weight): 2, id(net[6].weight): 1}
    recipe = Recipe(optimizer="muon", lr=1e-3, weight_decay=0.05, no_decay_norm_bias=True)
    optimizer = build_optimizer(net, recipe)
    assert isinstance(optimizer, Muon)
    by_kind = {(g["muon"], g["conv_groups"], g["weight_decay"]): {id(p) for p in g["params"]}
               for g in optimizer.param_groups}
    assert by_kind[(True, 2, 0.05)] == {id(net[3].weight)} and by_kind[(True, 1, 0.05)] == {id(net[6].weight)}
    assert by_kind[(False, 1, 0.05)] == {id(net[0].weight), id(net[9].weight)}  # stem and classifier
    one_dimensional = {id(p) for p in net.parameters() if p.ndim == 1}
    assert by_kind[(False, 1, 0.0)] == one_dimensional  # norms and biases, exempt from decay
    with pytest.raises(ValueError, match="matrices and filter banks only"):
        Muon([{"params": [net[1].weight], "muon": True}], lr=1e-3)


def test_the_adamw_half_is_torchs_adamw():
    ours, theirs = _net(), _net()
    groups = [{"params": list(ours.parameters()), "muon": False}]
    _step_with_fixed_grads(Muon(groups, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1), list(ours.parameters()), 4)
    _step_with_fixed_grads(torch.optim.AdamW(theirs.parameters(), lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1,
                                             foreach=False), list(theirs.parameters()), 4)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon to compare with")
@pytest.mark.parametrize("nesterov", [True, False])
def test_the_muon_half_is_torchs_muon_at_adamws_update_size(nesterov):
    torch.manual_seed(0)
    matrix = nn.Parameter(torch.randn(24, 40) * 0.1)
    filters = nn.Parameter(matrix.detach().clone().view(24, 40, 1, 1))  # a 1x1 convolution is the same matrix
    start = matrix.detach().clone()
    ours = Muon([{"params": [filters], "muon": True}], lr=0.2, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    theirs = torch.optim.Muon([matrix], lr=0.2, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
                              adjust_lr_fn="match_rms_adamw")
    _step_with_fixed_grads(ours, [filters], 3)
    _step_with_fixed_grads(theirs, [matrix], 3)
    assert (matrix.detach() - start).abs().max() > 0.05  # far more than the rounding allowed below
    torch.testing.assert_close(filters.detach().view(24, 40), matrix.detach(), rtol=0, atol=1e-4)


def test_a_grouped_filter_bank_is_one_matrix_per_group():
    torch.manual_seed(0)
    grouped = nn.Parameter(torch.randn(8, 4, 3, 3))  # 2 groups of 4 output channels
    halves = [nn.Parameter(grouped.detach()[:4].clone()), nn.Parameter(grouped.detach()[4:].clone())]
    together = Muon([{"params": [grouped], "muon": True, "conv_groups": 2}], lr=0.05, weight_decay=0.0)
    apart = Muon([{"params": halves, "muon": True}], lr=0.05, weight_decay=0.0)
    grads = torch.randn(8, 4, 3, 3)
    grouped.grad, halves[0].grad, halves[1].grad = grads.clone(), grads[:4].clone(), grads[4:].clone()
    together.step()
    apart.step()
    torch.testing.assert_close(grouped.detach(), torch.cat([h.detach() for h in halves]))


def test_a_reloaded_muon_continues_as_if_never_stopped():
    straight, stopped = _net(), _net()
    recipe = Recipe(optimizer="muon", lr=2e-3, weight_decay=0.05, no_decay_norm_bias=True)
    first = build_optimizer(straight, recipe)
    _step_with_fixed_grads(first, list(straight.parameters()), 4)

    second = build_optimizer(stopped, recipe)
    _step_with_fixed_grads(second, list(stopped.parameters()), 2)
    saved = io.BytesIO()
    torch.save(second.state_dict(), saved)
    saved.seek(0)
    resumed = build_optimizer(stopped, recipe)
    resumed.load_state_dict(torch.load(saved, weights_only=True))  # tensors and numbers only
    generator_state = torch.Generator().manual_seed(1)
    for _ in range(2):  # replay the first two draws, then take the last two
        for p in stopped.parameters():
            torch.randn(p.shape, generator=generator_state)
    for _ in range(2):
        for p in stopped.parameters():
            p.grad = torch.randn(p.shape, generator=generator_state)
        resumed.step()
    for a, b in zip(straight.parameters(), stopped.parameters()):
        torch.testing.assert_close(a, b)


def test_fast_trains_with_muon_and_switching_to_adamw_keeps_the_decay_and_sizes_adamws_lr():
    muon, adamw = resolve_recipe("fast", {}), resolve_recipe("fast", {"optimizer": "adamw"})
    assert adamw.optimizer == "adamw"
    assert (muon.optimizer, muon.weight_decay, muon.grad_clip, muon.sized_by_budget) == (
        "muon", adamw.weight_decay, 0.0, adamw.sized_by_budget)
    for images in (4160, 40000):
        sized, reference = resolve(muon, images), resolve(adamw, images)
        assert sized.batch_size == reference.batch_size
        assert sized.lr == pytest.approx(MUON_LR_FACTOR * reference.lr, rel=1e-3)
    assert resolve_recipe("seed", {"optimizer": "muon", "lr": 1e-3}).weight_decay == 0.05
