"""Which part of a freshly initialised network limits the first SGD steps: for each part (stem, the four
stages, the classifier) alone, one plain SGD step of the batch's own gradient at several LRs, and the loss
on that batch afterwards. A part whose step raises the loss at an LR is too sharp for that LR there.

The fast recipe's initialisation and loss are used (zero-initialised last BN per block, label smoothing 0.1,
the true CIFAR-10 std), in fp32, in training mode (batch statistics).

    python benchmarks/layer_step_probe.py --data-dir data-full --arch resnet50
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import torch
from rich.console import Console
from rich.table import Table

from cardinal import build_model
from cardinal.config import RECIPES
from cardinal.data import Normalize, load_cifar

PARTS = {"stem": ("conv1.", "bn1."), "layer1": ("layer1.",), "layer2": ("layer2.",), "layer3": ("layer3.",),
         "layer4": ("layer4.",), "classifier (fc)": ("fc.",)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="CIFAR-10 in the official python layout")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=256, help="the batch: this many training images")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.2, 0.8])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def probe(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, lrs: List[float],
          label_smoothing: float) -> Dict[str, List[float]]:
    """Per part: its gradient norm, then the loss after a step of that part alone at each LR."""
    loss_of = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    model.zero_grad()
    loss = loss_of(model(inputs), targets)
    loss.backward()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    rows = {"(none)": [float(loss.detach())]}
    with torch.no_grad():
        for part, prefixes in PARTS.items():
            chosen = [name for name in grads if name.startswith(prefixes)]
            row = [sum(float(grads[name].norm()) ** 2 for name in chosen) ** 0.5]
            for lr in lrs:
                for name, parameter in model.named_parameters():
                    parameter.copy_(start[name] - lr * grads[name] if name in chosen else start[name])
                row.append(float(loss_of(model(inputs), targets)))
            rows[part] = row
        for name, parameter in model.named_parameters():
            parameter.copy_(start[name])
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = RECIPES["fast"]
    images, labels = load_cifar("cifar10", args.data_dir, train=True)
    torch.manual_seed(args.seed)
    chosen = torch.randperm(len(labels))[:args.images]
    inputs = Normalize(recipe.mean, recipe.std, torch.device("cpu"))(images[chosen])
    model = build_model(args.arch, zero_init_residual=recipe.zero_init_residual)
    rows = probe(model, inputs, labels[chosen].long(), args.lrs, recipe.label_smoothing)
    table = Table(title=f"{args.arch} at initialisation, {args.images} images: loss after one step of one part")
    for heading in ("part", "grad norm", *(f"LR {lr:g}" for lr in args.lrs)):
        table.add_column(heading, justify="left" if heading == "part" else "right")
    table.add_row("(no step)", "", *[f"{rows['(none)'][0]:.3f}"] * len(args.lrs))
    for part in PARTS:
        norm, *after = rows[part]
        table.add_row(part, f"{norm:.3f}", *(f"{loss:.3f}" for loss in after))
    Console().print(table)


if __name__ == "__main__":
    main()
