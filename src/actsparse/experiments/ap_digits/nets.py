"""Small reference networks for the pruning experiments (8x8 inputs, e.g. sklearn digits).

Every activation is its own ``nn.ReLU`` module, so each has a stable dotted path that
capture sessions and dead-neuron tracking can name (``net.2``, ``blocks.0.relu1``...).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from actsparse.errors import ConfigError



class MLP(nn.Module):
    """Flatten -> Linear/ReLU stack -> Linear. Default 64-256-128-10."""

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), hidden: Sequence[int] = (256, 128),
                 num_classes: int = 10):
        super().__init__()
        self.input_shape = tuple(input_shape)
        d = 1
        for s in input_shape:
            d *= int(s)
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """conv-bn-relu1-conv-bn (+ shortcut) -> relu2. 1x1 conv+bn shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv(16)-BN-ReLU, block(16->16), block(16->32, stride 2), global avg pool, linear."""

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), widths: Sequence[int] = (16, 32),
                 num_classes: int = 10):
        super().__init__()
        self.input_shape = tuple(input_shape)
        c0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        blocks = []
        cin = c0
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS = {"mlp": MLP, "cnn": SmallResNet}


def build_model(name: str, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10,
                seed: int | None = None) -> nn.Module:
    """Build ``mlp`` or ``cnn``; with ``seed`` the initialisation is reproducible."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    if seed is not None:
        torch.manual_seed(seed)
    if len(input_shape) != 3 and name == "cnn":
        raise ConfigError(f"model 'cnn' needs (C, H, W) inputs, got shape {tuple(input_shape)}")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes)
