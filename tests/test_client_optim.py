"""The client's plain-SGD fast path must be torch.optim.SGD, bit for bit."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from hierfed.client import PlainSGD, make_optimizer
from hierfed.config import TrainConfig


def _net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3), nn.Linear(3, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def _train(net: nn.Module, opt, steps: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    frozen_tail = list(net[3].parameters())  # trainable but gets no gradient: must stay put
    for _ in range(steps):
        x, y = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
        loss = nn.functional.cross_entropy(net[2](net[1](net[0](x))), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in frozen_tail)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_plain_sgd_equals_torch_sgd_bit_for_bit():
    a, b = _net(0), _net(0)
    ours = _train(a, PlainSGD(list(a.parameters()), lr=0.3))
    torch_ = _train(b, torch.optim.SGD(b.parameters(), lr=0.3))
    assert all(torch.equal(x, y) for x, y in zip(ours, torch_))
    assert not torch.equal(ours[0], _net(0)[0].weight)  # it did train


def test_make_optimizer_takes_the_fast_path_only_for_plain_sgd():
    params = list(_net(0).parameters())
    base = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    assert isinstance(make_optimizer(base, params), PlainSGD)
    assert isinstance(make_optimizer(replace(base, momentum=0.9), params), torch.optim.SGD)
    assert isinstance(make_optimizer(replace(base, weight_decay=1e-4), params), torch.optim.SGD)
    assert isinstance(make_optimizer(replace(base, optimizer="adam"), params), torch.optim.Adam)
