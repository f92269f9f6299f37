"""Shared helpers for the family test models: deterministic construction and warmed-up BatchNorm."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WARM_BATCHES = 4
WARM_BATCH_SIZE = 8


def build(make: Callable[[], nn.Module], input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Construct `make()` under a fixed seed, give every BatchNorm non-trivial affine parameters and
    running statistics (train-mode forwards on random data), and return the model in eval mode with
    its `input_shape` attribute set. The global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        model.input_shape = tuple(input_shape)
        _warm_batchnorm(model, model.input_shape)
    return model.eval()


def _warm_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the stats become the mean over the warm batches
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(WARM_BATCHES):
            model(torch.randn(WARM_BATCH_SIZE, *input_shape))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()


def prepare_model(models: dict, name: str, recipe: str, num_classes: int = 5):
    """Prepare the test model `models[name]` (a family or transformer builder) with `recipe`."""
    import edgetl

    model = models[name]()
    return edgetl.prepare(model, recipe, num_classes=num_classes, input_shape=model.input_shape)


def random_batch(pm, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *pm.input_shape, generator=g), torch.randint(0, pm.num_classes, (n,), generator=g)
