"""Models written in the project (there is no CPU build of torchvision): MLP, a small CNN, the
CIFAR-style ResNet-18 and ResNet-20, VGG-11 and VGG-16, and the linear autoencoder of MARINA-P F.2.

Every image model takes any input of shape (C, H, W), e.g. digits' (1, 8, 8), MNIST's (1, 28, 28) or
CIFAR's (3, 32, 32): downsampling stops at 1x1 and an adaptive average pool feeds the classifier.
``norm="batch"`` (the default of ResNet and VGG) uses BatchNorm, ``norm="group"`` GroupNorm,
``norm="none"`` no normalization (see docs/neural-networks.md for the BatchNorm policy).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels) if channels % min(32, channels) == 0 else 1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r}: expected batch, group or none")


class MLP(nn.Module):
    """Flatten, then ``layers`` hidden layers of width ``hidden`` with ReLU, then a linear classifier."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 64, layers: int = 1):
        super().__init__()
        dims = [in_features] + [hidden] * layers
        body = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(nn.Flatten(), *body)
        self.head = nn.Linear(dims[-1], n_classes)

    def forward(self, x):
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks (``width``, 2 ``width`` channels), a linear classifier."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16, image: int = 8, norm: str = "none"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), norm_layer(norm, width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), norm_layer(norm, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = max(1, image // 4)
        self.pool = nn.AdaptiveAvgPool2d(min(side, 4))
        self.head = nn.Linear(2 * width * min(side, 4) ** 2, n_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


# -- ResNets ----------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; ``shortcut="conv"`` (1x1 conv + norm, ResNet-18) or ``"pad"``
    (stride-2 subsampling and zero channels, He et al.'s option A, ResNet-20)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.n1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.n2 = norm_layer(norm, cout)
        self.pad = 0
        self.stride = stride
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "conv":
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm_layer(norm, cout))
            else:
                self.pad = cout - cin

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        if self.pad or (self.stride != 1 and isinstance(self.shortcut, nn.Identity)):
            s = x[:, :, ::self.stride, ::self.stride]
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            s = self.shortcut(x)
        return F.relu(out + s)


class ResNet(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, widths: tuple[int, ...], blocks: tuple[int, ...],
                 norm: str = "batch", shortcut: str = "conv"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), norm_layer(norm, widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (w, b) in enumerate(zip(widths, blocks)):
            for j in range(b):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, norm, shortcut))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, n_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet18(in_channels: int, n_classes: int, norm: str = "batch") -> ResNet:
    """The CIFAR ResNet-18 (3x3 stem, no max-pool, widths 64-512, [2, 2, 2, 2] blocks; 11.2M parameters)."""
    return ResNet(in_channels, n_classes, (64, 128, 256, 512), (2, 2, 2, 2), norm, "conv")


def resnet20(in_channels: int, n_classes: int, norm: str = "batch") -> ResNet:
    """He et al.'s CIFAR ResNet-20 (widths 16-32-64, 3 blocks each, option-A shortcuts; 0.27M parameters)."""
    return ResNet(in_channels, n_classes, (16, 32, 64), (3, 3, 3), norm, "pad")


# -- VGG ------------------------------------------------------------------------------------------
VGG_CFG = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """CIFAR-style VGG: 3x3 conv + norm + ReLU stacks, max-pools (skipped once the map is 1x1), one
    linear classifier on the 512 pooled features."""

    def __init__(self, cfg: str, in_channels: int, n_classes: int, image: int = 32, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = in_channels, image
        for v in VGG_CFG[cfg]:
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), norm_layer(norm, v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, n_classes)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# -- the linear autoencoder (MARINA-P F.2) ---------------------------------------------------------
class LinearAutoencoder(nn.Module):
    """x -> D E x with E in R^{k x p}, D in R^{p x k} (F.2: p = 784, k = 16, d = 2pk = 25088).

    ``objective(x)`` is F.2's f(D, E) on a batch: mean_b ||D E x_b - x_b||^2 + (lam/2) ||D E - I||_F^2,
    with ||D E - I||_F^2 = tr((D^T D)(E E^T)) - 2 tr(D E) + p computed on k x k matrices.
    Initialization (unspecified by the paper): N(0, 1/p) entries for E, N(0, 1/k) for D.
    """

    def __init__(self, features: int, code: int = 16, lam: float = 1e-3):
        super().__init__()
        self.features, self.code, self.lam = features, code, lam
        self.E = nn.Parameter(torch.randn(code, features) / features ** 0.5)
        self.D = nn.Parameter(torch.randn(features, code) / code ** 0.5)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return (x @ self.E.T) @ self.D.T

    def regularizer(self):
        dtd = self.D.T @ self.D
        eet = self.E @ self.E.T
        return (dtd * eet).sum() - 2.0 * torch.trace(self.E @ self.D) + self.features

    def objective(self, x):
        x = torch.flatten(x, 1)
        err = self.forward(x) - x
        return (err * err).sum(1).mean() + 0.5 * self.lam * self.regularizer()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
